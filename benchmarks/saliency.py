"""Does node sparsity keep the salient patches? Measured on the synthetic world's held-out videos.

    python benchmarks/saliency.py [--demo demo_run] [--max-clips N]

For every action clip of the held-out (EgoMCQ) videos of a ``svitt-ego demo`` folder, the clip's
frames are sampled and transformed as in evaluation, and the toy world's plan says which pixels of
each frame show the acted-upon object and the hand (``toy.actor_masks``). For each pruning step
(the video layers, then the first fusion layer with the clip's own narration) the script prints
the share of all patches that survive (the anchor), the share of the object's pixels and of the
hand's pixels that lie in surviving patches, and their ratio to the anchor. A ratio of 1 is what
pruning blind to the object would give; its ceiling is 1 / (the share of all patches kept).
It does this for the untrained model (built as the demo builds it) and the pretrained one
(``DEMO/run/model``, or ``--pretrained``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from svitt_ego.config import load_config
from svitt_ego.data.toy import FPS, NOUNS, VERBS, actor_masks, plan_world
from svitt_ego.data.video import read_clip_frames, sample_times
from svitt_ego.models.loading import load_for_eval
from svitt_ego.models import SViTTEgo, create_model
from svitt_ego.visualize import eval_transform, kept_masks, patch_coverage, survival

BATCH = 16


def held_out_clips(toy_data: Path) -> list[tuple]:
    """``(plan, start, end, narration)`` of every action in the toy world's validation videos."""
    manifest = json.loads((toy_data / "manifest.json").read_text())
    plans = plan_world(manifest["seed"], manifest["num_videos"])
    return [(plan, a.start, a.end, f"#C C {VERBS[a.verb][0]} the {NOUNS[plan.objects[a.obj].noun]}")
            for plan in plans if plan.split == "val" for a in plan.actions]


def clip_inputs(clip: tuple, video_root: Path, vision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The normalised frames ``[T, 3, S, S]`` and the object's and hand's patch coverage ``[T, h, w]``."""
    plan, start, end, _ = clip
    times = sample_times(start, end, vision.num_frames, "uniform")
    frames = read_clip_frames(video_root, plan.uid, start, end, vision.num_frames)
    # The frame shown at time t, as read_clip_frames picks it.
    indices = np.minimum(np.floor(times * FPS + 1e-6).astype(int), plan.num_frames - 1)
    masks = [actor_masks(plan, int(f)) for f in indices]
    obj, hand = (np.stack([m[i] for m in masks]) for i in (0, 1))
    return eval_transform(vision)(frames), patch_coverage(obj, vision), patch_coverage(hand, vision)


@torch.no_grad()
def measure(model: SViTTEgo, clips: list[tuple], video_root: Path) -> list[dict]:
    """Per pruning step: its label and the kept / total weight of all patches, the object and the hand."""
    vision = model.config.vision
    totals: list[dict] = []
    for first in range(0, len(clips), BATCH):
        batch = clips[first:first + BATCH]
        inputs = [clip_inputs(clip, video_root, vision) for clip in batch]
        frames, obj, hand = (torch.stack([x[i] for x in inputs]) for i in range(3))
        rows = kept_masks(model, frames, [clip[3] for clip in batch])
        if not totals:
            totals = [{"step": row.label.split(":")[0], "all": [0.0, 0.0], "object": [0.0, 0.0],
                       "hand": [0.0, 0.0]} for row in rows]
        for total, row in zip(totals, rows):
            for name, weight in (("all", torch.ones_like(obj)), ("object", obj), ("hand", hand)):
                kept, whole = survival(row.mask, weight)
                total[name][0] += kept
                total[name][1] += whole
    return totals


def print_table(name: str, totals: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'pruning step':>22} {'all %':>7} {'object %':>9} {'x all':>6} {'hand %':>7} {'x all':>6} {'ceiling':>8}")
    for t in totals:
        rate = {k: 100 * t[k][0] / t[k][1] for k in ("all", "object", "hand")}
        print(f"{t['step']:>22} {rate['all']:>7.1f} {rate['object']:>9.1f} {rate['object'] / rate['all']:>6.2f} "
              f"{rate['hand']:>7.1f} {rate['hand'] / rate['all']:>6.2f} {100 / rate['all']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="demo_run", help="a `svitt-ego demo` folder (toy_data/ and run/)")
    parser.add_argument("--pretrained", default=None,
                        help="a checkpoint (.pt) or save_pretrained folder (default: DEMO/run/model)")
    parser.add_argument("--untrained-seeds", type=int, nargs="+", default=None,
                        help="initialise untrained models with these seeds (default: the demo's train.seed)")
    parser.add_argument("--max-clips", type=int, default=None, help="only the first N held-out clips")
    args = parser.parse_args()
    demo = Path(args.demo)
    clips = held_out_clips(demo / "toy_data")[:args.max_clips]
    cfg = load_config(demo / "run" / "config.yaml")
    models = {}
    for seed in args.untrained_seeds or [cfg.train.seed]:  # the demo's untrained model has train.seed
        torch.manual_seed(seed)
        models[f"untrained (seed {seed})"] = create_model(cfg.model)
    models["pretrained"] = load_for_eval(args.pretrained or demo / "run" / "model")[0]
    print(f"{len(clips)} held-out clips of {len({c[0].uid for c in clips})} videos, "
          f"{cfg.model.vision.num_frames} frames each")
    for name, model in models.items():
        tic = time.perf_counter()
        totals = measure(model, clips, demo / "toy_data" / "videos")
        print_table(f"{name} ({time.perf_counter() - tic:.0f} s)", totals)


if __name__ == "__main__":
    main()
