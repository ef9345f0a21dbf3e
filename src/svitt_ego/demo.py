"""``svitt-ego demo``: the whole pipeline on the synthetic egocentric world, on a CPU, in minutes.

Generate the toy dataset (if absent), evaluate the untrained ``tiny`` model on
its EgoMCQ, pretrain it with edge and node sparsity on, evaluate again, and
print the before / after accuracies, then what the multimodal encoder learned
(EgoMCQ by each score, held-out VTM and MLM checks: :mod:`svitt_ego.fusion_checks`) and the zero-shot
EK-100 MIR and Charades-Ego figures of both models on the toy analogues, beside chance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from svitt_ego.atomic import atomic_write_text
from svitt_ego.eval.charades_ego import VideoReader, chance_map, evaluate_charades_ego, read_charades_annotations
from svitt_ego.config import Config, load_config
from svitt_ego.data.toy import toy_data_overrides
from svitt_ego.device import pick_device
from svitt_ego.data.toy_benchmarks import make_toy_world
from svitt_ego.eval.epic_mir import (RELEVANCY_PKL, ClipReader, chance_scores, evaluate_epic_mir, format_epic_mir,
                                     load_relevancy, read_mir_annotations)
from svitt_ego.eval.egomcq import CHANCE, evaluate_egomcq, format_egomcq
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
    # EgoMCQ runs once before and once after pretraining, not after every epoch; one step-*.pt is kept
    # beside last.pt and best.pt (the preset keeps two; each holds the model and AdamW's state, 171 MB).
    return load_config("tiny", [*toy_data_overrides(workdir / "toy_data"), f"train.output_dir={workdir / 'run'}",
                                "train.eval_every_epoch=false", "train.keep_checkpoints=1",
                                *(QUICK_OVERRIDES if quick else []),
                                *([f"train.epochs={epochs}"] if epochs is not None else [])])


def zero_shot_report(models: dict[str, SViTTEgo], cfg: Config, data: Path,
                     device: torch.device = torch.device("cpu")) -> dict:
    """Zero-shot EK-100 MIR (4 frames) and Charades-Ego (16 frames, the model re-inflated) on the toy
    analogues under ``data`` for each named model (on ``device``), and chance computed from their labels."""
    mir, charades = read_mir_annotations(data / "epic_mir"), read_charades_annotations(data / "charades_ego")
    relevancy = load_relevancy(data / "epic_mir" / RELEVANCY_PKL, (len(mir.clips), len(mir.columns)))
    report = {}
    for name, model in models.items():
        sixteen = SViTTEgo.from_state_dict(model.config, model.state_dict(), name, {"vision": {"num_frames": 16}})
        report[name] = {
            "epic_mir": evaluate_epic_mir(model, cfg, device, mir, relevancy,
                                          ClipReader(data / "epic_mir" / "videos", "videos", 4)),
            "charades_ego": evaluate_charades_ego(sixteen.to(device), cfg, device, charades,
                                                  VideoReader(data / "charades_ego" / "videos", 16))["mAP"]}
    report["chance"] = {"epic_mir": chance_scores(relevancy), "charades_ego": chance_map(charades.labels())}
    return report


def format_zero_shot(report: dict) -> str:
    """The EK-100 MIR table and the Charades-Ego mAP of :func:`zero_shot_report`, one row per model."""
    mir = format_epic_mir({f"{name} (%)": r["epic_mir"] for name, r in report.items()})
    charades = [f"{'Charades-Ego':16s}{'mAP':>11s}"]
    charades += [f"{name + ' (%)':16s}{r['charades_ego']:>11.1f}" for name, r in report.items()]
    return mir + "\n\n" + "\n".join(charades)


def demo(workdir: str | Path = "demo_run", quick: bool = False, epochs: int | None = None,
         device: str | None = None) -> dict:
    """The whole pipeline on ``device`` (:func:`pick_device`); ``epochs`` overrides the preset's pretraining
    length (5 epochs).

    The config is checked first; then the run folder is held (a second demo in ``workdir`` is refused
    before it touches anything), emptied if an earlier demo made it, and the toy world generated.
    """
    workdir = Path(workdir)
    cfg, device = demo_config(workdir, quick, epochs), pick_device(device)
    with run_folder(cfg.train.output_dir, "demo", fresh=True):
        return _demo(workdir, cfg, quick, device)


def _demo(workdir: Path, cfg: Config, quick: bool, device: torch.device) -> dict:
    start = time.perf_counter()
    make_toy_world(workdir / "toy_data", seed=0, num_videos=QUICK_VIDEOS if quick else None)
    run = Path(cfg.train.output_dir)
    torch.manual_seed(cfg.train.seed)

    print(f"1/3 evaluating the untrained tiny model on {cfg.data.egomcq}")
    untrained = create_model(cfg.model).to(device)
    before = evaluate_egomcq(untrained, cfg, device)
    print(f"2/3 pretraining the tiny model ({cfg.train.epochs} epochs) into {run}")
    pretrain(cfg, device=str(device))
    print("3/3 evaluating the pretrained model")
    pretrained = SViTTEgo.from_pretrained(run / "model").to(device)
    multimodal = multimodal_report(pretrained, cfg, device, run)
    after = multimodal["egomcq"]["dual"]
    zero_shot = zero_shot_report({"untrained": untrained, "pretrained": pretrained}, cfg, workdir / "toy_data",
                                 device)
    figure = demo_figure(untrained, pretrained, cfg, workdir / "figure1.png")
    elapsed = time.perf_counter() - start

    print("\n" + format_egomcq({"before (%)": before, "after (%)": after, "chance (%)": CHANCE}))
    print("\nThe multimodal encoder:\n" + format_multimodal_report(multimodal))
    print("\nZero-shot on the toy EK-100 MIR and Charades-Ego:\n" + format_zero_shot(zero_shot))
    print(f"\n{elapsed / 60:.1f} minutes in all. Checkpoints, TensorBoard logs and metrics.jsonl: {run}")
    print(f"Figure 1, the video patches node sparsity keeps before and after pretraining: {figure}")
    result = {"before": before, "after": after, "multimodal": multimodal, "zero_shot": zero_shot,
              "minutes": elapsed / 60}
    atomic_write_text(workdir / "demo_results.json", json.dumps(result, indent=2, allow_nan=False))
    return result
