"""How long reading egoclip.csv takes, and how much memory: cold (parse + build the parquet
cache) and warm (from the cache), each in a fresh process; then the time to index the
scene-aware negatives of all rows.

    python benchmarks/egoclip_metadata.py [--rows 3847723] [--videos 10000]

The file is synthetic but in the real format with realistic values: ~10k videos of
log-normal length, ~13 narrations per minute, 1-3 noun and 0-2 verb tags, short texts.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

VERBS = ["pick", "put", "hold", "open", "close", "cut", "wash", "move", "turn", "touch", "take", "drop"]
NOUNS = ["bag", "cup", "knife", "door", "phone", "box", "plate", "brush", "towel", "paper", "wood", "bowl"]


def write_fake_egoclip(path: Path, num_rows: int, num_videos: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    video_dur = rng.lognormal(np.log(1500), 0.8, num_videos).clip(30, 5 * 3600)
    rows_per_video = rng.multinomial(num_rows, video_dur / video_dur.sum())
    video = np.repeat(np.arange(num_videos), rows_per_video)
    narration_ind = np.arange(num_rows) - np.repeat(np.cumsum(rows_per_video) - rows_per_video, rows_per_video)
    narration_time = rng.random(num_rows) * video_dur[video]
    narration_time = narration_time[np.lexsort((narration_time, video))]
    half = rng.uniform(0.2, 0.8, num_rows)
    clip_start = np.maximum(narration_time - half, 0.0)
    clip_end = np.minimum(narration_time + half, video_dur[video])

    uids = np.array([f"{rng.bytes(4).hex()}-{rng.bytes(2).hex()}-{rng.bytes(2).hex()}-"
                     f"{rng.bytes(2).hex()}-{rng.bytes(6).hex()}" for _ in range(num_videos)])
    texts = np.array([f"#C C {v}s the {n}" + (" on the table" if i % 3 == 0 else "")
                      for i, (v, n) in enumerate((v, n) for v in VERBS for n in NOUNS)])
    tag_pool_size = 50_000
    verb_lists = [sorted(rng.choice(118, k, replace=False)) for k in rng.choice(3, tag_pool_size, p=[0.05, 0.85, 0.10])]
    noun_lists = [sorted(rng.choice(582, k, replace=False)) for k in rng.choice(4, tag_pool_size, p=[0.03, 0.6, 0.3, 0.07])]
    as_text = lambda lists: np.array(["[" + ", ".join(map(str, x)) + "]" for x in lists])  # noqa: E731

    table = pa.table({
        "clip_idx": np.arange(num_rows),
        "video_uid": pa.array(uids).take(pa.array(video)),
        "video_dur": video_dur[video].round(6),
        "narration_source": pa.array(np.array(["narration_pass_1", "narration_pass_2"])[rng.integers(0, 2, num_rows)]),
        "narration_ind": narration_ind,
        "narration_time": narration_time.round(4),
        "clip_start": clip_start.round(6),
        "clip_end": clip_end.round(6),
        "clip_text": pa.array(texts).take(pa.array(rng.integers(0, len(texts), num_rows))),
        "tag_verb": pa.array(as_text(verb_lists)).take(pa.array(rng.integers(0, tag_pool_size, num_rows))),
        "tag_noun": pa.array(as_text(noun_lists)).take(pa.array(rng.integers(0, tag_pool_size, num_rows))),
    })
    assert pc.all(pc.greater_equal(table["clip_end"], table["clip_start"])).as_py()
    with open(path, "wb") as f:
        f.write(("\t".join(table.column_names) + "\n").encode())
        pcsv.write_csv(table, f, pcsv.WriteOptions(delimiter="\t", quoting_style="none", include_header=False))


def _measure_child(path: str) -> None:
    from svitt_ego.data.egoclip import SceneNegatives, read_egoclip

    start = time.perf_counter()
    df = read_egoclip(path)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    SceneNegatives(df)
    negatives = time.perf_counter() - start
    print(f"{seconds:.2f} {peak_mib:.0f} {len(df)} {df.memory_usage(deep=True).sum() / 2**20:.0f} {negatives:.2f}")


def measure(path: Path) -> dict:
    """Read in a fresh process (so the peak RSS is that of one read alone)."""
    out = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                         capture_output=True, text=True).stdout.split()
    return {"seconds": float(out[0]), "peak_rss_mib": float(out[1]), "rows": int(out[2]),
            "frame_mib": float(out[3]), "negatives_seconds": float(out[4])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_847_723)
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _measure_child(args.child)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "egoclip.csv"
        start = time.perf_counter()
        write_fake_egoclip(path, args.rows, args.videos)
        print(f"load average {os.getloadavg()[0]:.1f}; wrote {args.rows:,} rows, {path.stat().st_size / 2**20:.0f} MiB, "
              f"in {time.perf_counter() - start:.1f} s")
        cold, warm = measure(path), measure(path)
        print("| read | time (s) | peak RSS (MiB) | DataFrame (MiB) |")
        print("|---|---|---|---|")
        for name, r in [("cold (parse + write cache)", cold), ("warm (from cache)", warm)]:
            print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['frame_mib']:.0f} |")
        print(f"SceneNegatives index over {warm['rows']:,} rows: {warm['negatives_seconds']:.1f} s")


if __name__ == "__main__":
    main()
