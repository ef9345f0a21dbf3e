"""``svitt-ego demo --task nlq``: natural language queries on the synthetic world, on a CPU.

Takes the pretraining demo's model (running that demo first when it is missing), extracts
window features of the toy NLQ clips, trains the grounding model on the training split and
evaluates it on the held-out split beside two baselines: the best fixed window (one interval,
as a fraction of the clip, fitted on the training split) and the dual encoder's zero-shot
moments. Everything is scored by :func:`svitt_ego.nlq.evaluate_nlq`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from svitt_ego.atomic import atomic_write_json
from svitt_ego.demo import demo
from svitt_ego.device import pick_device
from svitt_ego.nlq.annotations import load_json, read_nlq
from svitt_ego.nlq.features import NLQFeatures, extract_nlq_features
from svitt_ego.nlq.metric import evaluate_nlq, make_submission
from svitt_ego.nlq.search import fixed_window_baseline, fixed_window_results, load_dual_encoder, zero_shot_results
from svitt_ego.nlq.train import Stage, TrainSettings, predict_moments, train_nlq
from svitt_ego.run_folder import run_folder

EPOCHS, QUICK_EPOCHS = 38, 0  # after the 2 warm-up epochs: 40 and 2 in all
# A smaller grounding model than the paper's (hidden 64, 3 levels: the toy moments span at most
# 5 windows) and larger batches than GroundNLQ's keep the demo within minutes on 2 CPU cores. The
# learning rate, the length and no label smoothing (GroundNLQ's 0.1; its drop path 0.1 is kept)
# were chosen on a validation split of the toy training videos (benchmarks/nlq_seeds.py --validation):
# the demo's own settings, not GroundNLQ's Ego4D recipe (svitt_ego.nlq.recipe).
TOY_SETTINGS = TrainSettings(model={"hidden": 64, "levels": 3, "label_smoothing": 0.0})
TOY_STAGE = {"lr": 5e-4, "batch_size": 16, "warmup_epochs": 2}


def toy_stage(annotations: list, epochs: int = EPOCHS, **changes) -> Stage:
    """A training stage with the demo's schedule (``changes`` given as None keep it)."""
    return Stage([str(a) for a in annotations], epochs, **{**TOY_STAGE, **{k: v for k, v in changes.items()
                                                                          if v is not None}})
METRICS = ("R@1 IoU=0.3", "R@5 IoU=0.3", "R@1 IoU=0.5", "R@5 IoU=0.5", "mIoU")


def _pretrained(workdir: Path, quick: bool, device: torch.device) -> Path:
    model = workdir / "run" / "model"
    if not (model.is_dir() and (workdir / "toy_data" / "manifest.json").exists()):
        print("no pretrained demo model yet: running the pretraining demo first")
        demo(workdir, quick=quick, device=str(device))
    return model


def _table(rows: dict) -> str:
    lines = [f"{'NLQ val (%)':22s}" + "".join(f"{m:>13s}" for m in METRICS)]
    lines += [f"{name:22s}" + "".join(f"{r[m]:>13.1f}" for m in METRICS) for name, r in rows.items()]
    return "\n".join(lines)


def demo_nlq(workdir: str | Path = "demo_run", quick: bool = False, device: str | None = None) -> dict:
    """The NLQ demo on ``device`` (:func:`pick_device`; the zero-shot baseline runs on the CPU); it holds
    the pretraining demo's run folder while it reads the model there."""
    workdir, device = Path(workdir), pick_device(device)
    with run_folder(workdir / "run", "demo"):
        return _demo_nlq(workdir, quick, device)


def _demo_nlq(workdir: Path, quick: bool, device: torch.device) -> dict:
    model_dir = _pretrained(workdir, quick, device)
    start = time.perf_counter()
    data, out = workdir / "toy_data", workdir / "nlq"
    train_file, val_file = data / "nlq_train.json", data / "nlq_val.json"
    print(f"1/3 extracting window features of the toy NLQ clips into {out / 'features'}")
    extract_nlq_features(model_dir, [train_file, val_file], data / "videos", out / "features", batch_size=128,
                         device=str(device))
    extracted = time.perf_counter()
    features, train, val = NLQFeatures(out / "features"), read_nlq(train_file), read_nlq(val_file)
    val_json = load_json(val_file)

    rows = {"fixed window": evaluate_nlq(val_json, make_submission(
        fixed_window_results(val, fixed_window_baseline(train))))}
    rows["zero-shot dual encoder"] = evaluate_nlq(val_json, make_submission(
        zero_shot_results(load_dual_encoder(features), features, val)))
    epochs = QUICK_EPOCHS if quick else EPOCHS
    print(f"2/3 training the grounding model ({TOY_STAGE['warmup_epochs']} + {epochs} epochs) into {out / 'run'}")
    with run_folder(out / "run", "demo", fresh=True):  # afresh every time, in a folder the demo made
        model = train_nlq(out / "features", [toy_stage([train_file], epochs)], out / "run", TOY_SETTINGS,
                          device=device)
    print("3/3 predicting the held-out queries")
    submission = make_submission(predict_moments(model, features, val.queries, val.clips, device=device))
    atomic_write_json(out / "submission_val.json", submission)
    rows["grounding model"] = evaluate_nlq(val_json, submission)
    elapsed = time.perf_counter() - start

    print("\n" + _table(rows))
    fixed = rows["fixed window"]["R@1 IoU=0.3"]
    ratio = rows["grounding model"]["R@1 IoU=0.3"] / fixed if fixed else float("inf")
    print(f"\n{len(train.queries)} training and {len(val.queries)} held-out queries; "
          f"{elapsed / 60:.1f} minutes after pretraining ({(extracted - start) / 60:.1f} of them extracting "
          f"features); R@1 IoU=0.3 is {ratio:.1f}x the fixed window's")
    result = {**rows, "minutes": elapsed / 60, "extract_minutes": (extracted - start) / 60,
              "ratio_to_fixed_window": ratio}
    atomic_write_json(workdir / "nlq_results.json", result)
    return result
