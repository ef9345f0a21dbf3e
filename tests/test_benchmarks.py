"""The benchmark scripts run (tiny settings, CPU), so they are ready for the GPU they are meant for."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_attention_benchmark_runs():
    out = _run("benchmarks/attention.py", "--device", "cpu", "--frames", "1", "--batch", "1", "--repeats", "1",
               "--dtype", "float32", "--methods", "blocked", "dense_bias", "flash")
    assert "blocked" in out and "dense_bias" in out and "1.00" in out


def test_train_step_benchmark_runs():
    out = _run("benchmarks/train_step.py", "--device", "cpu", "--runs", "tiny:4", "encoder:tiny:4", "vit_b:4",
               "--clips", "1", "--steps", "1", "--image-size", "64", "--anchor-width", "64", "--anchor-depth", "2",
               "--anchor-heads", "2")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"tiny:4", "encoder:tiny:4", "vit_b:4"}
    assert rows["vit_b:4"][2] == "1.00"  # the anchor against itself; the other rows carry their ratio to it
    anchor = float(rows["vit_b:4"][1])
    for r in ("tiny:4", "encoder:tiny:4"):  # each ratio is the row's clips/s over the anchor's
        assert float(rows[r][1]) > 0 and float(rows[r][2]) == pytest.approx(float(rows[r][1]) / anchor, abs=0.011)


def test_nlq_memory_benchmark_runs():
    out = _run("benchmarks/nlq_memory.py", "--windows", "64", "128", "--hidden", "16", "--levels", "3",
               "--video-dim", "8", "--text-dim", "8")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["64", "128"] and rows[0][2] == "1.00" and float(rows[1][1]) > 0
    assert float(rows[1][2]) == pytest.approx(float(rows[1][1]) / float(rows[0][1]), rel=0.05)  # printed rounded
