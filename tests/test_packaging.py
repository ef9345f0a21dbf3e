"""The built wheel carries the presets, so a regular (non-editable) install can load them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from svitt_ego.config import preset_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_the_presets(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("svitt_ego-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = preset_names()
    assert {"svitt_ego_kr3", "svitt_ego_kr5", "dense", "tiny"} <= set(presets)
    assert {f"svitt_ego/configs/{name}.yaml" for name in presets} <= names


def test_info_lists_the_presets(capsys):
    from svitt_ego.cli import main

    assert main(["info", "--list"]) == 0
    assert capsys.readouterr().out.split() == preset_names()


def test_ci_runs_the_readme_set_up_lines():
    """.ci/run takes both set-up commands from the README (marked blocks), so the two cannot drift apart."""
    def line(name):
        result = subprocess.run(["bash", ".ci/readme-command", name], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert line("demo").startswith("pip install torch==2.13.0 && ") and line("demo").endswith(" && svitt-ego demo")
    assert line("test").endswith(" && python -m pytest -q") and '".[test]"' in line("test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y chromium" in line("system")
    assert 'eval "$test_line"' in ci and all(f"readme-command {name}" in ci for name in ("system", "demo", "test"))
