"""Property-based tests of a ``save_pretrained`` folder as untrusted input (the pattern of
test_fuzz.py): any ``svitt_ego_config.json``, ``model.safetensors`` or ``vocab.txt`` either loads
(into a model whose tensors have the shapes of its weights) or raises the project's own error in one
line naming the folder; never another exception, never a model built from sizes the weights lack.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import WORDS
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_model_folder import small_model

from svitt_ego.checkpoint import CheckpointError
from svitt_ego.config import ConfigError
from svitt_ego.data.errors import MetadataError
from svitt_ego.models import SViTTEgo


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = small_model().save_pretrained(tmp_path_factory.mktemp("fuzz_model") / "model")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return folder


def loads_or_names_the_folder(saved: Path, name: str, content: bytes) -> SViTTEgo | None:
    """Load a copy of ``saved`` whose file ``name`` holds ``content``: the model, whose tensors
    have the shapes of the folder's weights, or None after a one-line error naming the folder."""
    folder = Path(tempfile.mkdtemp(dir=saved.parent)) / "model"
    shutil.copytree(saved, folder)
    (folder / name).write_bytes(content)
    try:
        model = SViTTEgo.from_pretrained(folder)
        assert model.tokenizer is not None  # read while the folder is there
        weights = load_file(folder / "model.safetensors")
    except (CheckpointError, ConfigError, MetadataError) as err:
        message = str(err)
        assert message.startswith(str(folder)) and "\n" not in message and len(message) < 1000, message
        return None
    finally:
        shutil.rmtree(folder.parent)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    return model


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3),
                           max_leaves=8)
sizes = st.integers(-2, 3) | st.integers(10**4, 10**12) | st.sampled_from([2**31, 10**400])


@given(st.sampled_from(["vision", "text", None]), st.data())
@example(section="vision", data=None)
def test_any_config_change_loads_or_names_the_folder(saved, section, data):
    config = json.loads((saved / "svitt_ego_config.json").read_text())
    if data is not None:
        keys = sorted(config[section] if section else config)
        key = data.draw(st.sampled_from(keys) | st.text(max_size=6))
        value = data.draw(sizes | json_values)
        (config[section] if section else config)[key] = value
    try:
        content = json.dumps(config).encode()
    except ValueError:  # an integer too long for json to write
        content = json.dumps(config, default=str).encode()
    loads_or_names_the_folder(saved, "svitt_ego_config.json", content)


@given(st.data())
def test_any_damage_to_the_weights_loads_or_names_the_folder(saved, data):
    original = (saved / "model.safetensors").read_bytes()
    header = int.from_bytes(original[:8], "little") + 8
    how = data.draw(st.sampled_from(["truncate", "header", "anywhere", "random"]))
    if how == "truncate":
        content = original[:data.draw(st.integers(0, len(original) - 1))]
    elif how == "random":
        content = data.draw(st.binary(max_size=64))
    else:
        at = data.draw(st.integers(0, (header if how == "header" else len(original)) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=8))
        content = original[:at] + patch + original[at + len(patch):]
    loads_or_names_the_folder(saved, "model.safetensors", content)


@given(st.binary(max_size=64) | st.lists(st.sampled_from([*WORDS, "", "x", "\r", "é", "\x00"]), max_size=130).map(
    lambda words: "\n".join(words).encode()))
@example(content="\n".join(WORDS).encode())
@example(content="\n".join(WORDS + ["x"] * 106).encode())  # 121 tokens: one id past the embeddings
def test_any_vocabulary_loads_or_names_the_folder(saved, content):
    model = loads_or_names_the_folder(saved, "vocab.txt", content)
    if model is not None:
        ids = model.tokenize(["a cup"])["input_ids"]
        assert int(ids.max()) < model.config.text.vocab_size
        assert torch.is_tensor(ids)
