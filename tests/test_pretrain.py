"""Pretraining end to end on the synthetic world: exact resume after a kill, non-finite losses, the demo."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import record_bars, toy_config, toy_run_overrides

from svitt_ego import train
from svitt_ego.checkpoint import load_checkpoint
from svitt_ego.config import ConfigError, load_config
from svitt_ego.data.toy import make_toy_data


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy"), seed=1, num_videos=6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(toy, tmp_path):
    overrides = ["train.epochs=2", "train.max_steps=14", "train.checkpoint_every=3", "train.lr=1e-3"]
    train.pretrain(toy_config(toy, tmp_path / "whole", *overrides))

    cfg = toy_config(toy, tmp_path / "killed", *overrides)
    (tmp_path / "killed").mkdir()
    cfg.save(tmp_path / "killed.yaml")
    # As many CPU threads as this process's runs use: another count sums in another order, not bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "svitt_ego.cli", "pretrain", "--config",
                             str(tmp_path / "killed.yaml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "step-6.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()  # it really was stopped mid-run
    train.pretrain(cfg, resume=True)

    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert whole["step"] == resumed["step"] == 14
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    # Old step checkpoints are pruned; last and best stay.
    kept = sorted(p.name for p in (tmp_path / "killed").glob("*.pt"))
    assert kept == ["best.pt", "last.pt", "step-12.pt", "step-14.pt"]


@pytest.mark.slow
def test_non_finite_loss_is_reported_skipped_and_bounded(toy, tmp_path, monkeypatch, caplog):
    forward = train.PretrainingObjective.forward
    calls = []

    def sometimes_nan(self, batch):
        losses = forward(self, batch)
        calls.append(1)
        if len(calls) in (2, 3):
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train.PretrainingObjective, "forward", sometimes_nan)
    with caplog.at_level("ERROR"):
        train.pretrain(toy_config(toy, tmp_path / "a", "train.max_steps=5", "train.max_nonfinite=2"))
    assert "non-finite loss at step 1 (epoch 0, batch 1); clip ids [" in caplog.text
    state = load_checkpoint(tmp_path / "a" / "last.pt")
    assert state["step"] == 5 and state["nonfinite"] == 2
    calls.clear()
    with pytest.raises(RuntimeError, match="2 non-finite losses, more than train.max_nonfinite=1"):
        train.pretrain(toy_config(toy, tmp_path / "b", "train.max_steps=5", "train.max_nonfinite=1"))


@pytest.mark.slow
def test_quick_demo_learns(tmp_path):
    """The demo's short version: the loss falls and EgoMCQ beats chance (20%) after pretraining."""
    from svitt_ego.demo import demo

    result = demo(tmp_path, quick=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 6 and sum(losses[-2:]) < sum(losses[:2])
    after = result["after"]
    assert (after["inter"] + after["intra"]) / 2 > 25.0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    zero_shot = result["zero_shot"]
    assert list(zero_shot) == ["untrained", "pretrained", "chance"]
    assert all(0 < r["epic_mir"]["mAP avg"] <= 100 and 0 < r["charades_ego"] <= 100 for r in zero_shot.values())


def test_fresh_run_refuses_a_folder_holding_a_run(toy, tmp_path, capsys):
    from svitt_ego.cli import main

    overrides = toy_run_overrides(toy, tmp_path / "run", "train.max_steps=1")
    cfg = load_config("tiny", overrides)
    train.pretrain(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
        train.pretrain(cfg)
    assert main(["pretrain", "--config", "tiny", *overrides]) == 2
    assert str(tmp_path / "run") in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_eval_mcq_command_prints_and_writes_accuracy(toy, tmp_path, capsys):
    from svitt_ego.cli import main

    train.pretrain(toy_config(toy, tmp_path / "run", "train.max_steps=2"))
    out = tmp_path / "egomcq.json"
    assert main(["eval-mcq", str(tmp_path / "run" / "last.pt"), "--output", str(out), "train.batch_size=8"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    questions = json.loads((toy / "egomcq.json").read_text())
    assert result["num_inter"] + result["num_intra"] == len(questions)
    assert f"{result['inter']:.1f}" in printed and "accuracy (%)" in printed
    # The same accuracies from the save_pretrained folder of the same run.
    assert main(["eval-mcq", str(tmp_path / "run" / "model"), "--config", str(tmp_path / "run" / "config.yaml"),
                 "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert (again["inter"], again["intra"]) == (result["inter"], result["intra"])


def test_resume_refuses_a_config_that_changes_the_saved_state(toy, tmp_path, caplog):
    cfg = toy_config(toy, tmp_path / "run", "train.max_steps=1")
    train.pretrain(cfg)
    saved_yaml = (tmp_path / "run" / "config.yaml").read_text()
    changed = toy_config(toy, tmp_path / "run", "train.max_steps=2", "train.batch_size=2", "train.lr=0.5")
    with pytest.raises(ConfigError, match=r"train\.batch_size 4 -> 2, train\.lr 0\.0003 -> 0\.5, "
                                          r"train\.max_steps 1 -> 2; .*--allow-config-change"):
        train.pretrain(changed, resume=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved_yaml  # written only after the checks
    with caplog.at_level("WARNING"):
        train.pretrain(toy_config(toy, tmp_path / "run", "train.max_steps=2"), resume=True,
                       allow_config_change=True)
    assert "changed settings (allowed): train.max_steps 1 -> 2" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert "max_steps: 2" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_second_run_in_a_locked_folder_is_refused(toy, tmp_path, capsys):
    from svitt_ego.cli import main
    from svitt_ego.run_folder import RunLock

    overrides = toy_run_overrides(toy, tmp_path / "run", "train.max_steps=1")
    with RunLock(tmp_path / "run"):
        with pytest.raises(FileExistsError, match=rf"in use by another run \(pid {os.getpid()} on "):
            train.pretrain(load_config("tiny", overrides))
        assert main(["pretrain", "--config", "tiny", *overrides]) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_demo_deletes_only_a_run_folder_it_made(tmp_path):
    from svitt_ego.run_folder import run_folder

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "last.pt").write_text("precious")
    with pytest.raises(FileExistsError, match="not made by svitt-ego demo"):
        with run_folder(theirs, "demo", fresh=True):
            pass
    assert (theirs / "last.pt").read_text() == "precious"
    ours = tmp_path / "ours"
    with run_folder(ours, "demo", fresh=True):
        (ours / "last.pt").write_text("old demo")
    with run_folder(ours, "demo", fresh=True):
        assert not (ours / "last.pt").exists() and ours.is_dir()


def test_demo_epochs_are_checked_before_any_data_is_made(tmp_path, capsys):
    from svitt_ego.cli import main

    assert main(["demo", "--workdir", str(tmp_path / "run"), "--epochs", "0"]) == 2
    assert "--epochs: must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["demo", "--workdir", str(tmp_path / "run"), "--task", "nlq", "--epochs", "10"]) == 2
    assert "--epochs sets the pretraining's length" in capsys.readouterr().err


def test_demo_epochs_set_the_pretraining_length(tmp_path):
    from svitt_ego.demo import demo_config

    assert demo_config(tmp_path, quick=True).train.epochs == 2
    assert demo_config(tmp_path, quick=True, epochs=7).train.epochs == 7
    assert demo_config(tmp_path, quick=False).train.keep_checkpoints == 1  # one step-*.pt beside last.pt, best.pt


def test_the_epoch_bar_ends_at_its_total(toy, tmp_path, monkeypatch):
    """The last epoch stops at the run's last step; its bar still ends at its total (not 131/132)."""
    bars = record_bars(monkeypatch, train)
    train.pretrain(toy_config(toy, tmp_path / "run", "train.epochs=2", "data.fraction_per_epoch=0.3"))
    assert len(bars) == 2 and all(bar.total > 1 and bar.n == bar.total for bar in bars), [(b.n, b.total) for b in bars]
