"""``svitt-ego demo``: the whole pipeline on the synthetic egocentric world, on a CPU, in minutes.

Generate the toy dataset (if absent), evaluate the untrained ``tiny`` model on
its EgoMCQ, pretrain it with edge and node sparsity on, evaluate again, and
print the before / after accuracies, then what the multimodal encoder learned
(EgoMCQ by each score, held-out VTM and MLM checks: :mod:`svitt_ego.fusion_checks`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from svitt_ego.atomic import atomic_write_text
from svitt_ego.config import Config, load_config
from svitt_ego.data.toy import make_toy_data, toy_data_overrides
from svitt_ego.evaluate import CHANCE, evaluate_egomcq, format_egomcq
from svitt_ego.fusion_checks import format_multimodal_report, multimodal_report
from svitt_ego.models import SViTTEgo, create_model
from svitt_ego.run_folder import run_folder
from svitt_ego.train import pretrain
from svitt_ego.visualize import demo_figure

# The quick version (for tests): a smaller world and a short run.
QUICK_VIDEOS = 40
QUICK_OVERRIDES = ["train.epochs=2", "train.checkpoint_every=1000"]


def demo_config(workdir: Path, quick: bool, epochs: int | None = None) -> Config:
    """The ``tiny`` preset on the toy world under ``workdir``."""
    # EgoMCQ runs once before and once after pretraining, not after every epoch.
    return load_config("tiny", [*toy_data_overrides(workdir / "toy_data"), f"train.output_dir={workdir / 'run'}",
                                "train.eval_every_epoch=false", *(QUICK_OVERRIDES if quick else []),
                                *([f"train.epochs={epochs}"] if epochs is not None else [])])


def demo(workdir: str | Path = "demo_run", quick: bool = False, epochs: int | None = None) -> dict:
    """The whole pipeline; ``epochs`` overrides the preset's pretraining length (5 epochs).

    The config is checked first; then the run folder is held (a second demo in ``workdir`` is refused
    before it touches anything), emptied if an earlier demo made it, and the toy world generated.
    """
    workdir = Path(workdir)
    cfg = demo_config(workdir, quick, epochs)
    with run_folder(cfg.train.output_dir, "demo", fresh=True):
        return _demo(workdir, cfg, quick)


def _demo(workdir: Path, cfg: Config, quick: bool) -> dict:
    start = time.perf_counter()
    make_toy_data(workdir / "toy_data", seed=0, num_videos=QUICK_VIDEOS if quick else None)
    run = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)

    print(f"1/3 evaluating the untrained tiny model on {cfg.data.egomcq}")
    untrained = create_model(cfg.model)
    before = evaluate_egomcq(untrained, cfg, torch.device("cpu"))
    print(f"2/3 pretraining the tiny model ({cfg.train.epochs} epochs) into {run}")
    pretrain(cfg)
    print("3/3 evaluating the pretrained model")
    pretrained = SViTTEgo.from_pretrained(run / "model")
    multimodal = multimodal_report(pretrained, cfg, torch.device("cpu"), run)
    after = multimodal["egomcq"]["dual"]
    figure = demo_figure(untrained, pretrained, cfg, workdir / "figure1.png")
    elapsed = time.perf_counter() - start

    print("\n" + format_egomcq({"before (%)": before, "after (%)": after, "chance (%)": CHANCE}))
    print("\nThe multimodal encoder:\n" + format_multimodal_report(multimodal))
    print(f"\n{elapsed / 60:.1f} minutes in all. Checkpoints, TensorBoard logs and metrics.jsonl: {run}")
    print(f"Figure 1, the video patches node sparsity keeps before and after pretraining: {figure}")
    result = {"before": before, "after": after, "multimodal": multimodal, "minutes": elapsed / 60}
    atomic_write_text(workdir / "demo_results.json", json.dumps(result, indent=2, allow_nan=False))
    return result
