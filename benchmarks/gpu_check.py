"""The GPU check's first part: the environment, what ``auto`` picks, and the fused kernel against the
reference on realistic shapes (outputs and gradients, with their tolerances).

    python3 benchmarks/gpu_check.py --results gpu_results.jsonl          # on CUDA: the triton backend
    python3 benchmarks/gpu_check.py --device cpu --methods blocked --frames 1 --batch 1 --dtypes float32

Shapes: one attention layer of BEiT-B (``--heads`` 12 of ``--dim`` 64) over ``--frames`` frames of 14 x 14
patches behind [CLS], batch ``--batch`` (16: 8 clips + 8 hard negatives), blocks of G = ``--block-size``
(56), K_l = 1, K_r = 3; once with the positions every sample shares (a layer before the first pruning),
once with per-sample pruned positions (``--keep-rate`` of the patches, a different subset per sample).
Each backend runs in each of ``--dtypes`` on the same inputs; :func:`errors_against_reference` gives,
for the output, the [CLS] probabilities and the gradients of q, k, v and the bias table, the largest
error relative to max(1, max |reference|) against the fp32 reference; a row passes when all are within
the dtype's tolerance. Each row is printed as soon as it is measured and, with ``--results FILE``,
appended to FILE as one JSON line; a row that fails (does not compile, out of memory, any exception)
is reported with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import math
import platform

import torch

from svitt_ego.atomic import append_jsonl
from svitt_ego.models.attention import (BACKENDS, SELF_CHECK_TOLERANCE, errors_against_reference,
                                        fused_kernel_problem, sample_block_pattern)
from svitt_ego.models.position_bias import CLS_POSITION, RelativePositionBias3D

GRID = 14


def inputs(batch: int, heads: int, dim: int, frames: int, keep_rate: float, block_size: int, device):
    """q, k, v, positions, bias module and block pattern of one layer; ``keep_rate`` < 1: per-sample
    pruned positions. Drawn from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    total = frames * GRID * GRID
    n = math.ceil(keep_rate * total)
    if keep_rate < 1:
        patches = torch.stack([torch.randperm(total, generator=g)[:n].sort().values for _ in range(batch)])
    else:
        patches = torch.arange(n)[None]
    positions = torch.cat([torch.full((patches.shape[0], 1), CLS_POSITION), patches], dim=1).to(device)
    q, k, v = (torch.randn(batch, heads, 1 + n, dim, generator=g).to(device) for _ in range(3))
    rel_bias = RelativePositionBias3D(frames, GRID, heads).to(device)
    rel_bias.table.data.copy_(torch.randn(rel_bias.table.shape, generator=g))
    pattern = sample_block_pattern(n, block_size, 1, 3, generator=g, device=device)
    return q, k, v, positions, rel_bias, pattern


def environment(device: torch.device) -> dict:
    row = {"part": "environment", "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        row["triton"] = None
    if device.type == "cuda":
        row.update(device=torch.cuda.get_device_name(device),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    else:
        row["device"] = "CPU"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=["triton"], choices=sorted(set(BACKENDS) - {"reference"}))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                        choices=[str(d).removeprefix("torch.") for d in SELF_CHECK_TOLERANCE])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=56)
    parser.add_argument("--keep-rate", type=float, default=0.7, help="of the per-sample pruned positions")
    parser.add_argument("--results", help="append every row to this file as one JSON line")
    args = parser.parse_args()
    device = torch.device(args.device)

    def report(row: dict, line: str) -> None:
        print(line)
        if args.results:
            append_jsonl(args.results, row)

    env = environment(device)
    report(env, ", ".join(f"{k} {v}" for k, v in env.items() if k != "part"))
    for name in args.dtypes:
        problem = fused_kernel_problem(device, getattr(torch, name), args.dim, args.block_size)
        report({"part": "auto", "dtype": name, "head_dim": args.dim, "block_size": args.block_size,
                "backend": "triton" if problem is None else "blocked", "reason": problem},
               f"auto, {name}, head dim {args.dim}, G = {args.block_size}: "
               + ("triton (self-check passed)" if problem is None else f"blocked: {problem}"))
    names = ("out", "cls_probs", "dq", "dk", "dv", "dtable")
    print(f"{'method':>8} {'positions':>9} {'dtype':>9} {'tokens':>6} " + " ".join(f"{n:>9}" for n in names)
          + f" {'tolerance':>9}")
    for keep_rate, positions in ((1.0, "shared"), (args.keep_rate, "pruned")):
        layer = inputs(args.batch, args.heads, args.dim, args.frames, keep_rate, args.block_size, device)
        for method in args.methods:
            for name in args.dtypes:
                dtype, tokens = getattr(torch, name), layer[0].shape[2]
                row = {"part": "correctness", "method": method, "positions": positions, "dtype": name,
                       "batch": args.batch, "heads": args.heads, "head_dim": args.dim, "tokens": tokens,
                       "block_size": args.block_size, "tolerance": SELF_CHECK_TOLERANCE[dtype]}
                start = f"{method:>8} {positions:>9} {name:>9} {tokens:>6}"
                try:
                    errors = errors_against_reference(BACKENDS[method], *layer, dtype)
                except Exception as error:  # noqa: BLE001 - compilation, out of resources or memory: next row
                    row["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
                    report(row, f"{start} failed: {row['error']}")
                else:
                    row.update(errors=errors, ok=max(errors.values()) <= row["tolerance"])
                    report(row, f"{start} " + " ".join(f"{errors[n]:>9.2e}" for n in names)
                           + f" {row['tolerance']:>9.0e} {'ok' if row['ok'] else 'FAILED'}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
