"""The memory planner against the GPU: commit 894d359's step, predicted on the CPU beside its H200 peaks.

    git worktree add /tmp/svitt-894d359 894d359
    python benchmarks/memory_calibration.py --checkout /tmp/svitt-894d359   # the five rows, then today's
    python benchmarks/memory_calibration.py --targets                       # only the paper-setting targets
    python benchmarks/memory_calibration.py --checkout DIR --rows tiny:4 --set model.vision.image_size=64  # a smoke
    python benchmarks/memory_calibration.py --plan-gpu-rows RESULTS    # the GPU check: predictions, then
    python benchmarks/memory_calibration.py --compare RESULTS          # beside train_step.py's peaks

The planner's engine (``src/svitt_ego/memory_engine.py``, which imports nothing of svitt-ego) runs
the step of 894d359 as that commit's ``benchmarks/train_step.py`` ran it: ``SViTTEgo`` and
``PretrainingObjective`` of that checkout (its ``src`` first on ``PYTHONPATH``, one subprocess per
row), 8 clips + 8 hard negatives at 224, text length 32, the MiniLM tokenizer, plain AdamW
(``foreach``, CUDA's default), FP16 autocast and a gradient scaler, the ``blocked`` backend, after
the optimizer's state exists (the measurement reset the peak after two warm-up steps). Measured:
``torch.cuda.max_memory_allocated()`` on one H200 at that commit (benchmarks/RESULTS.md). Then the
same rows through today's planner (:func:`svitt_ego.memory.plan_memory`: the trainer's own step,
fused AdamW), and with ``--targets`` the paper's setting as the targets table reads it.

In ``benchmarks/gpu_check.sh``, ``--plan-gpu-rows`` appends today's predictions (backend ``auto``)
for the runs of ``GPU_ROWS`` to RESULTS while the GPU parts run, and ``--compare`` then appends,
for each, the peak ``benchmarks/train_step.py`` measured for the same run in the same check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "src" / "svitt_ego" / "memory_engine.py"
# 894d359 on one H200, benchmarks/train_step.py: max_memory_allocated() / 1e9 (GB).
MEASURED_GB = {"svitt_ego_kr3:4": 10.32, "svitt_ego_kr5:4": 11.78, "dense:4": 15.80, "svitt_ego_kr3:4:ckpt": 4.36,
               "svitt_ego_kr3:16": 30.30}
# The paper's setting at world size 8 (fused kernel and optimizer sharding where this build has them).
TARGETS = {"svitt_ego_kr3:4": 6.0, "svitt_ego_kr5:4": 6.5, "svitt_ego_kr3:16": 13.0}
TEXT_LENGTH, CLIPS = 32, 8
# The runs the GPU check predicts and measures (train_step.py's --runs spelling).
GPU_ROWS = ["svitt_ego_kr3:4", "svitt_ego_kr3:4:ckpt", "svitt_ego_kr5:4", "svitt_ego_kr3:16"]


def old_step(spec: str, extra: list[str]):
    """The builder of 894d359's ``train_step.py`` step for ``spec`` (PRESET:FRAMES[:ckpt]), and the
    MLM mask (size, expected count); run with that checkout's ``src`` on ``PYTHONPATH``."""
    import torch

    from svitt_ego.config import load_config
    from svitt_ego.data.tokenizer import load_tokenizer
    from svitt_ego.models import SViTTEgo
    from svitt_ego.train import PretrainingObjective, parameter_groups

    engine = _engine()
    preset, frames, *flags = spec.split(":")
    cfg = load_config(preset, [f"model.vision.num_frames={frames}", "model.text.tokenizer=minilm",
                               f"model.vision.grad_checkpointing={'ckpt' in flags}", "model.vision.backend=blocked",
                               *extra])
    with torch.device("meta"):
        model = SViTTEgo(cfg.model)
    objective = PretrainingObjective(model, cfg, load_tokenizer(cfg.model.text))
    n, v = 2 * CLIPS, cfg.model.vision

    def build(context):
        objective.to_empty(device="cpu").train()
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, foreach=True)
        scaler = torch.amp.GradScaler("cpu")
        ids = torch.zeros(n, TEXT_LENGTH, dtype=torch.long)
        batch = {"frames": torch.zeros(n, v.num_frames, 3, v.image_size, v.image_size), "input_ids": ids,
                 "attention_mask": torch.ones_like(ids), "nouns": torch.zeros(n, 2, dtype=torch.long),
                 "verbs": torch.zeros(n, 1, dtype=torch.long), "clip_idx": torch.arange(n)}

        def step():
            with context.forward_autocast(torch.float16):
                loss = objective(batch)["loss"]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        return engine.StepParts(model, optimizer, list(batch.values()), step)

    selected = max(n, round(cfg.loss.mlm_probability * n * (TEXT_LENGTH - 2)))
    return engine, build, (n * TEXT_LENGTH, selected)


def _engine():
    spec = importlib.util.spec_from_file_location("svitt_memory_engine", ENGINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def worker(spec: str, extra: list[str]) -> None:
    """One row on the old checkout: prints one JSON line."""
    tic = time.perf_counter()
    engine, build, selected = old_step(spec, extra)
    step = engine.measure_step(build, selected)
    print(json.dumps({"run": spec, "peak_bytes": step.peak_bytes, "parts": step.parts, "where": step.where,
                      "seconds": time.perf_counter() - tic}))


def predict_old(checkout: Path, spec: str, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    out = subprocess.run([sys.executable, __file__, "--worker", spec, "--set", *extra], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{spec} on {checkout}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def today(spec: str, extra: list[str], world_size: int = 1, backend: str = "blocked", more: tuple = ()):
    from svitt_ego.memory import load_plan_config, plan_memory

    preset, frames, *flags = spec.split(":")
    cfg = load_plan_config(preset, [f"model.vision.num_frames={frames}", f"train.batch_size={CLIPS}",
                                    f"model.vision.grad_checkpointing={'ckpt' in flags}",
                                    f"model.vision.backend={backend}", "train.precision=fp16", *more, *extra])
    return plan_memory(cfg, world_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, help="a checkout of commit 894d359 (git worktree add DIR 894d359)")
    parser.add_argument("--rows", nargs="+", default=list(MEASURED_GB), metavar="PRESET:FRAMES[:ckpt]",
                        help="the runs to predict (default: the five measured ones)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of every row")
    parser.add_argument("--targets", action="store_true",
                        help="print only the targets table: the paper's setting, world size 8, auto backend, "
                             "train.shard_optimizer=true")
    parser.add_argument("--plan-gpu-rows", metavar="RESULTS",
                        help="append today's predictions of the GPU check's runs to RESULTS (JSON lines)")
    parser.add_argument("--compare", metavar="RESULTS",
                        help="append predicted beside measured for the last GPU check recorded in RESULTS")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.set)
    if args.plan_gpu_rows:
        return plan_gpu_rows(args.plan_gpu_rows, args.set)
    if args.compare:
        return compare(args.compare)
    if not args.targets:
        if args.checkout is None:
            parser.error("--checkout DIR (a checkout of 894d359) is needed for the calibration rows")
        calibrate(args.checkout, args.rows, args.set)
    targets(args.set)


def calibrate(checkout: Path, rows: list[str], extra: list[str]) -> None:
    import torch

    print(f"894d359's step predicted on {os.cpu_count()} CPU cores (torch {torch.__version__}) against one H200's "
          "max_memory_allocated(); GiB")
    print(f"{'run':>22} {'predicted':>9} {'measured':>9} {'error':>7} {'peak in':>9} {'s':>5}   today's planner")
    for spec in rows:
        old = predict_old(checkout, spec, extra)
        measured = MEASURED_GB.get(spec)
        predicted = old["peak_bytes"] / 2**30
        measured_gib = measured * 1e9 / 2**30 if measured else None
        error = f"{predicted / measured_gib - 1:+.1%}" if measured_gib else "-"
        now = today(spec, extra)
        print(f"{spec:>22} {predicted:>9.2f} {measured_gib or float('nan'):>9.2f} {error:>7} {old['where']:>9} "
              f"{old['seconds']:>5.0f}   {now.peak_gib:.2f}")
        print(" " * 24 + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in old["parts"].items() if v))


def plan_gpu_rows(results: str, extra: list[str]) -> None:
    import torch

    from svitt_ego.atomic import append_jsonl

    if not torch.cuda.is_available():
        print("no CUDA device: no measured step to compare the predictions with")
        return
    for spec in GPU_ROWS:
        tic = time.perf_counter()
        try:
            plan = today(spec, extra, backend="auto")
        except Exception as error:  # noqa: BLE001 - a row that fails is reported, the next one runs
            row = {"part": "memory_plan", "run": spec, "error": f"{type(error).__name__}: {error}"[:200]}
        else:
            row = {"part": "memory_plan", "run": spec, "predicted_gib": plan.peak_gib, "backend": plan.backend,
                   "parts_gib": {k: v / 2**30 for k, v in plan.parts.items()},
                   "seconds": time.perf_counter() - tic}
        print(json.dumps(row))
        append_jsonl(results, row)


def compare(results: str) -> None:
    """Predicted beside measured, for the rows of the last check in ``results`` (after its last start row)."""
    from svitt_ego.atomic import append_jsonl

    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    last = max((i for i, row in enumerate(rows) if row.get("part") == "start"), default=-1)
    rows = rows[last + 1:]
    measured = {r["run"]: r["peak_gb"] * 1e9 / 2**30 for r in rows
                if r.get("part") == "train_step" and r.get("peak_gb")}
    for r in rows:
        if r.get("part") == "memory_plan" and "predicted_gib" in r:
            got = measured.get(r["run"])
            row = {"part": "memory_check", "run": r["run"], "backend": r["backend"],
                   "predicted_gib": r["predicted_gib"], "measured_gib": got,
                   "error": r["predicted_gib"] / got - 1 if got else None}
            print(json.dumps(row))
            append_jsonl(results, row)


def targets(extra: list[str]) -> None:
    print("targets: the paper's setting (8 clips + 8 hard negatives, fp16), world size 8, backend auto, "
          "train.shard_optimizer=true; GiB per GPU")
    print(f"{'run':>22} {'predicted':>9} {'target':>7} {'backend':>8}   parts")
    for spec, target in TARGETS.items():
        plan = today(spec, extra, world_size=8, backend="auto", more=("train.shard_optimizer=true",))
        print(f"{spec:>22} {plan.peak_gib:>9.2f} {target:>7.1f} {plan.backend:>8}   "
              + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan.parts.items() if v))


if __name__ == "__main__":
    main()
