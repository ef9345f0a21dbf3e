"""Whole pretraining steps at the paper's setting: peak GPU memory and clips per second per preset.

    python benchmarks/train_step.py                  # on CUDA: the table below, in one run
    python benchmarks/train_step.py --device cpu --runs tiny:4 --steps 2

Each run is ``PRESET:FRAMES[:ckpt]`` (``ckpt`` turns on activation checkpointing). A step is
the real one: 8 clips + 8 scene-aware hard negatives per GPU at 224 x 224, text length 32,
EgoNCE + VTM + MLM through :class:`svitt_ego.train.PretrainingObjective`, AdamW, FP16
autocast with a gradient scaler. Inputs are random and the weights randomly initialised
(memory and speed do not depend on them). clips/s counts the 16 clips of a step.
"""

from __future__ import annotations

import argparse
import time

import torch

from svitt_ego.config import load_config
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.models import SViTTEgo
from svitt_ego.train import PretrainingObjective, parameter_groups

DEFAULT_RUNS = ["svitt_ego_kr3:4", "svitt_ego_kr5:4", "dense:4", "svitt_ego_kr3:4:ckpt", "svitt_ego_kr5:4:ckpt",
                "svitt_ego_kr3:8", "dense:8", "svitt_ego_kr3:16", "dense:16"]


def random_batch(cfg, clips: int, text_length: int, device) -> dict:
    v, n = cfg.model.vision, 2 * clips
    ids = torch.randint(1000, 29000, (n, text_length), device=device)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"frames": torch.randn(n, v.num_frames, 3, v.image_size, v.image_size, device=device),
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "nouns": torch.randint(0, 582, (n, 2), device=device), "verbs": torch.randint(0, 118, (n, 1), device=device),
            "clip_idx": torch.arange(n, device=device)}


def run(spec: str, clips: int, steps: int, device) -> tuple[float, float]:
    preset, frames, *flags = spec.split(":")
    overrides = [f"model.vision.num_frames={frames}", "model.text.tokenizer=minilm",
                 f"model.vision.grad_checkpointing={'ckpt' in flags}"]
    cfg = load_config(preset, overrides)
    model = SViTTEgo(cfg.model).to(device).train()
    objective = PretrainingObjective(model, cfg, load_tokenizer(cfg.model.text))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    batch = random_batch(cfg, clips, cfg.model.text.max_length, device)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = objective(batch)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - tic) / steps
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    return peak, 2 * clips / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    parser.add_argument("--clips", type=int, default=8, help="clips per step (each with a hard negative)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.clips} clips + {args.clips} negatives per step, "
          f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"{'run':>24} {'peak GB':>8} {'clips/s':>8} {'x dense':>8}")
    results = {}
    for spec in args.runs:
        results[spec] = run(spec, args.clips, args.steps, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last run's model and optimizer are gone; start the next one clean
    for spec, (peak, speed) in results.items():
        frames = spec.split(":")[1]
        dense = results.get(f"dense:{frames}")
        ratio = f"{speed / dense[1]:.2f}" if dense else "-"
        print(f"{spec:>24} {peak:>8.2f} {speed:>8.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
