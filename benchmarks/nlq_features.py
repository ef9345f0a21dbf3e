"""NLQ feature extraction speed: windows per second, beside the model's forward alone.

    python benchmarks/nlq_features.py                       # svitt_ego_kr3 on CUDA if present, else CPU
    python benchmarks/nlq_features.py --preset tiny --seconds 20 --device cpu

Writes one synthetic clip (``--seconds`` of 456x256 video at 30 fps, h264 with a keyframe
every second, as ``prepare-videos`` writes them), then times
:meth:`svitt_ego.features.WindowExtractor.rows` on it: decoding, the evaluation transform and
the video encoder, windows of 4 frames with a stride of 4. The anchor, measured in the same
run, is the video encoder alone on random pixels of the same batch size, so the gap is the
cost of reading the video. Weights are random (speed does not depend on them); fp16 autocast
on CUDA, as the extractor uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from svitt_ego.config import load_config
from svitt_ego.features import Settings, WindowExtractor, chunk_folder_source, num_windows
from svitt_ego.models import create_model

FPS = 30


def write_video(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (256, 456, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 456, 256, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(FPS)}
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


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
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.preset)
    model = create_model(cfg.model, load_pretrained=False)
    extractor = WindowExtractor(model, Settings(), args.batch_size, device)
    with tempfile.TemporaryDirectory() as root:
        write_video(Path(root) / "v" / "0.mp4", args.seconds)
        source = chunk_folder_source(Path(root) / "v")
        extractor.rows(dataclasses.replace(source, count=FPS))  # warm-up
        seconds = timed(lambda: extractor.rows(source), device)
        windows = num_windows(source.count, 4)
    v = cfg.model.vision
    pixels = torch.randn(args.batch_size, 4, 3, v.image_size, v.image_size, device=device)
    batches = -(-windows // args.batch_size)

    def forward_only():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            for _ in range(batches):
                model.forward_video(pixels)

    anchor = timed(forward_only, device)
    print(f"{args.preset} on {device}, {windows} windows of a {args.seconds:g}-s 456x256 clip, batch {args.batch_size}")
    print(f"{'':28s}{'windows/s':>12s}")
    print(f"{'extraction (read + encode)':28s}{windows / seconds:>12.1f}")
    print(f"{'anchor: encoder alone':28s}{windows / anchor:>12.1f}")


if __name__ == "__main__":
    main()
