"""``svitt-ego demo``: the whole pipeline on the synthetic egocentric world, on a CPU, in minutes.

Generate the toy dataset (if absent), evaluate the untrained ``tiny`` model on
its EgoMCQ, pretrain it with edge and node sparsity on, evaluate again, and
print the before / after accuracies.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from svitt_ego.config import load_config
from svitt_ego.data.toy import make_toy_data
from svitt_ego.evaluate import evaluate_egomcq
from svitt_ego.models import SViTTEgo, create_model
from svitt_ego.train import pretrain
from svitt_ego.visualize import demo_figure

# The quick version (for tests): a smaller world and a short run.
QUICK_VIDEOS = 40
QUICK_OVERRIDES = ["train.epochs=2", "train.checkpoint_every=1000"]


def demo(workdir: str | Path = "demo_run", quick: bool = False) -> dict:
    workdir = Path(workdir)
    start = time.perf_counter()
    data = make_toy_data(workdir / "toy_data", seed=0, num_videos=QUICK_VIDEOS if quick else None)
    # EgoMCQ runs once before and once after pretraining, not after every epoch.
    cfg = load_config("tiny", [f"data.egoclip={data / 'egoclip.csv'}", f"data.egomcq={data / 'egomcq.json'}",
                               f"data.video_root={data / 'videos'}", f"train.output_dir={workdir / 'run'}",
                               "train.eval_every_epoch=false", *(QUICK_OVERRIDES if quick else [])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(cfg.train.seed)

    print(f"1/3 evaluating the untrained tiny model on {cfg.data.egomcq}")
    untrained = create_model(cfg.model)
    before = evaluate_egomcq(untrained, cfg, torch.device("cpu"))
    print(f"2/3 pretraining the tiny model ({cfg.train.epochs} epochs) into {cfg.train.output_dir}")
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # the demo starts afresh every time
    pretrain(cfg)
    print("3/3 evaluating the pretrained model")
    pretrained = SViTTEgo.from_pretrained(Path(cfg.train.output_dir) / "model")
    after = evaluate_egomcq(pretrained, cfg, torch.device("cpu"))
    figure = demo_figure(untrained, pretrained, cfg, workdir / "figure1.png")
    elapsed = time.perf_counter() - start

    print(f"\n{'EgoMCQ (%)':16s}{'inter':>8s}{'intra':>8s}")
    print(f"{'before':16s}{before['inter']:>8.1f}{before['intra']:>8.1f}")
    print(f"{'after':16s}{after['inter']:>8.1f}{after['intra']:>8.1f}")
    print(f"{'chance':16s}{20.0:>8.1f}{20.0:>8.1f}")
    print(f"\n{before['num_inter']} inter- and {before['num_intra']} intra-video questions; "
          f"{elapsed / 60:.1f} minutes in all. Checkpoints, TensorBoard logs and metrics.jsonl: {cfg.train.output_dir}")
    print(f"Figure 1, the video patches node sparsity keeps before and after pretraining: {figure}")
    result = {"before": before, "after": after, "minutes": elapsed / 60}
    (workdir / "demo_results.json").write_text(json.dumps(result, indent=2))
    return result
