"""Configs: presets, dotted overrides, and errors that name the key."""

import pytest

from svitt_ego.config import ConfigError, load_config


def test_presets_load_and_differ_where_they_should():
    kr3, kr5, dense, tiny = (load_config(p) for p in ("svitt_ego_kr3", "svitt_ego_kr5", "dense", "tiny"))
    assert (kr3.model.vision.k_local, kr3.model.vision.k_random, kr3.model.vision.block_size) == (1, 3, 56)
    assert kr5.model.vision.k_random == 5
    assert kr3.model.vision.keep_rate == 0.7 and kr3.model.text.keep_rate == 0.1
    assert dense.model.vision.attention == "dense" and dense.model.vision.keep_rate == 1.0
    assert dense.model.text.keep_rate == 1.0
    assert tiny.model.text.pretrained == "minilm" and tiny.train.precision == "fp32"
    # MiniLM's [CLS] is nearly constant: tiny's VTM head reads the fused tokens' mean; BERT keeps its [CLS].
    assert tiny.model.text.fusion_pooling == "mean" and kr3.model.text.fusion_pooling == "cls"
    assert tiny.loss.vtm_negatives == "random" and kr3.loss.vtm_negatives == "hard"


def test_overrides_are_typed():
    cfg = load_config("svitt_ego_kr3", ["model.vision.k_random=5", "train.lr=1e-4", "train.grad_clip=1.0",
                                        "model.vision.prune_layers=[2, 5]", "data.on_error=skip",
                                        "model.vision.grad_checkpointing=true"])
    assert cfg.model.vision.k_random == 5 and cfg.train.lr == 1e-4 and cfg.train.grad_clip == 1.0
    assert cfg.model.vision.prune_layers == [2, 5] and cfg.data.on_error == "skip"
    assert cfg.model.vision.grad_checkpointing is True


@pytest.mark.parametrize("override,message", [
    ("model.vision.keep_rate=1.5", r"model\.vision\.keep_rate: must be in \(0, 1\]"),
    ("model.vision.keep_rate=0", r"model\.vision\.keep_rate: must be in \(0, 1\]"),
    ("model.text.keep_rate=-0.1", r"model\.text\.keep_rate: must be in \(0, 1\]"),
    ("model.vision.k_local=2", r"model\.vision\.k_local: must be odd"),
    ("model.vision.block_size=0", r"model\.vision\.block_size: must be >= 1"),
    ("model.vision.k_randon=3", r"unknown config key 'model\.vision\.k_randon'"),
    ("model.visoin.k_random=3", r"unknown config key 'model\.visoin'"),
    ("model.vision.k_random=three", r"model\.vision\.k_random: expected int, got 'three'"),
    ("model.vision.attention=flash", r"model\.vision\.attention: 'flash' is not one of"),
    ("model.text.fusion_pooling=max", r"model\.text\.fusion_pooling: 'max' is not one of 'cls', 'mean'"),
    ("loss.vtm_negatives=easy", r"loss\.vtm_negatives: 'easy' is not one of 'hard', 'random'"),
    ("model.vision.prune_layers=[12]", r"model\.vision\.prune_layers: must be layer indices in \[0, 12\)"),
    ("train.lr", r"not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("svitt_ego_kr3", [override])


def test_bad_preset_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  vision:\n    block_sizes: 56\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: unknown config key 'model\.vision\.block_sizes'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no config file or preset named 'nope'"):
        load_config("nope")


def test_cli_reports_config_errors(capsys):
    from svitt_ego.cli import main

    assert main(["info", "--config", "tiny", "model.vision.k_local=4"]) == 2
    assert "model.vision.k_local: must be odd" in capsys.readouterr().err


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    from svitt_ego.cli import main

    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  vision:\n    k_random: [3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 4: not valid YAML"):
        load_config(str(path))
    assert main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.yaml, line 4" in err and "<unicode string>" not in err


def test_eval_batch_size_is_its_own_setting():
    cfg = load_config("tiny", ["eval.batch_size=2"])
    assert cfg.eval.batch_size == 2 and cfg.train.batch_size == 16
    with pytest.raises(ConfigError, match=r"eval\.batch_size: must be >= 1"):
        load_config("tiny", ["eval.batch_size=0"])
