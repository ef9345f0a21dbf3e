"""The fused kernel's CPU proxies in ``benchmarks/``: registers for sm_90a, atomics, host-side aten ops."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton  # noqa: F401 - the test extra installs it: missing, collection fails
ROOT = Path(__file__).resolve().parents[1]
TRITON_36 = ROOT / ".triton-3.6.0"  # the README's test command installs Triton 3.6.0 there


def _run(*args, pythonpath=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT / "src")])}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _rows(out: str, first_column_width: int) -> dict[str, list[str]]:
    return {line[:first_column_width].strip(): line[first_column_width:].split() for line in out.splitlines()}


def test_kernels_meet_the_register_target_for_sm90a_with_triton_3_6():
    """Compiled ahead of time with the GPU image's Triton, fp16 and bf16: the forward at 4 warps in <= 168
    registers (3 programs per SM), the key kernel for shared and for per-sample positions; no spills, no
    ptxas warning."""
    if not TRITON_36.is_dir():
        pytest.skip(f"{TRITON_36} is missing (pip install --no-deps --target .triton-3.6.0 triton==3.6.0)")
    out = _run("benchmarks/kernel_registers.py", "--dtypes", "float16", "bfloat16", "--kernels", "forward",
               "backward key", pythonpath=[TRITON_36])
    assert out.startswith("Triton 3.6.0, sm_90a")
    rows = {(line[:37].strip(), line[37:].split()[0]): line[37:].split()[1:] for line in out.splitlines()[2:]}
    for dtype in ("float16", "bfloat16"):
        warps, registers, spills, warnings = rows["forward", dtype]
        assert (warps, warnings) == ("4", "-") and int(registers) <= 168 and spills == "0"
        for positions in ("shared", "per-sample"):
            assert rows[f"backward key, {positions} positions", dtype][2:] == ["0", "-"]


def test_atomics_counted_in_the_interpreter_match_a_hand_count():
    """One frame (196 tokens, 4 blocks of 56, each block sees all four), batch 2, one head, head dim 64.
    Table: one atomic per valid score element and sample (shared positions: once for the batch), plus the
    three [CLS] rows per sample; dQ: each query row's 64 dims once per key tile and sample; no dK / dV atomics."""
    rows = _rows(_run("benchmarks/kernel_atomics.py", "--frames", "1", "--batch", "2"), 34)
    shared, unchunked, pruned = (rows[k][:3] for k in ("shared positions", "shared positions, BATCH_CHUNK=1",
                                                      "per-sample pruned, q_v=0.7"))
    assert [int(x.replace(",", "")) for x in shared] == [196 * 196 + 3 * 2, 2 * 4 * 196 * 64, 0]
    assert [int(x.replace(",", "")) for x in unchunked] == [2 * 196 * 196 + 3 * 2, 2 * 4 * 196 * 64, 0]
    n = 138  # ceil(0.7 * 196) tokens in 3 blocks, each block sees all three
    assert [int(x.replace(",", "")) for x in pruned] == [2 * n * n + 3 * 2, 2 * 3 * n * 64, 0]


def test_triton_path_takes_at_most_20_aten_ops_per_layer():
    rows = _rows(_run("benchmarks/kernel_host_ops.py", "--batch", "1", "--heads", "2", "--repeats", "2"), 41)
    for path in ("triton, positions shared (unpruned)", "triton, per-sample positions (pruned)"):
        assert 0 < int(rows[path][0]) <= 20
