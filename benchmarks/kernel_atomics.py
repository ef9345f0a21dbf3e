"""Global atomics of the fused kernel's backward, counted in Triton's interpreter (on the CPU).

Every ``tl.atomic_add`` the interpreter executes is counted element by element (its mask's true
entries), and attributed to the table gradient, dQ or dK / dV by the kernel source line that issued
it. One attention layer of the model (grid 14 x 14, G = 56, K_l = 1, K_r = 3, head dim 64) runs
forward + backward three ways: positions shared by the batch (the layers before the first pruning),
the same without the batch reduction (``BATCH_CHUNK = 1``: one table atomic per score element, the
kernel's scheme before the reduction), and per-sample pruned positions (q_v = 0.7).

Each program works on one head, so the counts are exactly linear in the number of heads: the
script runs ``--heads`` (default 1) and prints the counts for ``--model-heads`` (12) beside them.

    PYTHONPATH=src python benchmarks/kernel_atomics.py --frames 16 --batch 16
"""

from __future__ import annotations

import argparse
import os
import traceback
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import numpy as np  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from kernel_host_ops import layer_inputs  # noqa: E402  (benchmarks/, the script's folder)

from svitt_ego.models import ops  # noqa: E402
from svitt_ego.models import sparse_attention_triton as kernels  # noqa: E402
from svitt_ego.models.attention import triton_attention  # noqa: E402

DIM = 64
COUNTS: Counter = Counter()


def _target(line: str) -> str:
    return "table" if "dtable" in line else "dQ" if "DQ" in line else "dK/dV"


def _counting(create_atomic_rmw):
    def counted(self, rmw_op, ptr, val, mask, *args, **kwargs):
        frame = next(f for f in reversed(traceback.extract_stack()) if f.filename == kernels.__file__)
        COUNTS[_target(frame.line)] += int(np.count_nonzero(mask.data))
        return create_atomic_rmw(self, rmw_op, ptr, val, mask, *args, **kwargs)
    return counted


def count_layer(frames: int, batch: int, heads: int, keep: float, per_sample: bool) -> Counter:
    """Atomics of one layer's backward: ``keep`` of the frames x 14 x 14 patch tokens, shared or per sample."""
    q, k, v, positions, bias, pattern = layer_inputs(batch, heads, frames, DIM, keep, per_sample)
    out, _ = triton_attention(q, k, v, positions, bias, pattern)
    COUNTS.clear()
    out.sum().backward()
    return Counter(COUNTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--model-heads", type=int, default=12)
    parser.add_argument("--keep", type=float, default=0.7, help="q_v of the per-sample pruned layer")
    args = parser.parse_args()
    builder = interpreter.InterpreterBuilder
    builder.create_atomic_rmw = _counting(builder.create_atomic_rmw)
    chunk = ops.BATCH_CHUNK
    layers = [("shared positions", 1.0, False, chunk), ("shared positions, BATCH_CHUNK=1", 1.0, False, 1),
              (f"per-sample pruned, q_v={args.keep}", args.keep, True, chunk)]
    scale = args.model_heads / args.heads
    print(f"{args.frames} frames, batch {args.batch}, {args.heads} head(s) measured; x{scale:g} for "
          f"{args.model_heads} heads")
    print(f"{'layer':<34} {'table':>13} {'dQ':>13} {'dK/dV':>7} {'table, 12 heads':>16} {'all, 12 heads':>14}")
    for label, keep, per_sample, batch_chunk in layers:
        ops.BATCH_CHUNK = batch_chunk
        c = count_layer(args.frames, args.batch, args.heads, keep, per_sample)
        print(f"{label:<34} {c['table']:>13,} {c['dQ']:>13,} {c['dK/dV']:>7,} {c['table'] * scale:>16,.0f} "
              f"{sum(c.values()) * scale:>14,.0f}", flush=True)
    ops.BATCH_CHUNK = chunk


if __name__ == "__main__":
    main()
