"""EgoNCE against InfoNCE: the same small pretraining, two contrastive objectives (the paper's Table 1 question).

    python benchmarks/objectives.py [--workdir bench_objectives] [--seeds 0 1] [KEY=VALUE ...]

Pretrains the ``tiny`` preset on the synthetic world (generated into WORKDIR/toy_data if absent)
once with ``loss.contrastive=egonce`` (action-aware positives, scene-aware hard negatives) and
once with ``loss.contrastive=infonce`` (hard negatives still in the batch, positives only on the
diagonal), for each seed, and prints the EgoMCQ accuracies after training. Extra ``KEY=VALUE``
overrides apply to both.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from svitt_ego.config import load_config
from svitt_ego.data.toy import make_toy_data, toy_data_overrides
from svitt_ego.evaluate import evaluate_egomcq
from svitt_ego.models import SViTTEgo
from svitt_ego.train import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench_objectives")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    data = make_toy_data(workdir / "toy_data", seed=0)
    rows = []
    for seed in args.seeds:
        for objective in ("egonce", "infonce"):
            cfg = load_config("tiny", [*toy_data_overrides(data), f"loss.contrastive={objective}",
                                       f"train.seed={seed}", f"train.output_dir={workdir / f'{objective}-{seed}'}",
                                       "train.eval_every_epoch=false", *args.overrides])
            tic = time.perf_counter()
            shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # each run starts afresh
            pretrain(cfg)
            model = SViTTEgo.from_pretrained(Path(cfg.train.output_dir) / "model")
            result = evaluate_egomcq(model, cfg, torch.device("cpu"))
            rows.append((objective, seed, result["inter"], result["intra"], (time.perf_counter() - tic) / 60))
    print(f"\n{'objective':>10} {'seed':>5} {'inter %':>8} {'intra %':>8} {'minutes':>8}")
    for objective, seed, inter, intra, minutes in rows:
        print(f"{objective:>10} {seed:>5} {inter:>8.1f} {intra:>8.1f} {minutes:>8.1f}")


if __name__ == "__main__":
    main()
