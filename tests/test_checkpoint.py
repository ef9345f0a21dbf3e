"""Checkpoints and run folders: no code runs on load, exact RNG round trips, atomic writes, the lock, resume checks."""

import os
import random
import threading

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL

from svitt_ego.atomic import atomic_write_text
from svitt_ego.checkpoint import (CheckpointError, Checkpointer, check_resume, load_checkpoint, rng_state,
                                  save_checkpoint, set_rng_state)
from svitt_ego.config import ConfigError, load_config
from svitt_ego.run_folder import RunLock


class _RunsCode:
    """Pickles to a call of ``open(marker, "w")``: loading it with weights_only=False creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_checkpoint(path, marker):
    torch.save({"model": {}, "config": {}, "payload": _RunsCode(marker)}, path)
    return path


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when trusted
    assert marker.exists()


def test_eval_mcq_refuses_a_malicious_checkpoint_in_one_line(tmp_path, capsys):
    from svitt_ego.cli import main

    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.pt", marker)
    assert main(["eval-mcq", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil.pt: refused to load" in err and not marker.exists()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nowhere.pt")


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    random.gauss(0, 1)  # and one in Python's
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = _draws()
    _draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == expected


def test_older_checkpoints_with_numpy_rng_states_still_load_and_resume_exactly(tmp_path):
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"rng": [legacy]}, tmp_path / "old.pt")  # how checkpoints were written before
    expected = _draws()
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"][0])
    assert _draws() == expected


def test_atomic_writes_use_unique_temporary_files(tmp_path):
    path, errors = tmp_path / "shared.txt", []

    def write(text):
        try:
            for _ in range(30):
                atomic_write_text(path, text)
        except Exception as err:  # noqa: BLE001 - any failure of a writer fails the test
            errors.append(err)

    writers = [threading.Thread(target=write, args=(c * 1000,)) for c in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert errors == [] and path.read_text() in ("a" * 1000, "b" * 1000)
    assert os.listdir(tmp_path) == ["shared.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"step": 1})

    def fail(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    from svitt_ego.atomic import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert load_checkpoint(path) == {"step": 1} and os.listdir(tmp_path) == ["state.pt"]


def test_run_lock_names_its_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(FileExistsError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on "):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released
        pass


def test_resume_check_names_every_key_that_changes_the_saved_state(tmp_path, caplog):
    saved = load_config("tiny", SMALL_MODEL)
    state = {"config": saved.to_dict(), "world_size": 1}
    changed = load_config("tiny", [*SMALL_MODEL, "train.batch_size=2", "train.lr=0.5", "train.log_every=3",
                                   "data.num_workers=0", "eval.batch_size=1"])
    with pytest.raises(ConfigError, match=r"last\.pt was saved with other settings: train\.batch_size 16 -> 2, "
                                          r"train\.lr 0\.0003 -> 0\.5; .*--allow-config-change"):
        check_resume(tmp_path / "last.pt", state, changed, allow_change=False)
    with caplog.at_level("WARNING"):
        check_resume(tmp_path / "last.pt", state, changed, allow_change=True)
    assert "train.batch_size 16 -> 2, train.lr 0.0003 -> 0.5" in caplog.text
    check_resume(tmp_path / "last.pt", state, load_config("tiny", [*SMALL_MODEL, "train.log_every=3"]), False)


def test_checkpointer_keeps_the_newest_and_reports_a_failed_write(tmp_path):
    cfg = load_config("tiny", SMALL_MODEL)
    layer = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer(tmp_path / "run", keep=2, objects={"model": layer})
    (tmp_path / "run").mkdir()
    for step in (1, 2, 3):
        checkpointer.save(f"step-{step}.pt", {"step": step}, cfg)
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["last.pt", "step-2.pt", "step-3.pt"]
    with torch.no_grad():
        layer.weight.zero_()
    assert checkpointer.resume(cfg)["step"] == 3 and layer.weight.abs().sum() > 0
    (tmp_path / "not-a-folder").write_text("a file where the run folder's parent should be")
    broken = Checkpointer(tmp_path / "not-a-folder" / "run", keep=2, objects={"model": layer})
    with pytest.raises(CheckpointError, match=r"step-4\.pt: could not write \(Not a directory\)"):
        broken.save("step-4.pt", {"step": 4}, cfg)
