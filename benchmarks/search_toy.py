"""Zero-shot moment search on the synthetic world's held-out videos: Recall@1, beside a random moment.

    python benchmarks/search_toy.py [--demo demo_run] [--model CKPT] [--videos N] [--html page.html]

Each validation video of a ``svitt-ego demo`` folder (the videos of ``toy_data/nlq_val.json``, none of
which is in ``egoclip.csv``, the pretraining set) is searched, as ``svitt-ego search`` searches raw
videos, for its own queries ("When did I <verb> the <colour> <shape>?"), with the demo's model
(``DEMO/run/model``, or ``--model``). A query is a hit at IoU ``t`` when its video's top-1 moment
has IoU >= ``t`` with the query's answer (seconds of the video).

The anchor, in the same run: a moment of the same length as the top-1 one at a uniformly random
start inside the video (its hit rate is averaged over 1001 evenly spaced starts, so it is exact to
about 0.1%). The wall times run from the raw videos to the written results page: once with an
empty cache (extracting every video) and once with the warm cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from svitt_ego.search import Extraction, QueryResult, add_frames, cached_features, search_folder, text_embeddings
from svitt_ego.search_page import write_page

THRESHOLDS = (0.3, 0.5)
STARTS = 1001  # random starts averaged per query


def val_queries(toy_data: Path) -> dict[str, list[tuple[str, float, float]]]:
    """``video_uid -> [(query, start, end)]`` of the held-out NLQ file, answers in video seconds."""
    queries: dict[str, list] = {}
    for video in json.loads((toy_data / "nlq_val.json").read_text())["videos"]:
        for clip in video["clips"]:
            for annotation in clip["annotations"]:
                for q in annotation["language_queries"]:
                    queries.setdefault(video["video_uid"], []).append(
                        (q["query"], q["video_start_sec"], q["video_end_sec"]))
    return queries


def pretrained_on(toy_data: Path) -> set[str]:
    with open(toy_data / "egoclip.csv", newline="") as f:
        return {row["video_uid"] for row in csv.DictReader(f, delimiter="\t")}


def iou(start, end, truth: tuple[float, float]):
    inter = np.clip(np.minimum(end, truth[1]) - np.maximum(start, truth[0]), 0, None)
    return inter / (np.maximum(end, truth[1]) - np.minimum(start, truth[0]))


def random_moment_hits(length: float, duration: float, truth: tuple[float, float], threshold: float) -> float:
    """The chance that a moment of ``length`` at a uniformly random start inside the video hits ``truth``."""
    starts = np.linspace(0.0, max(duration - length, 0.0), STARTS)
    return float((iou(starts, starts + length, truth) >= threshold).mean())


def run(model: Path, videos: dict[str, Path], queries: dict, cache: Path, page: Path):
    """Search every video for its own queries, write the page; returns the results and the videos' lengths."""
    loaded, found, failed = cached_features(model, videos, cache, Extraction(device="cpu"))
    if failed:
        raise SystemExit(f"unreadable videos: {failed}")
    results, lengths = [], {}
    for features, key in found:
        texts = [text for text, _, _ in queries[key]]
        info = features.info(key)
        lengths[key] = info["frames"] / info["fps"]
        for text, moments in zip(texts, search_folder(loaded, features, text_embeddings(loaded, texts), 1)):
            results.append((key, QueryResult(text, moments)))
    add_frames([r for _, r in results])
    write_page([r for _, r in results], page, title="svitt-ego search: toy held-out videos")
    return results, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="demo_run", help="a svitt-ego demo folder (toy_data/, run/model)")
    parser.add_argument("--model", default=None, help="another checkpoint (default: DEMO/run/model)")
    parser.add_argument("--videos", type=int, default=None, help="only the first N validation videos")
    parser.add_argument("--html", default=None, help="keep the results page here (default: a temporary file)")
    args = parser.parse_args()

    demo = Path(args.demo)
    toy, model = demo / "toy_data", Path(args.model or demo / "run" / "model")
    queries = val_queries(toy)
    uids = sorted(queries)[:args.videos]
    videos = {uid: (toy / "videos" / uid).absolute() for uid in uids}
    overlap = len(set(uids) & pretrained_on(toy))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(args.html) if args.html else Path(tmp) / "page.html"
        times = []
        for _ in ("cold", "warm"):
            start = time.perf_counter()
            results, lengths = run(model, videos, queries, Path(tmp) / "cache", page)
            times.append(time.perf_counter() - start)
        size = page.stat().st_size
    truth = {(key, text): (s, e) for key in uids for text, s, e in queries[key]}
    rows = {"zero-shot search": [], "random moment": []}
    for threshold in THRESHOLDS:
        hits, chance = [], []
        for key, result in results:
            top, answer = result.moments[0], truth[key, result.query]
            hits.append(iou(top.start, top.end, answer) >= threshold)
            chance.append(random_moment_hits(top.end - top.start, lengths[key], answer, threshold))
        rows["zero-shot search"].append(100 * np.mean(hits))
        rows["random moment"].append(100 * np.mean(chance))
    print(f"toy held-out: {len(uids)} videos ({overlap} of them in egoclip.csv), {len(results)} queries, "
          f"model {model}")
    print(f"{'R@1 (%)':18s}" + "".join(f"{'IoU>=' + str(t):>10s}" for t in THRESHOLDS))
    for name, values in rows.items():
        print(f"{name:18s}" + "".join(f"{v:>10.1f}" for v in values))
    top_lengths = [r.moments[0].end - r.moments[0].start for _, r in results]
    print(f"top-1 moments {np.mean(top_lengths):.2f} s long on average, answers "
          f"{np.mean([e - s for s, e in truth.values()]):.2f} s")
    print(f"wall time, raw videos to the written page: {times[0]:.1f} s with an empty cache, {times[1]:.1f} s warm "
          f"({times[0] / times[1]:.1f}x); page {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
