"""Configs: presets, dotted overrides, and errors that name the key."""

import time

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
    ("train\nlr=1", r"^unknown config key 'train\\nlr' \(known"),  # stays on one line
    ("data.crop_scale=[a, b]", r"data\.crop_scale\[0\]: expected float, got 'a'"),
    ("model.vision.mean=[x,1,1]", r"model\.vision\.mean\[0\]: expected float, got 'x'"),
    ("model.vision.std=[1,1,{a: 1}]", r"model\.vision\.std\[2\]: expected float, got \{'a': 1\}"),
    ("model.vision.prune_layers=[2.5]", r"model\.vision\.prune_layers\[0\]: expected int, got 2\.5"),
    ("train.lr=" + "9" * 400, r"train\.lr: expected float, got 9999"),
    ("train.epochs=" + "9" * 5000, r"override 'train\.epochs=9999.*: the value is not valid YAML \(Exceeds the limit"),
    ("train.lr=[1,", r"override 'train\.lr=\[1,': the value is not valid YAML \(while parsing a flow"),
    ("train.checkpoint_every=0", r"train\.checkpoint_every: must be >= 1, got 0"),
    ("train.log_every=0", r"train\.log_every: must be >= 1, got 0"),
    ("train.log_every=-3", r"train\.log_every: must be >= 1, got -3"),
    ("data.chunk_seconds=0", r"data\.chunk_seconds: must be > 0, got 0\.0"),
    ("data.chunk_seconds=-600", r"data\.chunk_seconds: must be > 0"),
    ("data.num_workers=-1", r"data\.num_workers: must be >= 0, got -1"),
    ("train.max_nonfinite=-1", r"train\.max_nonfinite: must be >= 0, got -1"),
    ("model.text.dropout=1.5", r"model\.text\.dropout: must be in \[0, 1\), got 1\.5"),
    ("model.text.dropout=-0.1", r"model\.text\.dropout: must be in \[0, 1\)"),
    ("model.vision.drop_path=1.0", r"model\.vision\.drop_path: must be in \[0, 1\)"),
    ("model.vision.mlp_ratio=0", r"model\.vision\.mlp_ratio: must be > 0"),
    ("model.vision.layer_norm_eps=0", r"model\.vision\.layer_norm_eps: must be > 0"),
    ("model.text.intermediate_size=0", r"model\.text\.intermediate_size: must be >= 1"),
    ("train.betas=[0.9]", r"train\.betas: must be 2 numbers in \[0, 1\)"),
    ("train.betas=[0.9, 1.0]", r"train\.betas: must be 2 numbers in \[0, 1\)"),
    ("train.weight_decay=-0.1", r"train\.weight_decay: must be >= 0"),
    ("train.warmup_epochs=-1", r"train\.warmup_epochs: must be >= 0"),
    ("train.min_lr_ratio=2", r"train\.min_lr_ratio: must be in \[0, 1\]"),
    ("train.grad_clip=0", r"train\.grad_clip: must be > 0 \(or null"),
    ("train.max_steps=0", r"train\.max_steps: must be >= 1 \(or null"),
    ("train.seed=-1", r"train\.seed: must be in \[0, 2\*\*31\)"),
    ("model.vision.eval_seed=-1", r"model\.vision\.eval_seed: must be in \[0, 2\*\*31\)"),
    ("loss.vtm_weight=-1", r"loss\.vtm_weight: must be >= 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("svitt_ego_kr3", [override])


def test_bad_preset_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  vision:\n    block_sizes: 56\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 3: unknown config key 'model\.vision\.block_sizes'"):
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
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 4, column \d+: not valid YAML"):
        load_config(str(path))
    assert main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.yaml, line 4" in err and "<unicode string>" not in err


def test_eval_batch_size_is_its_own_setting():
    cfg = load_config("tiny", ["eval.batch_size=2"])
    assert cfg.eval.batch_size == 2 and cfg.train.batch_size == 16
    with pytest.raises(ConfigError, match=r"eval\.batch_size: must be >= 1"):
        load_config("tiny", ["eval.batch_size=0"])


def test_every_loss_weight_zero_is_refused():
    with pytest.raises(ConfigError, match=r"loss\.mlm_weight: must be > 0 when the other loss weights are 0"):
        load_config("tiny", ["loss.contrastive_weight=0", "loss.vtm_weight=0", "loss.mlm_weight=0"])
    assert load_config("tiny", ["loss.contrastive_weight=0", "loss.vtm_weight=0"]).loss.mlm_weight == 1.0


@pytest.mark.parametrize("text, message", [
    ("model:\n  vision: [1,\n", r", line 3, column 1: not valid YAML: while parsing a flow node"),
    ("model:\n\tvision: 1\n", r", line 2, column 1: not valid YAML: .*found character '\\t'"),
    ("- 1\n- 2\n", r": expected a mapping at the top level, got list"),
    ("train:\n  lr: 0.1\n  checkpoint_every: 0\n", r", line 3: train\.checkpoint_every: must be >= 1, got 0"),
    ("train: 5\n", r", line 1: train: expected a mapping, got 5"),
])
def test_bad_yaml_file_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}{message}"):
        load_config(str(path))


def test_value_from_an_override_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  checkpoint_every: 5\n")
    with pytest.raises(ConfigError, match=r"^train\.checkpoint_every: must be >= 1, got 0$"):
        load_config(str(path), ["train.checkpoint_every=0"])


def test_yaml_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text \(byte 13\)"):
        load_config(str(path))


def test_list_items_are_typed():
    cfg = load_config("tiny", ["model.vision.mean=[0, 1, 0.5]", "model.vision.prune_layers=[1]"])
    assert cfg.model.vision.mean == [0.0, 1.0, 0.5] and all(isinstance(x, float) for x in cfg.model.vision.mean)
    assert cfg.model.vision.prune_layers == [1]


def test_cli_reports_a_malformed_yaml_file(tmp_path, capsys):
    from svitt_ego.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("model: [\n")
    assert main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 2, column 1: not valid YAML" in err and "<unicode string>" not in err
    assert len(err.strip().splitlines()) == 1


def _alias_bomb(levels: int) -> str:
    """An anchor list nested ``levels`` deep: 9 ** levels items once the aliases are expanded."""
    lines = ["train:", "  lr:", '    - &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"    - &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_naming_the_file_and_line(tmp_path, capsys):
    from svitt_ego.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(6))
    start = time.perf_counter()
    assert main(["info", "--config", str(path)]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bomb.yaml, line 4, column" in err and "aliases (*name) are not allowed" in err
    with pytest.raises(ConfigError, match="aliases"):
        load_config("tiny", ["train.betas=[&b 0.9, *b]"])


def test_a_message_never_holds_a_whole_untrusted_value():
    """A checkpoint's config can repeat one list through shared references (pickle's memo): its
    repr would have 4 ** 12 items."""
    from svitt_ego.config import config_from_dict

    bomb, key = [0.5] * 4, (0.5,) * 4
    for level in range(12):
        bomb, key = [bomb] * 4, (key,) * 4 if level < 8 else key
    start = time.perf_counter()
    for data in ({"train": {"lr": bomb}}, {"model": {"vision": {"mean": bomb}}}, {"train": {key: 1}}):
        with pytest.raises(ConfigError) as caught:
            config_from_dict(data)
        assert len(str(caught.value)) < 400
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("override, key", [("model.vision.mlp_ratio=1e308", "model.vision.mlp_ratio"),
                                           ("model.text.vocab_size=99999999999999", "model.text.vocab_size")])
def test_sizes_that_overflow_are_refused(capsys, override, key):
    from svitt_ego.cli import main

    assert main(["info", "--config", "tiny", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key}: " in err
