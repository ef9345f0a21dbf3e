"""Registers and spills of the fused attention kernels, compiled ahead of time for a GPU that is not here.

Triton compiles each kernel of :mod:`svitt_ego.models.sparse_attention_triton` for the target (no
GPU needed: Triton's compiler and the ptxas it ships), for 64-row tiles (G = 56) and head dim 64 as
in the model, then ``ptxas -v`` reports registers per thread and spill bytes, and any warning
(C7515: wgmma serialised). Arguments are specialised as the JIT would for the model's tensors (12 heads, head dim 64):
pointers and the strides of q, k, v, the output and its gradient divisible by 16, the others not.

    PYTHONPATH=.triton-3.6.0:src python benchmarks/kernel_registers.py --arch 90
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from svitt_ego.models import ops
from svitt_ego.models import sparse_attention_triton as kernels

# Pointer element types other than the input dtype's; ``DTYPE`` stands for the input dtype.
POINTERS = {"LSE": "fp32", "DELTA": "fp32", "DQ": "fp32", "DTABLE": "fp32", "SLOTS": "fp32", "TABLE": "fp32",
            "SRC": "fp32", "POS": "i64", "KEY_BLOCKS": "i64", "VALID": "i1", "PAIRS": "i32"}
TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
STRIDE = re.compile(r"^s[a-z]{1,2}[bhn]$")  # strides of q, k, v, the output and its gradient


def kernel_cases(dtype: str) -> list[tuple[str, object, dict, dict]]:
    """(label, kernel, launch options, constexprs) for the model's shapes: G = 56, head dim 64, K_l + K_r = 4."""
    tile = dict(G=56, BLOCK=64, HEAD_DIM=64, BLOCK_D=64, WIDTH=4, GRID=14,
                PRECISION="ieee" if dtype == "float32" else "tf32")
    key = dict(tile, CHUNK=ops.BATCH_CHUNK, HAS_DPROBS=False)
    cls = dict(CHUNK=kernels.CLS_CHUNK, HEAD_DIM=64, BLOCK_D=64)
    backward, default = dict(num_warps=kernels.BACKWARD_WARPS), dict(num_warps=4)
    forward = {k: v for k, v in kernels.forward_options(getattr(torch, dtype)).items() if v is not None}
    return [("forward", kernels._forward_kernel, forward, tile),
            ("backward key, shared positions", kernels._backward_key_kernel, backward, dict(key, SHARED=True)),
            ("backward key, per-sample positions", kernels._backward_key_kernel, backward, dict(key, SHARED=False)),
            ("[CLS] forward", kernels._cls_forward_kernel, default, cls),
            ("[CLS] backward", kernels._cls_backward_kernel, default, dict(cls, HAS_DPROBS=False)),
            ("pattern", kernels._pattern_kernel, default, dict(WIDTH=4, TILES_P=64, WIDTH_P=4)),
            ("dQ cast", kernels._cast_kernel, default, dict(BLOCK=kernels.CAST_BLOCK))]


def signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types, constexprs and the JIT's divisibility hints."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper():
            sig[name] = "*" + POINTERS.get(name, TYPE[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if STRIDE.search(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    if "table_head_stride" in sig:  # the table is [rows, heads]: unit stride between heads
        constexprs = dict(constexprs, table_head_stride=1)
        sig["table_head_stride"] = "constexpr"
    return sig, constexprs, attrs


def ptxas_report(ptx: str, capability: int) -> tuple[int, int, list[str]]:
    """Registers, spill bytes (stores + loads) and warnings of ``ptxas -v`` (the one Triton would run) on
    one kernel's PTX."""
    ptxas = get_ptxas(capability).path
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills, [line.strip() for line in log.splitlines() if "warning" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (sm_90a), 80")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"], choices=sorted(TYPE))
    parser.add_argument("--kernels", nargs="+", help="only the cases whose label starts with one of these")
    args = parser.parse_args()
    arch = f"sm_{args.arch}a" if args.arch == 90 else f"sm_{args.arch}"
    target = GPUTarget("cuda", args.arch, 32)
    print(f"Triton {triton.__version__}, {arch}, tiles 64 x head dim 64")
    print(f"{'kernel':<36} {'dtype':<9} {'warps':>5} {'registers':>9} {'spill B':>7}  warnings")
    for dtype in args.dtypes:
        for label, fn, options, constexprs in kernel_cases(dtype):
            if args.kernels and not any(label.startswith(k) for k in args.kernels):
                continue
            sig, consts, attrs = signature(fn, dtype, constexprs)
            compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
            registers, spills, warnings = ptxas_report(compiled.asm["ptx"], args.arch)
            print(f"{label:<36} {dtype:<9} {options['num_warps']:>5} {registers:>9} {spills:>7}  "
                  f"{' | '.join(warnings) or '-'}", flush=True)


if __name__ == "__main__":
    main()
