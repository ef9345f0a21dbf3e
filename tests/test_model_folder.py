"""A ``save_pretrained`` folder as untrusted input, and a save that loses nothing: every bad config,
weights file or vocabulary is one line naming the file (exit 2) before a model is built; a save
killed between its renames still leaves a model; the files get the usual permissions."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch
from helpers import WORDS
from safetensors.torch import load_file, save_file

from svitt_ego.eval import egomcq as evaluate
from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.models import SViTTEgo

SMALL = ["model.vision.width=48", "model.vision.num_heads=2", "model.vision.depth=1", "model.vision.image_size=32",
         "model.vision.block_size=4", "model.vision.prune_layers=[]", "model.text.width=32", "model.text.depth=2",
         "model.text.num_fusion_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
         "model.text.vocab_size=120", "model.embed_dim=16"]


def small_model() -> SViTTEgo:
    return SViTTEgo(load_config("svitt_ego_kr3", SMALL).model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = small_model().save_pretrained(tmp_path_factory.mktemp("saved") / "model")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "model"
    copy.mkdir()
    for path in saved.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def refused(folder, capsys, name: str) -> str:
    """Run ``eval-mcq FOLDER``: it must stop with one line naming ``name`` in ``folder``, exit 2."""
    assert main(["eval-mcq", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("svitt-ego: error: ") and f"{folder}" in err and name in err, err
    return err


def edit_config(folder, section: str | None, key: str, value) -> None:
    path = folder / "svitt_ego_config.json"
    data = json.loads(path.read_text())
    (data[section] if section else data)[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("section, key, value, needs", [
    ("vision", "num_frames", 100000, "rel_pos_bias.table"),
    ("vision", "width", 30000, "visual."),
    ("vision", "depth", 10**6, "model.vision.depth is 1000000, the weights have 1 such layers"),
    ("text", "vocab_size", 10**9, "word_embeddings"),
    ("text", "depth", 40, "model.text.depth - model.text.num_fusion_layers is 39"),
    (None, "embed_dim", 10**5, "proj"),
])
def test_config_sizes_are_checked_against_the_weights_before_a_model_is_built(folder, capsys, monkeypatch, section,
                                                                             key, value, needs):
    devices = []
    init = SViTTEgo.__init__

    def recording_init(self, cfg):
        devices.append(torch.get_default_device().type)
        init(self, cfg)

    monkeypatch.setattr(SViTTEgo, "__init__", recording_init)
    edit_config(folder, section, key, value)
    err = refused(folder, capsys, "the config does not fit the weights")
    assert needs in err
    assert set(devices) <= {"meta"}  # nothing was allocated for the crafted sizes


@pytest.mark.parametrize("name, content, message", [
    ("svitt_ego_config.json", b"{", "svitt_ego_config.json: not valid JSON"),
    ("svitt_ego_config.json", b"[1, 2]", "expected a mapping"),
    ("svitt_ego_config.json", b'{"vision": {"widht": 8}}', "unknown config key 'model.vision.widht'"),
    ("svitt_ego_config.json", b'{"vision": {"mlp_ratio": 1e308}}', "model.vision.mlp_ratio"),
    ("svitt_ego_config.json", "dir", "svitt_ego_config.json: not a regular file"),
    ("svitt_ego_config.json", "fifo", "svitt_ego_config.json: not a regular file"),
    ("model.safetensors", b"", "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", b"junk" * 100, "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", "truncated", "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", "dir", "model.safetensors: not a regular file"),
    ("model.safetensors", "fifo", "model.safetensors: not a regular file"),
    ("vocab.txt", b"", "vocab.txt: not a BERT vocabulary: it lacks [PAD]"),
    ("vocab.txt", bytes(range(256)), "vocab.txt: not UTF-8 text"),
    ("vocab.txt", b"[PAD]\x00\n", "vocab.txt: a NUL byte"),
    ("vocab.txt", "\n".join(WORDS[:4]).encode(), "lacks [MASK]"),
    ("vocab.txt", "\n".join(WORDS + [f"w{i}" for i in range(200)]).encode(), "more than the model's "
                                                                                "model.text.vocab_size 120"),
    ("vocab.txt", "dir", "vocab.txt: not a regular file"),
    ("vocab.txt", "fifo", "vocab.txt: not a regular file"),
])
def test_a_broken_model_folder_is_one_line_naming_the_file(folder, capsys, name, content, message):
    path = folder / name
    if content == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content in ("dir", "fifo"):
        path.unlink()
        path.mkdir() if content == "dir" else os.mkfifo(path)
    else:
        path.write_bytes(content)
    refused(folder, capsys, message)


def test_weights_of_the_wrong_shape_name_the_tensor(folder, capsys):
    state = load_file(folder / "model.safetensors")
    state["vision_proj.weight"] = torch.zeros(16, 49)
    save_file(state, folder / "model.safetensors")
    refused(folder, capsys, "'vision_proj.weight' is (16, 49) in the weights, (16, 48) in a model of the config")


def test_saved_files_get_the_usual_permissions(saved):
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in saved.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["svitt_ego_config.json"] == 0o666 & ~umask


@pytest.mark.parametrize("first_save", [True, False])
def test_a_save_killed_between_its_renames_leaves_a_model(tmp_path, first_save):
    old, new = small_model(), small_model()
    folder = tmp_path / "model"
    if not first_save:
        old.save_pretrained(folder)
    pid = os.fork()
    if pid == 0:  # the child dies (no cleanup runs) just before the new folder takes the place of the old
        try:
            replace = os.replace
            os.replace = lambda src, dst: os._exit(0) if str(dst) == str(folder) else replace(src, dst)
            new.save_pretrained(folder)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    loaded = SViTTEgo.from_pretrained(folder)
    assert torch.equal(loaded.vision_proj.weight, new.vision_proj.weight)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".model.")) == ["model"]
    third = small_model()
    third.save_pretrained(folder)
    assert torch.equal(SViTTEgo.from_pretrained(folder).vision_proj.weight, third.vision_proj.weight)


# --------------------------------------------------------------------------- training checkpoints and eval-mcq


@pytest.mark.parametrize("content, message", [
    ([1, 2], "not a training checkpoint"),
    ({"model": {}}, "not a training checkpoint"),
    ({"config": {}, "model": [1]}, "the weights are not a mapping of names to tensors"),
    ({"config": {"model": {"widht": 1}}, "model": {}}, "its config: unknown config key 'model.widht'"),
])
def test_a_pt_that_is_not_a_training_checkpoint_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    assert main(["eval-mcq", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.pt" in err and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--score", "both", "--vtm-weight", "nan"], "--vtm-weight: must be a finite number, got 'nan'"),
    (["--score", "both", "--vtm-weight", "inf"], "--vtm-weight: must be a finite number, got 'inf'"),
    (["--output", "{tmp}"], "exists and is not a regular file"),
])
def test_eval_mcq_options_are_checked_before_the_evaluation(saved, tmp_path, capsys, monkeypatch, args, message):
    def evaluate_egomcq(*_, **__):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(evaluate, "evaluate_egomcq", evaluate_egomcq)
    assert main(["eval-mcq", str(saved), *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert math.isfinite(evaluate.VTM_WEIGHT)
