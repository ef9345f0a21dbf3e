"""One attention layer of BEiT-B (12 heads of 64), forward + backward: ours against dense attention.

    python benchmarks/attention.py                     # on CUDA: 4, 8 and 16 frames, batch 16, fp16
    python benchmarks/attention.py --device cpu --frames 1 --batch 2 --methods blocked dense_bias

Methods, all in one run and on the same inputs:
  triton      our fused Triton kernel (edge sparsity, bias looked up in the kernel; CUDA only)
  flex        our FlexAttention backend (edge sparsity, bias computed in the kernel; CUDA only)
  blocked     our pure-PyTorch backend (edge sparsity, gathered key blocks)
  dense_bias  dense SDPA with the 3D relative position bias materialised (no sparsity)
  flash       dense SDPA without any bias (FlashAttention on CUDA): the anchor, one attention
              layer of a plain dense ViT-B on the same tokens; every row prints its ratio to it
Edge sparsity: K_l = 1, K_r = 3, G = 56 (the paper's). Batch 16 = 8 clips + 8 hard negatives.
Time is the median of ``--repeats`` timed iterations after warm-up; memory is the peak
allocated during one iteration beyond the inputs (CUDA only). Each row is printed as soon as it
is measured (``flash`` first, so that every row carries its ratio) and, with ``--results FILE``,
appended to FILE as one JSON line. A method that fails (does not compile, out of memory, any
exception) prints its error as its row and the others go on.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from svitt_ego.atomic import append_jsonl
from svitt_ego.models.attention import blocked_attention, dense_attention, flex_attention, triton_attention
from svitt_ego.models.block_pattern import sample_block_pattern
from svitt_ego.models.position_bias import RelativePositionBias3D

GRID, HEADS, DIM = 14, 12, 64


def flash(q, k, v, positions, rel_bias, pattern):
    return F.scaled_dot_product_attention(q, k, v), None


METHODS = {"triton": triton_attention, "flex": flex_attention, "blocked": blocked_attention,
           "dense_bias": lambda q, k, v, pos, bias, pattern: dense_attention(q, k, v, pos, bias),
           "flash": flash}


def measure(method, frames: int, batch: int, dtype, device, repeats: int) -> tuple[float, float]:
    """Median milliseconds and peak extra GiB of forward + backward."""
    n = frames * GRID * GRID
    q, k, v = (torch.randn(batch, HEADS, n + 1, DIM, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    positions = torch.arange(-1, n, device=device)[None]
    rel_bias = RelativePositionBias3D(frames, GRID, HEADS).to(device)
    torch.nn.init.normal_(rel_bias.table, std=0.02)
    pattern = sample_block_pattern(n, 56, 1, 3, generator=torch.Generator().manual_seed(0), device=device)
    grad = torch.randn(batch, HEADS, n + 1, DIM, device=device, dtype=dtype)

    def step():
        out, _ = method(q, k, v, positions, rel_bias, pattern)
        out.backward(grad)
        for t in (q, k, v, rel_bias.table):
            t.grad = None

    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            step()
            times.append((time.perf_counter() - tic) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", help="append every row to this file as one JSON line")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda_only = {"flex", "triton"} & set(args.methods)
    if device.type != "cuda" and cuda_only:
        raise SystemExit(f"{', '.join(sorted(cuda_only))} needs CUDA (FlexAttention has no CPU backward, Triton "
                         "runs on the CPU only in its slow interpreter); pick --methods without it")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, {HEADS} heads x {DIM}, "
          f"K_l=1 K_r=3 G=56, forward + backward")
    print(f"{'frames':>6} {'tokens':>6} {'method':>10} {'ms':>8} {'GiB':>7} {'x flash ms':>10} {'x flash GiB':>11}")
    methods = sorted(args.methods, key=lambda m: m != "flash")  # the anchor first
    for frames in args.frames:
        tokens, flash_row = 1 + frames * GRID * GRID, None
        for m in methods:
            row = {"part": "attention", "device": name, "dtype": args.dtype, "batch": args.batch, "frames": frames,
                   "tokens": tokens, "method": m}
            try:
                ms, gib = measure(METHODS[m], frames, args.batch, dtype, device, args.repeats)
            except Exception as error:  # noqa: BLE001 - report any failure (compilation, memory) and go on
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
                print(f"{frames:>6} {tokens:>6} {m:>10} failed: {row['error']}")
            else:
                flash_row = (ms, gib) if m == "flash" else flash_row
                ratio_ms = ms / flash_row[0] if flash_row else None
                ratio_gib = gib / flash_row[1] if flash_row and flash_row[1] > 0 else None  # NaN > 0 is False
                row.update(ms=ms, gib=gib if gib == gib else None, x_flash_ms=ratio_ms, x_flash_gib=ratio_gib)
                print(f"{frames:>6} {tokens:>6} {m:>10} {ms:>8.2f} {gib:>7.2f} {_cell(ratio_ms):>10} "
                      f"{_cell(ratio_gib):>11}")
            if args.results:
                append_jsonl(args.results, row)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"

if __name__ == "__main__":
    main()
