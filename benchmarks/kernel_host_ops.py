"""Host-side cost of the ``triton`` attention path: aten ops and host time per layer, kernels stubbed out.

Every Triton launch of :mod:`svitt_ego.models.sparse_attention_triton` is replaced by a no-op (with
``TRITON_INTERPRET=1``, under which the operators of :mod:`svitt_ego.models.ops` take the kernel path
on the CPU rather than the blocked math), so what remains is what the host does around the kernels:
allocations, layout glue, autograd. One attention layer runs forward + backward from its q, k, v
(and bias table) to its output and ``cls_probs``, with positions shared by the batch (unpruned) and
per sample (pruned); ``torch.profiler`` counts every aten op it records, nested ones included. The block pattern is an
input (the encoder draws it once for all layers). Beside it, PyTorch's SDPA forward + backward on
one head of 17 tokens, so that its time on the CPU is mostly the host's too.

    PYTHONPATH=src python benchmarks/kernel_host_ops.py
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernel path on the CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from svitt_ego.models import sparse_attention_triton as kernels  # noqa: E402
from svitt_ego.models.attention import triton_attention  # noqa: E402
from svitt_ego.models.block_pattern import sample_block_pattern  # noqa: E402
from svitt_ego.models.position_bias import RelativePositionBias3D  # noqa: E402

GRID, G = 14, 56
KERNELS = ["_forward_kernel", "_cls_forward_kernel", "_pattern_kernel", "_cls_backward_kernel",
           "_backward_key_kernel", "_cast_kernel"]


class _Stub:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def layer_inputs(batch, heads, frames, dim, keep, per_sample, dtype=torch.float32):
    """q, k, v, positions, bias and pattern of one layer of the model (G = 56, K_l = 1, K_r = 3) on
    ``ceil(keep * frames * 14 * 14)`` patch tokens, their positions drawn per sample or shared."""
    total = frames * GRID * GRID
    n = math.ceil(keep * total)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randperm(total, generator=gen)[:n].sort().values for _ in range(batch if per_sample else 1)]
    positions = torch.cat([torch.full((len(rows), 1), -1), torch.stack(rows)], dim=1)
    q, k, v = (torch.randn(batch, heads, n + 1, dim, generator=gen, dtype=dtype).requires_grad_()
               for _ in range(3))
    bias = RelativePositionBias3D(frames, GRID, heads)
    pattern = sample_block_pattern(n, G, 1, 3, generator=gen)
    return q, k, v, positions, bias, pattern


def triton_step(grad, q, k, v, positions, bias, pattern):
    out, _ = triton_attention(q, k, v, positions, bias, pattern)
    out.backward(grad)


def sdpa_step(grad, q, k, v, *_):
    F.scaled_dot_product_attention(q, k, v).backward(grad)


def _fresh(inputs):
    """The step's arguments with the output's gradient first; no ``.grad`` left from an earlier step."""
    for t in (*inputs[:3], inputs[4].table):
        t.grad = None
    return (torch.ones_like(inputs[0]), *inputs)


def aten_ops(step, inputs) -> Counter:
    step(*_fresh(inputs))  # warm up
    args = _fresh(inputs)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*args)
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


def host_ms(step, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        args = _fresh(inputs)
        start = time.perf_counter()
        step(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--verbose", action="store_true", help="list the aten ops")
    args = parser.parse_args()
    for name in KERNELS:
        setattr(kernels, name, _Stub())
    dtype = getattr(torch, args.dtype)
    print(f"batch {args.batch}, {args.heads} heads, {args.frames} frame(s) of {GRID}x{GRID}, head dim {args.dim}, "
          f"{args.dtype}, CPU, Triton kernels stubbed out")
    print(f"{'path':<40} {'aten ops':>8} {'host ms':>8}")
    for label, step, per_sample in [("triton, positions shared (unpruned)", triton_step, False),
                                    ("triton, per-sample positions (pruned)", triton_step, True),
                                    ("SDPA, 1 x 1 x 17 tokens", sdpa_step, False)]:
        inputs = layer_inputs(args.batch, args.heads, args.frames, args.dim, 0.7 if per_sample else 1.0, per_sample,
                              dtype)
        if step is sdpa_step:
            inputs = tuple(t[:1, :1, :17].detach().requires_grad_() for t in inputs[:3]) + inputs[3:]
        ops = aten_ops(step, inputs)
        print(f"{label:<40} {sum(ops.values()):>8} {host_ms(step, inputs, args.repeats):>8.3f}", flush=True)
        if args.verbose:
            print("    " + ", ".join(f"{name} x{c}" for name, c in ops.most_common()))


if __name__ == "__main__":
    main()
