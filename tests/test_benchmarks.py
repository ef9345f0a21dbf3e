"""The benchmark scripts run (tiny settings, CPU), so they are ready for the GPU they are meant for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_attention_benchmark_runs(tmp_path):
    results = tmp_path / "results.jsonl"
    out = _run("benchmarks/attention.py", "--device", "cpu", "--frames", "1", "--batch", "1", "--repeats", "1",
               "--dtype", "float32", "--methods", "blocked", "dense_bias", "flash", "--results", str(results))
    assert "blocked" in out and "dense_bias" in out and "1.00" in out
    rows = {r["method"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert list(rows) == ["flash", "blocked", "dense_bias"]  # the anchor first, every row its ratio to it
    assert rows["blocked"]["x_flash_ms"] == pytest.approx(rows["blocked"]["ms"] / rows["flash"]["ms"])


def test_train_step_benchmark_runs(tmp_path):
    results = tmp_path / "results.jsonl"
    out = _run("benchmarks/train_step.py", "--device", "cpu", "--runs", "vit_b:4", "tiny:4", "encoder:tiny:4",
               "--clips", "1", "--steps", "1", "--image-size", "64", "--anchor-width", "64", "--anchor-depth", "2",
               "--anchor-heads", "2", "--results", str(results))
    printed = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(printed) == {"tiny:4", "encoder:tiny:4", "vit_b:4"} and printed["vit_b:4"][2] == "1.00"
    rows = {r["run"]: r for r in map(json.loads, results.read_text().splitlines())}
    anchor = rows["vit_b:4"]["clips_per_s"]
    for r in ("tiny:4", "encoder:tiny:4"):  # each ratio is the row's clips/s over the anchor's
        assert rows[r]["clips_per_s"] > 0 and rows[r]["x_vit_b"] == pytest.approx(rows[r]["clips_per_s"] / anchor)
        assert printed[r][2] == f"{rows[r]['x_vit_b']:.2f}"
