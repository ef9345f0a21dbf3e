"""The run-folder guard through the commands that use it: one writer per folder, no write through a link,
staging files of a killed run removed once the folder is held, resumes refused with other settings, a
full disk reported in one line, and every number on the command line checked."""

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from helpers import SMALL_MODEL, draw_code, toy_run_overrides, write_chunked_video, write_video

from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.data.toy import make_toy_data
from svitt_ego.models import create_model
from svitt_ego.nlq.features import extract_nlq_features

DISK_FULL = "PytorchStreamWriter failed writing file data/0: file write failed"  # what torch.save raises


def _one_line_error(capsys, command, *expected):
    """``command()`` exits with 2 and ends its stderr (progress bars before it) with one line of error,
    holding each of ``expected``, and no traceback."""
    capsys.readouterr()
    status = command()
    err = capsys.readouterr().err
    line = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert status == 2 and line.startswith("svitt-ego: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in line, err


@contextlib.contextmanager
def _held_by_another_run(folder):
    """``folder``'s lock as another run holds it (flock on an open file of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small") / "model"
    torch.manual_seed(0)
    create_model(load_config("tiny", SMALL_MODEL).model, load_pretrained=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy"), seed=1, num_videos=6)


def _pretrain(toy, out, *overrides):
    return main(["pretrain", "--config", "tiny", *toy_run_overrides(toy, out, "train.max_steps=1", *overrides)])


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "tensorboard"])
def test_pretrain_writes_nothing_through_a_link_in_its_run_folder(toy, tmp_path, capsys, name):
    victim = tmp_path / "victim"
    if name == "tensorboard":
        victim.mkdir()
    else:
        victim.write_text("precious\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(victim)
    _one_line_error(capsys, lambda: _pretrain(toy, tmp_path / "run"), str(tmp_path / "run"), "symbolic link", name)
    assert (list(victim.iterdir()) == [] if victim.is_dir() else victim.read_text() == "precious\n")


# --------------------------------------------------------------------------- staging files, metrics.jsonl


def _killed_run_leftovers(run, command, *targets):
    """What a run of ``command`` killed while writing ``targets`` leaves in ``run``: staged files (a folder for
    a target ending in /) listed in its journal."""
    from svitt_ego.atomic import staging_path
    from svitt_ego.run_folder import run_folder

    planted = []
    with run_folder(run, command):
        for target in targets:
            staged = staging_path(run / target.rstrip("/"), "" if target.endswith("/") else ".tmp")
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.mkdir() if target.endswith("/") else staged.write_bytes(b"half a checkpoint")
            planted.append(staged)
    return planted


def test_staging_files_of_a_killed_run_are_removed_once_the_folder_is_held(toy, tmp_path, capsys):
    (tmp_path / "disk").mkdir()
    run = tmp_path / "run"
    run.symlink_to(tmp_path / "disk")  # an output_dir that is itself a link (to another disk) works
    assert _pretrain(toy, run) == 0
    assert (tmp_path / "disk" / "last.pt").is_file() and (tmp_path / "disk" / "model").is_dir()
    planted = _killed_run_leftovers(run, "pretrain", "last.pt", "model/model.safetensors", "model/")
    resume = ["pretrain", "--resume", "--allow-config-change", "--config", "tiny",
              *toy_run_overrides(toy, run, "train.max_steps=2")]
    with _held_by_another_run(run):  # nothing of its is touched
        _one_line_error(capsys, lambda: main(resume), "in use by another run")
    assert all(path.exists() for path in planted)
    assert main(resume) == 0
    assert not any(path.exists() for path in planted)


def _users_files(folder):
    """A user's files that look like staging files by name (issue 30's repro), and their contents."""
    files = {name: b"x" for name in ("movie.mkv.part", "sub/deep/.notes.txt.tmp", ".photos.abcd1234/backup.jpg",
                                     "thesis.docx", "Downloads/movie.mkv.part", ".model.0123456789abcdef/model.bin",
                                     "photos/.a.jpg.0123456789abcdef.tmp")}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text)
    return files


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_files_named_like_staging_files_are_never_deleted(small_checkpoint, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    files = _users_files(d)
    video = write_video(tmp_path / "a.mp4", [draw_code(j, 0) for j in range(4)], Fraction(10))
    _one_line_error(capsys, lambda: main(["extract-features", str(small_checkpoint), str(video), "--output", str(d)]),
                    f"{d}: holds", "extract into a new or empty folder")
    assert _tree(d) == files and not (d / ".lock").exists()  # the refused folder as it was


@pytest.mark.parametrize("command", ["pretrain", "train-nlq"])
def test_a_run_into_a_users_folder_deletes_nothing_of_its(request, tmp_path, command):
    run = tmp_path / "run"
    run.mkdir()
    files = _users_files(run)
    if command == "pretrain":
        assert _pretrain(request.getfixturevalue("toy"), run) == 0
    else:
        assert _train_nlq(request.getfixturevalue("nlq"), run) == 0
    assert {name: text for name, text in _tree(run).items() if name in files} == files


def test_a_journal_removes_only_staged_names_inside_its_folder_reached_through_no_link(tmp_path):
    from svitt_ego.run_folder import JOURNAL, StagingJournal

    run, outside = tmp_path / "run", tmp_path / "outside"
    staged = ".last.pt.0123456789abcdef.tmp"
    for folder in (run / "sub", outside):
        folder.mkdir(parents=True)
        (folder / staged).write_text("x")
    (run / "link").symlink_to(outside)
    (run / "thesis.docx").write_text("x")
    (run / ".x.0123456789abcdef.tmp").symlink_to(outside / staged)
    listed = [f"../outside/{staged}", str(outside / staged), f"link/{staged}", "thesis.docx",
              ".x.0123456789abcdef.tmp", f"sub/{staged}"]
    (run / JOURNAL).write_text("".join(json.dumps(line) + "\n" for line in listed) + "not json\n")
    assert StagingJournal(run).clean() == [run / "sub" / staged]
    assert (outside / staged).exists() and (run / "thesis.docx").exists() and not (run / JOURNAL).exists()


def test_prepare_videos_removes_its_part_files_at_the_next_start(tmp_path):
    from svitt_ego.atomic import staging_path
    from svitt_ego.run_folder import run_folder

    (tmp_path / "src").mkdir()
    (tmp_path / "dst" / "v").mkdir(parents=True)
    with run_folder(tmp_path / "dst", "prepare-videos"):  # killed while writing a chunk
        part = staging_path(tmp_path / "dst" / "v" / "0.mp4", ".part")
        part.write_bytes(b"half a chunk")
    (tmp_path / "dst" / "v" / ".0.mp4.4242.part").write_bytes(b"not listed: not ours")
    assert main(["prepare-videos", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert not part.exists() and (tmp_path / "dst" / "v" / ".0.mp4.4242.part").exists()


def test_a_resumed_run_logs_each_step_once(toy, tmp_path):
    run = tmp_path / "run"
    overrides = ("train.max_steps=2", "train.checkpoint_every=1")
    assert _pretrain(toy, run, *overrides) == 0
    # As if killed after logging step 2 but before checkpointing it.
    os.replace(run / "step-1.pt", run / "last.pt")
    (run / "step-2.pt").unlink()
    assert main(["pretrain", "--resume", "--config", "tiny",
                 *toy_run_overrides(toy, run, "train.max_steps=1", *overrides)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


# --------------------------------------------------------------------------- the demo


class _Ran(Exception):
    pass


def test_a_second_demo_never_touches_a_running_demos_folder(tmp_path, capsys, monkeypatch):
    from svitt_ego import demo

    def ran(*args, **kwargs):
        raise _Ran

    monkeypatch.setattr(demo, "make_toy_world", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo, "create_model", ran)
    run = tmp_path / "dq" / "run"
    run.mkdir(parents=True)
    (run / ".made-by-svitt-ego-demo").touch()  # an earlier demo made the folder
    (run / "last.pt").write_text("the running demo's checkpoint")
    def second_demo():
        try:
            return main(["demo", "--quick", "--workdir", str(tmp_path / "dq")])
        except _Ran:
            return "ran"

    with _held_by_another_run(run):  # the running demo
        _one_line_error(capsys, second_demo, f"{run} is in use by another run")
    assert (run / "last.pt").read_text() == "the running demo's checkpoint"


# --------------------------------------------------------------------------- disk full


def test_a_full_disk_while_checkpointing_is_one_line(toy, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise RuntimeError(DISK_FULL)

    monkeypatch.setattr(torch, "save", disk_full)
    _one_line_error(capsys, lambda: _pretrain(toy, tmp_path / "run"), "step-1.pt: could not write", DISK_FULL)


# --------------------------------------------------------------------------- train-nlq


@pytest.fixture(scope="module")
def nlq(tmp_path_factory):
    """Features of one 4-s clip from two random tiny models, and a training file for it."""
    root = tmp_path_factory.mktemp("nlq")
    write_chunked_video(root / "videos", "v", seconds=4.0, fps=Fraction(10), chunk_seconds=600.0)
    query = {"query": "when did I open the drawer?", "clip_start_sec": 1.0, "clip_end_sec": 2.0}
    (root / "nlq.json").write_text(json.dumps({"videos": [{"video_uid": "v", "clips": [{
        "clip_uid": "c", "video_start_sec": 0.0, "video_end_sec": 4.0,
        "annotations": [{"annotation_uid": "a", "language_queries": [query]}]}]}]}))
    for seed in (0, 1):
        torch.manual_seed(seed)
        create_model(load_config("tiny", SMALL_MODEL).model, load_pretrained=False).save_pretrained(
            root / f"model{seed}")
        extract_nlq_features(root / f"model{seed}", [root / "nlq.json"], root / "videos", root / f"features{seed}",
                             batch_size=16)
    return root


@pytest.fixture(scope="module")
def trained(nlq, tmp_path_factory):
    """A train-nlq run folder after one epoch."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert _train_nlq(nlq, out) == 0
    return out


def _train_nlq(nlq, out, *args, features="features0"):
    return main(["train-nlq", str(nlq / features), "--annotations", str(nlq / "nlq.json"), "--output", str(out),
                 "--epochs", "1", "--warmup-epochs", "0", *args])


def test_train_nlq_resume_refuses_other_settings_naming_them(nlq, trained, tmp_path, capsys):
    out = shutil.copytree(trained, tmp_path / "run")
    saved = (out / "last.pt").read_bytes()
    changed = ("--resume", "--lr", "0.5", "--batch-size", "8", "--seed", "3", "--epochs", "2")
    _one_line_error(capsys, lambda: _train_nlq(nlq, out, *changed),
                    "last.pt was saved with other settings: settings.seed 0 -> 3, stages.0.batch_size 4 -> 8, "
                    "stages.0.epochs 1 -> 2, stages.0.lr 0.0001 -> 0.5;", "--allow-config-change")
    _one_line_error(capsys, lambda: _train_nlq(nlq, out, "--resume", features="features1"), "features.checkpoint")
    assert (out / "last.pt").read_bytes() == saved
    assert _train_nlq(nlq, out, "--resume", "--epochs", "2", "--allow-config-change") == 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_a_second_train_nlq_into_one_folder_is_refused(nlq, tmp_path, capsys):
    out = tmp_path / "run"
    with _held_by_another_run(out):  # a train-nlq run writing into out
        _one_line_error(capsys, lambda: _train_nlq(nlq, out), f"{out} is in use by another run")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_resumed_train_nlq_logs_each_epoch_once(nlq, tmp_path, monkeypatch):
    from svitt_ego.nlq import train

    save, calls = train.atomic_torch_save, []

    def killed_before_the_second_checkpoint(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        save(*args)

    monkeypatch.setattr(train, "atomic_torch_save", killed_before_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _train_nlq(nlq, tmp_path / "run", "--epochs", "2")
    monkeypatch.setattr(train, "atomic_torch_save", save)
    assert _train_nlq(nlq, tmp_path / "run", "--epochs", "2", "--resume") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(0, 1), (0, 2)]


def test_train_nlq_skips_and_counts_non_finite_losses_then_stops(nlq, tmp_path, capsys, monkeypatch, caplog):
    from svitt_ego.nlq import train

    loss, calls = train.grounding_loss, []

    def nan_in_the_second_epoch(*args):
        losses = loss(*args)
        calls.append(1)
        if len(calls) == 2:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(train, "grounding_loss", nan_in_the_second_epoch)
    with caplog.at_level("ERROR"):
        assert _train_nlq(nlq, tmp_path / "run", "--epochs", "2") == 0
    assert "non-finite loss in stage 0, epoch 1, batch 0; queries [('c', 'a', 0)]" in caplog.text
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert state["nonfinite"] == 1

    def always_nan(*args):
        losses = loss(*args)
        return {**losses, "loss": losses["loss"] * float("nan")}

    monkeypatch.setattr(train, "grounding_loss", always_nan)
    with pytest.raises(RuntimeError, match="1 non-finite losses, more than --max-nonfinite=0; stopping"):
        _train_nlq(nlq, tmp_path / "again", "--max-nonfinite", "0")


def test_a_full_disk_in_train_nlq_is_one_line(nlq, tmp_path, capsys, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    _one_line_error(capsys, lambda: _train_nlq(nlq, tmp_path / "run"),
                    "last.pt: could not write (No space left on device)")


@pytest.mark.parametrize("change, expected", [
    ({"hidden": 10**6}, "), its config gives ("),  # the first weight whose shape the width changes
    ({"hidden_size": 128}, "config has unknown keys ['hidden_size']"),
    ({"levels": 40}, "config field 'levels' is 40, out of range"),
    ({"dropout": float("nan")}, "config field 'dropout' is nan, not a number of magnitude below 2**31"),
    ({"num_heads": 2.5}, "config field 'num_heads' is 2.5, not an integer"),
])
def test_a_crafted_grounding_checkpoint_is_refused_before_anything_is_built(nlq, trained, tmp_path, capsys, change,
                                                                            expected):
    state = torch.load(trained / "last.pt", weights_only=True)
    state["config"].update(change)
    torch.save(state, tmp_path / "crafted.pt")
    predict = ["predict-nlq", str(nlq / "features0"), "--model", str(tmp_path / "crafted.pt"),
               "--annotations", str(nlq / "nlq.json"), "--output", str(tmp_path / "out.json")]
    _one_line_error(capsys, lambda: main(predict), f"{tmp_path / 'crafted.pt'}: ", expected)


# --------------------------------------------------------------------------- numbers on the command line


@pytest.mark.parametrize("argv, option", [
    (["make-toy-data", "D", "--num-videos", "0"], "--num-videos"),
    (["make-toy-data", "D", "--seed", "-1"], "--seed"),
    (["prepare-videos", "S", "D", "--chunk-seconds", "-600"], "--chunk-seconds"),
    (["prepare-videos", "S", "D", "--short-side", "0"], "--short-side"),
    (["prepare-videos", "S", "D", "--workers", "0"], "--workers"),
    (["eval-mcq", "C.pt", "--vtm-weight", "nan"], "--vtm-weight"),
    (["visualize", "C.pt", "V.mp4", "--start", "-1", "--end", "2"], "--start"),
    (["visualize", "C.pt", "V.mp4", "--start", "0", "--end", "inf"], "--end"),
    (["demo", "--workdir", "D", "--epochs", "0"], "--epochs"),
    (["extract-nlq-features", "C.pt", "--annotations", "A", "--videos", "V", "--output", "D", "--window", "3",
      "--stride", "0"], "--stride"),
    (["extract-nlq-features", "C.pt", "--annotations", "A", "--videos", "V", "--output", "D", "--batch-size", "0"],
     "--batch-size"),
    (["extract-nlq-features", "C.pt", "--annotations", "A", "--videos", "V", "--output", "D", "--chunk-seconds",
      "-600"], "--chunk-seconds"),
    (["train-nlq", "F", "--annotations", "A", "--output", "D", "--batch-size", "0"], "--batch-size"),
    (["train-nlq", "F", "--annotations", "A", "--output", "D", "--lr", "nan"], "--lr"),
    (["train-nlq", "F", "--annotations", "A", "--output", "D", "--epochs", "0"], "--epochs"),
    (["train-nlq", "F", "--annotations", "A", "--output", "D", "--pretrain-epochs", "-1"], "--pretrain-epochs"),
    (["train-nlq", "F", "--annotations", "A", "--output", "D", "--seed", str(2**64)], "--seed"),
    (["predict-nlq", "F", "--annotations", "A", "--output", "O", "--zero-shot", "--top-k", "0"], "--top-k"),
    (["search", "C.pt", "F", "a query", "--top-k", "0"], "--top-k"),
    (["search", "C.pt", "V.mp4", "a query", "--cache", "D", "--stride", "0"], "--stride"),
])
def test_every_number_on_the_command_line_is_checked_in_one_line(tmp_path, capsys, argv, option):
    argv = [str(tmp_path / word) if word in ("D", "S", "C.pt", "V.mp4", "A", "V", "F", "O") else word
            for word in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {option}: must be " in err, err
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


@given(st.one_of(st.text(max_size=20), st.integers().map(str), st.floats().map(repr), st.just("9" * 5000)))
def test_a_number_argument_is_within_its_bounds_or_refused(text):
    from svitt_ego.cli import finite_float, nonnegative_int, positive_float, positive_int, seed

    rules = [(positive_int, lambda v: type(v) is int and v >= 1),
             (nonnegative_int, lambda v: type(v) is int and v >= 0),
             (seed, lambda v: type(v) is int and 0 <= v < 2**31),
             (positive_float, lambda v: math.isfinite(v) and v > 0),
             (finite_float, math.isfinite)]
    for parse, holds in rules:
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as err:
            assert str(err).startswith("must be ") and str(err).endswith(repr(text))
            continue
        assert holds(value), (parse, text, value)


@pytest.mark.parametrize("argv", [
    ["predict-nlq", "features", "--annotations", "a.json", "--zero-shot", "--output", "a.json"],
    ["eval-nlq", "sub.json", "--annotations", "a.json", "--output", "sub.json"],
    ["eval-mcq", "model.pt", "--output", "model.pt"],
    ["visualize", "model.pt", "v.mp4", "--start", "0", "--end", "1", "--output", "v.mp4"],
    ["epic-mir-relevancy", "--annotations", "features", "--output", "r.npy", "--compare", "r.npy"],
    ["extract-features", "model.pt", "features", "--output", "features"],
    ["train-nlq", "features", "--annotations", "a.json", "--output", "features"],
    ["search", "model.pt", "features", "drawer", "--cache", "features"],
])
def test_no_command_writes_over_one_of_its_inputs(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "features").mkdir()
    for name in ("a.json", "sub.json", "model.pt", "v.mp4", "r.npy"):
        (tmp_path / name).write_text(name)
    output = argv[-1]
    _one_line_error(capsys, lambda: main(argv), f"{output} is also an input of this command")
    assert all((tmp_path / name).read_text() == name for name in ("a.json", "sub.json", "model.pt", "v.mp4", "r.npy"))
    assert os.listdir(tmp_path / "features") == []


# --------------------------------------------------------------------------- the guard's own rules


def test_a_command_inside_another_ones_guard_shares_its_folder(tmp_path):
    from svitt_ego.run_folder import RunLock, run_folder

    with run_folder(tmp_path / "run", "demo", fresh=True):
        with run_folder(tmp_path / "run", "pretrain"):  # the demo's own pretraining
            (tmp_path / "run" / "last.pt").write_text("x")
        assert "in use by another run" in RunLock(tmp_path / "run").try_acquire()  # held by the outer guard
    with RunLock(tmp_path / "run"):  # released
        pass


def test_settings_changes_name_nested_keys_and_skip_those_that_may_change():
    from svitt_ego.run_folder import settings_changes

    saved = {"settings": {"lr": 0.1, "model": {"hidden": 64}}, "stages": [{"epochs": 1}], "device": "cpu"}
    current = {"settings": {"lr": 0.1, "model": {"hidden": 128}}, "stages": [{"epochs": 2}], "device": "cuda"}
    assert settings_changes(saved, current, ("device",)) == {"settings.model.hidden": (64, 128),
                                                            "stages.0.epochs": (1, 2)}
