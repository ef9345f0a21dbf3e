"""EgoNCE against InfoNCE, the paper's Table 1 question, with the two ingredients of EgoNCE separated.

    python benchmarks/objectives.py [--workdir bench_objectives] [--seeds 0 1 2] [--arms ...] [KEY=VALUE ...]

Pretrains the ``tiny`` preset on the synthetic world (generated into WORKDIR/toy_data if absent)
once per arm and seed and evaluates EgoMCQ after training. The arms:

- ``egonce``: EgoNCE, i.e. action-aware positives and scene-aware hard negatives in every batch;
- ``infonce``: InfoNCE on plain batches, diagonal positives only (the paper's and EgoVLP's
  baseline, ``data.hard_negatives=false``);
- ``infonce_scene``: InfoNCE with the scene-aware hard negatives still in the batch.

All arms have the same number of anchors per step (``train.batch_size``); with hard negatives a
step also encodes one negative clip per anchor. Every finished run is appended to
WORKDIR/results.jsonl, and a run already there with the same overrides is not repeated, so a
table can be built one arm and seed at a time. The summary gives each arm's mean over its seeds
with the standard error of the mean, and each arm's difference to EgoNCE paired by seed.
Extra ``KEY=VALUE`` overrides apply to every arm; ``--quick`` (for tests) is a small world and
two training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from svitt_ego.atomic import append_jsonl
from svitt_ego.config import load_config
from svitt_ego.data.toy import make_toy_data, toy_data_overrides
from svitt_ego.eval.egomcq import evaluate_egomcq
from svitt_ego.models import SViTTEgo
from svitt_ego.train import pretrain

ARMS = {
    "egonce": ("EgoNCE", ["loss.contrastive=egonce", "data.hard_negatives=true"]),
    "infonce": ("InfoNCE, plain batches", ["loss.contrastive=infonce", "data.hard_negatives=false"]),
    "infonce_scene": ("InfoNCE + scene-aware negatives", ["loss.contrastive=infonce", "data.hard_negatives=true"]),
}
QUICK_VIDEOS = 40
QUICK_OVERRIDES = ["train.max_steps=2", "train.batch_size=4", "train.epochs=1", "data.num_workers=0"]


def run_arm(arm: str, seed: int, data: Path, workdir: Path, overrides: list[str]) -> dict:
    """Pretrain one arm with one seed from scratch and evaluate it on EgoMCQ."""
    cfg = load_config("tiny", [*toy_data_overrides(data), *ARMS[arm][1], f"train.seed={seed}",
                               f"train.output_dir={workdir / f'{arm}-{seed}'}", "train.eval_every_epoch=false",
                               *overrides])
    tic = time.perf_counter()
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # each run starts afresh
    pretrain(cfg)
    model = SViTTEgo.from_pretrained(Path(cfg.train.output_dir) / "model")
    result = evaluate_egomcq(model, cfg, torch.device("cpu"))
    return {"arm": arm, "seed": seed, "inter": result["inter"], "intra": result["intra"],
            "minutes": (time.perf_counter() - tic) / 60, "overrides": overrides}


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); NaN for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def _cell(mean: float, se: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return f"{'-':>15}"
    return f"{mean:>+8.1f} +- {se:>4.1f}" if signed else f"{mean:>6.1f} +- {se:>4.1f}"


def summarize(rows: list[dict]) -> str:
    """Per arm: seeds, mean +- standard error of inter / intra, and the difference to EgoNCE paired by seed
    (a standard error of NaN: one seed)."""
    by_arm = {arm: {r["seed"]: r for r in rows if r["arm"] == arm} for arm in ARMS}
    lines = [f"{'arm':>32} {'seeds':>6} {'inter %':>13} {'intra %':>13} {'inter - EgoNCE':>15} {'intra - EgoNCE':>15}"]
    for arm, runs in by_arm.items():
        if not runs:
            continue
        cells = [f"{ARMS[arm][0]:>32} {len(runs):>6}"]
        cells += [_cell(*mean_and_se([r[kind] for r in runs.values()])) for kind in ("inter", "intra")]
        for kind in ("inter", "intra"):
            paired = [runs[s][kind] - by_arm["egonce"][s][kind] for s in runs if s in by_arm["egonce"]]
            cells.append(_cell(*mean_and_se(paired), signed=True) if paired and arm != "egonce" else _cell(math.nan, 0))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_objectives")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--quick", action="store_true", help="a small world and two steps (for tests)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    overrides = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    data = make_toy_data(workdir / ("toy_data_quick" if args.quick else "toy_data"), seed=0,
                         num_videos=QUICK_VIDEOS if args.quick else None)
    results = workdir / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    rows = [r for r in done if r["overrides"] == overrides]
    for seed in args.seeds:
        for arm in args.arms:
            if any(r["arm"] == arm and r["seed"] == seed for r in rows):
                continue
            rows.append(run_arm(arm, seed, data, workdir, overrides))
            append_jsonl(results, rows[-1])
    print(f"\n{'arm':>32} {'seed':>5} {'inter %':>8} {'intra %':>8} {'minutes':>8}")
    for r in sorted(rows, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"])):
        print(f"{ARMS[r['arm']][0]:>32} {r['seed']:>5} {r['inter']:>8.1f} {r['intra']:>8.1f} {r['minutes']:>8.1f}")
    print(f"\nmean +- standard error over seeds ({results}, overrides {overrides or 'none'}):")
    print(summarize(rows))


if __name__ == "__main__":
    main()
