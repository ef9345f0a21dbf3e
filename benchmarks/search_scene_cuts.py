"""Does search rank videos with scene cuts first for queries that match no video? Contrast against match.

    python benchmarks/search_scene_cuts.py [--demo demo_run] [--model CKPT] [--videos 6] [--cut-every 6]

Makes 2N toy videos of the same length with the toy world's renderer: N "smooth" ones (one toy scene
each) and N "cut" ones (a hard cut every ``--cut-every`` seconds between different toy scenes). Every
video is searched, as ``svitt-ego search`` searches raw videos, for queries that describe nothing the
toy world shows; per query the top 5 moments of each video are ranked over all videos, once by each
moment's outer-inner contrast (what it was chosen by; search's ranking before) and once by its match
with the query (:func:`svitt_ego.search.match_score`, the mean cosine of its windows; search's ranking
now). Printed: the share of each query's top 1 and top 5 that come from cut videos (a score blind to cuts
gives about 50%), and the mean score of the top moment of each kind of video.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from svitt_ego.data import toy
from svitt_ego.search import Extraction, best_moments, cached_features, match_score, text_embeddings, video_embeddings

QUERIES = ["a rabbit stretches its arms", "a man rides a bike down a hill", "the sun sets over the sea",
           "a dog catches a frisbee in the park", "someone plays the piano", "cars drive through the rain",
           "a child laughs on a swing", "waves crash on the rocks"]
TOP = (1, 5)


def make_videos(root: Path, count: int, seconds: float, cut_every: float, seed: int = 7) -> dict[str, Path]:
    """``count`` smooth and ``count`` cut videos of ``seconds`` each; ``{name: path}``, names say the kind."""
    rng = np.random.default_rng(seed)
    scenes = int(np.ceil(seconds / cut_every))
    plans = [toy._plan_video(rng, "val", seconds) for _ in range(count * (1 + scenes))]
    frames, per_scene = round(seconds * toy.FPS), round(cut_every * toy.FPS)
    videos = {}
    for i in range(count):
        videos[f"smooth{i}"] = list(toy.render_frames(plans[i], 0, frames))
        cut = plans[count + i * scenes:count + (i + 1) * scenes]
        videos[f"cut{i}"] = [frame for k, plan in enumerate(cut)
                             for frame in toy.render_frames(plan, k * per_scene, min(frames, (k + 1) * per_scene))]
    root.mkdir(parents=True, exist_ok=True)
    for name, video in videos.items():
        toy._write_chunk(root / f"{name}.mp4", video)
    return {name: root / f"{name}.mp4" for name in videos}


@torch.no_grad()
def moments(model_path: Path, videos: dict[str, Path], cache: Path) -> list[list[dict]]:
    """Per query, the top 5 moments of every video: ``{"cut", "contrast", "match"}``."""
    model, found, failed = cached_features(model_path, videos, cache, Extraction(device="cpu"))
    if failed:
        raise SystemExit(f"unreadable videos: {failed}")
    queries = text_embeddings(model, QUERIES)
    per_query = [[] for _ in QUERIES]
    for features, key in found:
        scores = video_embeddings(model, features, key) @ queries.T
        for q in range(len(QUERIES)):
            column = scores[:, q].contiguous()
            per_query[q] += [{"cut": key.startswith("cut"), "contrast": contrast,
                              "match": match_score(column, first, last)}
                             for first, last, contrast in best_moments(column, max(TOP))]
    return per_query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="demo_run", help="a svitt-ego demo folder (run/model)")
    parser.add_argument("--model", default=None, help="another checkpoint (default: DEMO/run/model)")
    parser.add_argument("--videos", type=int, default=6, help="videos of each kind")
    parser.add_argument("--seconds", type=float, default=24.0, help="length of every video")
    parser.add_argument("--cut-every", type=float, default=6.0, help="seconds between the cut videos' cuts")
    args = parser.parse_args()

    model = Path(args.model or Path(args.demo) / "run" / "model")
    with tempfile.TemporaryDirectory() as tmp:
        videos = make_videos(Path(tmp) / "videos", args.videos, args.seconds, args.cut_every)
        per_query = moments(model, videos, Path(tmp) / "cache")
    print(f"{args.videos} smooth and {args.videos} cut videos of {args.seconds:g} s (a cut every "
          f"{args.cut_every:g} s), {len(QUERIES)} queries that match neither, model {model}")
    print(f"{'ranked by':28s}" + "".join(f"{'top ' + str(k) + ' from cuts':>17s}" for k in TOP)
          + f"{'top score, cut':>16s}{'smooth':>9s}")
    for score in ("contrast", "match"):
        shares = [100 * np.mean([m["cut"] for q in per_query for m in sorted(q, key=lambda m: -m[score])[:k]])
                  for k in TOP]
        best = {kind: np.mean([max(m[score] for m in q if m["cut"] == kind) for q in per_query])
                for kind in (True, False)}
        name = {"contrast": "contrast (before)", "match": "match (now)"}[score]
        print(f"{name:28s}" + "".join(f"{s:>16.1f}%" for s in shares) + f"{best[True]:>16.3f}{best[False]:>9.3f}")


if __name__ == "__main__":
    main()
