"""Whole pretraining steps at the paper's setting: peak GPU memory and clips per second per preset,
beside a plain dense ViT-B/16 measured in the same run.

    python benchmarks/train_step.py                  # on CUDA: the default runs below, in one run
    python benchmarks/train_step.py --device cpu --runs vit_b:4 tiny:4 --steps 2 --image-size 64 \
        --anchor-width 64 --anchor-depth 2 --anchor-heads 2

Runs:
  PRESET:FRAMES[:ckpt]          the whole step (``ckpt``: activation checkpointing). The real step:
                                8 clips + 8 scene-aware hard negatives per GPU at 224 x 224, text
                                length 32, EgoNCE + VTM + MLM through
                                :class:`svitt_ego.objective.PretrainingObjective` and the
                                trainer's own ``optimizer_step`` (fused AdamW, FP16 autocast
                                with a gradient scaler, gradient clipping).
  encoder:PRESET:FRAMES[:ckpt]  the preset's video encoder alone: forward, backward and AdamW step.
  vit_b:FRAMES                  the anchor: a plain dense ViT-B/16 (12 layers, width 768, 12 heads,
                                pre-norm, ``F.scaled_dot_product_attention``, no bias) on the same
                                1 + FRAMES * 196 tokens and batch, forward, backward and AdamW step.
Inputs are random and the weights randomly initialised (memory and speed do not depend on them);
the tokenizer is a generated WordPiece vocabulary of the preset's size with BERT's special ids (no
text package needed). ``--image-size`` applies to every run, ``--set KEY=VALUE ...`` to every preset
(e.g. a smaller model for a CPU check). clips/s counts the 16 clips of a step; ``x ViT-B`` is the
ratio to ``vit_b`` at the same frame count (clips/s and peak memory), ``x dense`` the whole step's
clips/s over the ``dense`` preset's, each against an anchor measured earlier in the run (the
defaults measure the anchors first). Each row is printed as soon as it is measured and, with
``--results FILE``, appended to FILE as one JSON line. A run that fails (out of memory, a kernel
that does not compile, any exception) prints its error as its row and the others go on. AdamW is
fused on CUDA for the encoder and anchor runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from svitt_ego.atomic import append_jsonl
from svitt_ego.config import load_config
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.models import SViTTEgo, VideoEncoder
from svitt_ego.objective import PretrainingObjective
from svitt_ego.train import build_optimizer, optimizer_step

DEFAULT_RUNS = ["vit_b:4", "dense:4", "svitt_ego_kr3:4", "svitt_ego_kr5:4", "svitt_ego_kr3:4:ckpt",
                "svitt_ego_kr5:4:ckpt", "encoder:svitt_ego_kr3:4", "encoder:dense:4",
                "vit_b:16", "dense:16", "svitt_ego_kr3:16", "encoder:svitt_ego_kr3:16"]
# BERT's uncased WordPiece layout: [PAD] 0, [unused*], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, words.
SPECIAL_TOKENS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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


def random_batch(cfg, tokenizer, clips: int, text_length: int, device) -> dict:
    v, n = cfg.model.vision, 2 * clips
    ids = torch.randint(len(SPECIAL_TOKENS), cfg.model.text.vocab_size, (n, text_length), device=device)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return {"frames": torch.randn(n, v.num_frames, 3, v.image_size, v.image_size, device=device),
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "nouns": torch.randint(0, 582, (n, 2), device=device), "verbs": torch.randint(0, 118, (n, 1), device=device),
            "clip_idx": torch.arange(n, device=device)}


def write_vocab(folder: Path, size: int) -> Path:
    """A WordPiece ``vocab.txt`` of ``size`` entries in ``folder``: BERT's special tokens at BERT's ids,
    then placeholder words."""
    words = [*SPECIAL_TOKENS, *(f"word{i}" for i in range(size - len(SPECIAL_TOKENS)))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def run(spec: str, clips: int, steps: int, device, image_size: int, extra: list[str]) -> tuple[float, float]:
    """One of the presets' whole training steps, through the trainer's own :func:`optimizer_step`."""
    preset, frames, *flags = spec.split(":")
    overrides = [f"model.vision.num_frames={frames}", f"model.vision.image_size={image_size}",
                 "model.text.pretrained=null", f"model.vision.grad_checkpointing={'ckpt' in flags}",
                 f"train.precision={'fp16' if device.type == 'cuda' else 'fp32'}", *extra]
    cfg = load_config(preset, overrides)
    with tempfile.TemporaryDirectory() as folder:
        vocab = write_vocab(Path(folder), cfg.model.text.vocab_size)
        tokenizer = load_tokenizer(dataclasses.replace(cfg.model.text, tokenizer=str(vocab)))
    model = SViTTEgo(cfg.model).to(device).train()
    objective = PretrainingObjective(model, cfg, tokenizer).to(device)
    optimizer, scheduler, scaler = build_optimizer(model, cfg, device, total_steps=steps + 2, steps_per_epoch=1)
    batch = random_batch(cfg, tokenizer, clips, cfg.model.text.max_length, device)

    def step():
        optimizer_step(objective, optimizer, scaler, scheduler, batch, cfg)

    return measure(step, 2 * clips, steps, device)


def run_alone(spec: str, clips: int, steps: int, device, image_size: int, extra: list[str],
              anchor: tuple[int, int, int]) -> tuple[float, float]:
    """``encoder:PRESET:FRAMES[:ckpt]`` or ``vit_b:FRAMES``: one encoder's forward, backward and AdamW step."""
    kind, *rest = spec.split(":")
    if kind == "vit_b":
        frames = int(rest[0])
        model = DenseViT(*anchor).to(device).train()
    else:
        preset, frames, *flags = rest
        frames = int(frames)
        cfg = load_config(preset, [f"model.vision.num_frames={frames}", f"model.vision.image_size={image_size}",
                                   f"model.vision.grad_checkpointing={'ckpt' in flags}", *extra])
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
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides of every preset")
    parser.add_argument("--anchor-width", type=int, default=768)
    parser.add_argument("--anchor-depth", type=int, default=12)
    parser.add_argument("--anchor-heads", type=int, default=12)
    parser.add_argument("--results", help="append every row to this file as one JSON line")
    args = parser.parse_args()
    device = torch.device(args.device)
    anchor = (args.anchor_width, args.anchor_depth, args.anchor_heads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.clips} clips + {args.clips} negatives per step, "
          f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'}; anchor: dense ViT {anchor[0]} wide, "
          f"{anchor[1]} layers, {anchor[2]} heads")
    print(f"{'run':>28} {'peak GB':>8} {'clips/s':>8} {'x ViT-B':>8} {'GB x ViT-B':>10} {'x dense':>8}")
    results = {}
    for spec in args.runs:
        row = {"part": "train_step", "device": name, "run": spec, "clips": 2 * args.clips, "steps": args.steps}
        try:
            if spec.startswith(("encoder:", "vit_b:")):
                peak, speed = run_alone(spec, args.clips, args.steps, device, args.image_size, args.set, anchor)
            else:
                peak, speed = run(spec, args.clips, args.steps, device, args.image_size, args.set)
        except Exception as error:  # noqa: BLE001 - out of memory, a kernel that does not compile, ...: go on
            row["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
            print(f"{spec:>28} failed: {row['error']}")
        else:
            results[spec] = peak, speed
            frames = _frames(spec)
            vit = results.get(f"vit_b:{frames}")
            dense = results.get(f"dense:{frames}") if not spec.startswith(("encoder:", "vit_b:")) else None
            ratios = _ratio(speed, vit and vit[1]), _ratio(peak, vit and vit[0]), _ratio(speed, dense and dense[1])
            row.update(peak_gb=peak if peak == peak else None, clips_per_s=speed, x_vit_b=ratios[0],
                       gb_x_vit_b=ratios[1], x_dense=ratios[2])
            print(f"{spec:>28} {peak:>8.2f} {speed:>8.4g} {_cell(ratios[0]):>8} {_cell(ratios[1]):>10} "
                  f"{_cell(ratios[2]):>8}")
        if args.results:
            append_jsonl(args.results, row)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last run's model and optimizer are gone; start the next one clean


def _frames(spec: str) -> str:
    parts = spec.split(":")
    return parts[2] if parts[0] == "encoder" else parts[1]


def _ratio(value: float, anchor: float | None) -> float | None:
    return value / anchor if anchor and anchor == anchor else None


def _cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


if __name__ == "__main__":
    main()
