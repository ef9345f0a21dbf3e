"""Whole pretraining steps at the paper's setting: peak GPU memory and clips per second per preset,
beside a plain dense ViT-B/16 measured in the same run.

    python benchmarks/train_step.py                  # on CUDA: the default runs below, in one run
    python benchmarks/train_step.py --device cpu --runs tiny:4 vit_b:4 --steps 2 --image-size 64 \
        --anchor-width 64 --anchor-depth 2 --anchor-heads 2

Runs:
  PRESET:FRAMES[:ckpt]          the whole step (``ckpt``: activation checkpointing). The real step:
                                8 clips + 8 scene-aware hard negatives per GPU at 224 x 224, text
                                length 32, EgoNCE + VTM + MLM through
                                :class:`svitt_ego.train.PretrainingObjective`, AdamW, FP16 autocast
                                with a gradient scaler.
  encoder:PRESET:FRAMES[:ckpt]  the preset's video encoder alone: forward, backward and AdamW step.
  vit_b:FRAMES                  the anchor: a plain dense ViT-B/16 (12 layers, width 768, 12 heads,
                                pre-norm, ``F.scaled_dot_product_attention``, no bias) on the same
                                1 + FRAMES * 196 tokens and batch, forward, backward and AdamW step.
Inputs are random and the weights randomly initialised (memory and speed do not depend on them).
clips/s counts the 16 clips of a step; ``x ViT-B`` is the ratio to ``vit_b`` at the same frame count
(clips/s and peak memory), ``x dense`` the whole step's clips/s over the ``dense`` preset's. A run
that fails (e.g. out of memory) prints its error and the others go on. AdamW is fused on CUDA for
the encoder and anchor runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from svitt_ego.config import load_config
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.models import SViTTEgo, VideoEncoder
from svitt_ego.train import PretrainingObjective, parameter_groups

DEFAULT_RUNS = ["vit_b:4", "svitt_ego_kr3:4", "svitt_ego_kr5:4", "dense:4", "svitt_ego_kr3:4:ckpt",
                "svitt_ego_kr5:4:ckpt", "encoder:svitt_ego_kr3:4", "encoder:dense:4",
                "vit_b:16", "svitt_ego_kr3:16", "dense:16", "encoder:svitt_ego_kr3:16"]


class DenseViTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class DenseViT(nn.Module):
    """The anchor: ViT/16 over the patches of every frame behind one [CLS]; returns the [CLS] state."""

    def __init__(self, width: int, depth: int, heads: int, patch_size: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(*(DenseViTBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        B = frames.shape[0]
        x = self.patch_embed(frames.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(B, -1, self.cls_token.shape[-1])
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        return self.norm(self.blocks(x))[:, 0]


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

    return measure(step, 2 * clips, steps, device)


def run_alone(spec: str, clips: int, steps: int, device, image_size: int, anchor: tuple[int, int, int]):
    """``encoder:PRESET:FRAMES[:ckpt]`` or ``vit_b:FRAMES``: one encoder's forward, backward and AdamW step."""
    kind, *rest = spec.split(":")
    if kind == "vit_b":
        frames = int(rest[0])
        model = DenseViT(*anchor).to(device).train()
    else:
        preset, frames, *flags = rest
        frames = int(frames)
        cfg = load_config(preset, [f"model.vision.num_frames={frames}", f"model.vision.image_size={image_size}",
                                   f"model.vision.grad_checkpointing={'ckpt' in flags}"])
        model = VideoEncoder(cfg.model.vision).to(device).train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    batch = torch.randn(2 * clips, frames, 3, image_size, image_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            out = model(batch)
            pooled = out if kind == "vit_b" else out.pooled
        scaler.scale(pooled.float().square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, 2 * clips, steps, device)


def measure(step, clips_per_step: int, steps: int, device) -> tuple[float, float]:
    """Peak GB (CUDA) and clips per second of ``steps`` steps after two warm-up steps."""
    cuda = device.type == "cuda"
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
    return peak, clips_per_step / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    parser.add_argument("--clips", type=int, default=8, help="clips per step (each with a hard negative)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--image-size", type=int, default=224, help="of the encoder and anchor runs")
    parser.add_argument("--anchor-width", type=int, default=768)
    parser.add_argument("--anchor-depth", type=int, default=12)
    parser.add_argument("--anchor-heads", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    anchor = (args.anchor_width, args.anchor_depth, args.anchor_heads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.clips} clips + {args.clips} negatives per step, "
          f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'}; anchor: dense ViT {anchor[0]} wide, "
          f"{anchor[1]} layers, {anchor[2]} heads")
    results = {}
    for spec in args.runs:
        try:
            if spec.startswith(("encoder:", "vit_b:")):
                results[spec] = run_alone(spec, args.clips, args.steps, device, args.image_size, anchor)
            else:
                results[spec] = run(spec, args.clips, args.steps, device)
        except (RuntimeError, ValueError) as error:  # out of memory, a kernel that does not compile, ...
            print(f"{spec}: failed: {str(error).splitlines()[0][:200]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last run's model and optimizer are gone; start the next one clean
    print(f"{'run':>28} {'peak GB':>8} {'clips/s':>8} {'x ViT-B':>8} {'GB x ViT-B':>10} {'x dense':>8}")
    for spec, (peak, speed) in results.items():
        frames = _frames(spec)
        vit = results.get(f"vit_b:{frames}")
        dense = results.get(f"dense:{frames}") if not spec.startswith(("encoder:", "vit_b:")) else None
        print(f"{spec:>28} {peak:>8.2f} {speed:>8.1f} {_ratio(speed, vit and vit[1]):>8} "
              f"{_ratio(peak, vit and vit[0]):>10} {_ratio(speed, dense and dense[1]):>8}")


def _frames(spec: str) -> str:
    parts = spec.split(":")
    return parts[2] if parts[0] == "encoder" else parts[1]


def _ratio(value: float, anchor: float | None) -> str:
    return f"{value / anchor:.2f}" if anchor and anchor == anchor else "-"


if __name__ == "__main__":
    main()
