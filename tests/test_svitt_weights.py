"""SViTT's checkpoints converted to our model folders, checked against SViTT's own code.

The fixture ``tests/data/svitt/`` was made outside this repository by a script that ran SViTT's own code,
JerryYLi/svitt at commit c8806b3, unchanged: its ``Singularity`` pretraining model
(models/model_pretrain.py) built from ``configs/pretrain_webvid.yaml`` (loaded by OmegaConf) with
BEiT-B / BERT-base shapes made tiny: BEiT 4 layers, width 32, 2 heads, MLP 64, 32x32 images of 8x8
patches, 2 frames (32 patch tokens), relative position bias, mean pooling, layer scale 0.1;
``vision_encoder_args`` token_keep_rate 0.5 at layer 1, sparse_local_attn 1, sparse_random_attn 1,
attn_block_size 8; BERT (configs/config_bert.json updated by ``text_encoder_args``) 4 layers, fusion_layer
2, width 32, 2 heads, intermediate 64, vocabulary 1000, 40 positions; embed_dim 16. A subclass replaced
only its two builders, which download BEiT and BERT from the Hugging Face hub, by the same classes built
from those local settings (``BeitModel(BeitConfig(**vision_encoder_args), add_pooling_layer=True,
num_frames=2)`` plus its ``vision_layernorm``; ``BertForMaskedLM(bert_config)``), and its two widths
(fixed at 768 in its base class). Every parameter was drawn from a seeded normal (LayerNorm weights
around 1), ``temp`` set to 0.05, and the model saved as its tasks/pretrain.py saves (``model``,
``optimizer``, ``scheduler``, ``scaler``, the OmegaConf ``config``, ``epoch``, ``global_step``):
``svitt_tiny.pth``. ``svitt_tiny_outputs.pt`` holds fixed inputs (2 random videos, 2 texts of 8 token
ids, one padded, and a copy with [MASK]s) and what its code computed on them in eval mode, reusing one
``encode_image`` per model: the video and text embeddings (``F.normalize(vision_proj(pooled))``,
``F.normalize(text_proj(text [CLS]))`` of its ``encode_image`` / ``encode_text``), the VTM logits
(``itm_head`` on ``mode="fusion"``'s [CLS]) and the MLM logits (``text_encoder(mode="fusion",
return_logits=True)`` on the masked text's ``mode="text"`` states). It did so for the same weights under
five settings: sparsity off (``sparse_random_attn`` None, keep rate 1: ``dense``), the checkpoint's own
(``sparse``), keep rate 0.7 with sparse_random_attn 3 (``quirks``: 23 tokens after pruning leave a
partial last block, and 3 blocks with K_r = 3 make each query block take its own again), and the
checkpoint's with ``token_3d_order`` zcurve and hilbert (``orders``: the video embedding, the VTM logits,
the order its encoder registered, and the one its ``_register_token_order`` gives 4 x 14 x 14), recording the
random blocks its ``sparse_attention`` drew in each layer by wrapping ``torch.Tensor.topk`` during the
forward (``attn_idx``: the query's own block, SViTT's only local block at K_l = 1, then those picks).
Its environment: Python 3.11.7, torch 2.13.0 (CPU; SViTT pins 1.10), transformers 4.15.0 (as SViTT pins),
omegaconf 2.1.1, einops 0.8.2, zCurve 0.0.4, numpy-hilbert-curve 1.0.1, numpy 2.4. transformers 4.15 pins
tokenizers < 0.11, which has no wheel for Python 3.11, so the script hid it (``sys.modules["tokenizers"] =
None`` before importing transformers; SViTT's model code never uses it). Nothing of SViTT's code, nor the
script, is stored here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from svitt_ego.checkpoint import CheckpointError
from svitt_ego.cli import main
from svitt_ego.config import ConfigError, load_config
from svitt_ego.data.tokenizer import minilm_path
from svitt_ego.models import SViTTEgo, create_model
from svitt_ego.models.block_pattern import BlockPattern, block_pattern_from_noise
from svitt_ego.models.svitt_weights import convert_svitt, read_svitt_checkpoint, svitt_model_config
from svitt_ego.models.token_order import token_order

DATA = Path(__file__).parent / "data" / "svitt"
CKPT = DATA / "svitt_tiny.pth"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    """A 1000-token BERT vocabulary (MiniLM's first 1000 lines: the special tokens are among them)."""
    folder = tmp_path_factory.mktemp("vocab")
    lines = (minilm_path() / "vocab.txt").read_text().splitlines()[:1000]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(DATA / "svitt_tiny_outputs.pt", weights_only=True)


def _outputs(model: SViTTEgo, ref: dict) -> dict[str, torch.Tensor]:
    mask = ref["attention_mask"]
    with torch.no_grad():
        video = model.forward_video(ref["video"])
        text = model.forward_text(ref["input_ids"], mask)
        return {"video_embedding": model.video_embedding(video), "text_embedding": model.text_embedding(text, mask),
                "vtm_logits": model.vtm_logits(text, mask, video.tokens),
                "mlm_logits": model.mlm_logits(ref["masked_ids"], mask, video.tokens)}


def _assert_close(got: dict, expected: dict) -> None:
    for name, value in got.items():
        assert (value - expected[name]).abs().max().item() < 1e-4, name


def test_sparsity_off_equals_svitts_own_forward(tmp_path, vocab, reference):
    dense = {"vision": {"attention": "dense", "keep_rate": 1.0}}
    model = SViTTEgo.from_pretrained(convert_svitt(CKPT, tmp_path / "m", vocab=vocab, overrides=dense)).eval()
    _assert_close(_outputs(model, reference), reference["dense"])


def test_sparsity_on_equals_svitts_own_forward_given_its_random_blocks(tmp_path, vocab, reference):
    assert main(["convert-svitt", str(CKPT), str(tmp_path / "m"), "--vocab", str(vocab)]) == 0
    model = SViTTEgo.from_pretrained(tmp_path / "m").eval()
    v = model.config.vision
    assert (v.attention, v.k_local, v.k_random, v.block_size, v.keep_rate) == ("sparse", 1, 1, 8, 0.5)
    assert (v.prune_layers, model.config.text.keep_rate, model.config.text.max_length) == ([1], 1.0, 32)
    assert model.temp.item() == pytest.approx(0.05)
    assert v.svitt_blocks
    got = _outputs(_with_blocks(model, reference["attn_idx"]), reference)
    _assert_close(got, reference["sparse"])
    assert (got["vtm_logits"] - reference["dense"]["vtm_logits"]).abs().max() > 0.1  # the sparsity mattered


def _with_blocks(model: SViTTEgo, attn_idx: list[torch.Tensor]) -> SViTTEgo:
    """``model`` attending to the key blocks SViTT drew (its ``attn_idx``, one [blocks, K_l + K_r] per layer)."""
    v = model.config.vision
    patterns = [BlockPattern(idx, torch.ones_like(idx, dtype=torch.bool), v.block_size, v.svitt_blocks)
                for idx in attn_idx]
    model.visual.block_patterns = lambda num_tokens, device: patterns
    return model


def test_svitts_padded_keys_and_repeated_own_block_are_reproduced(tmp_path, vocab, reference):
    """SViTT run with keep rate 0.7 (23 tokens after pruning: a partial last block, whose zero-padded keys
    join its softmax) and K_r = 3 over 3 blocks (each query block takes its own block again)."""
    quirks = {"vision": {"keep_rate": 0.7, "k_random": 3}}
    model = SViTTEgo.from_pretrained(convert_svitt(CKPT, tmp_path / "m", vocab=vocab, overrides=quirks)).eval()
    _assert_close(_outputs(_with_blocks(model, reference["quirks_attn_idx"]), reference), reference["quirks"])
    model.config.vision.svitt_blocks = False  # our own blocks: masked padding, no repeated block
    plain = _outputs(_with_blocks(model, reference["quirks_attn_idx"][:2]
                                  + [idx[:, 1:] for idx in reference["quirks_attn_idx"][2:]]), reference)
    assert (plain["vtm_logits"] - reference["quirks"]["vtm_logits"]).abs().max() > 1e-4
    # Our draw gives SViTT's blocks where it has no choice left: 3 blocks, K_r = 3, the own block twice.
    ours = block_pattern_from_noise(torch.rand(3, 3), 8, 1, 3, svitt_blocks=True).key_blocks
    assert torch.equal(ours.sort(1).values, reference["quirks_attn_idx"][2].sort(1).values)


@pytest.mark.parametrize("kind", ["zcurve", "hilbert"])
def test_svitts_token_orders_are_reproduced(tmp_path, vocab, reference, kind):
    """SViTT run with ``token_3d_order`` z-curve / Hilbert: the same order (also BEiT-B's 4 x 14 x 14, from
    its own code) and the same outputs given its random blocks."""
    ref = reference["orders"][kind]
    assert torch.equal(token_order(kind, 4, 14), ref["order_4x14x14"])
    model = SViTTEgo.from_pretrained(convert_svitt(CKPT, tmp_path / "m", vocab=vocab,
                                                   overrides={"vision": {"token_order": kind}})).eval()
    assert torch.equal(model.visual.token_order("cpu")[1:] - 1, ref["order"])
    with torch.no_grad():
        video = _with_blocks(model, ref["attn_idx"]).forward_video(reference["video"])
        text = model.forward_text(reference["input_ids"], reference["attention_mask"])
        vtm = model.vtm_logits(text, reference["attention_mask"], video.tokens)
    _assert_close({"video_embedding": model.video_embedding(video), "vtm_logits": vtm}, ref)
    assert (vtm - reference["sparse"]["vtm_logits"]).abs().max() > 1e-3  # the order mattered
    assert torch.equal(video.kept_positions[0], video.kept_positions[0].sort(1).values)  # raster order out


def test_omegaconf_configs_are_read_as_plain_values():
    """The fixture's config (OmegaConf 2.1.1, as SViTT pins) and ``omegaconf_2_3_config.pth``: a ``temp`` and
    configs/pretrain_webvid.yaml with token_3d_order zcurve, saved by OmegaConf 2.3.0's pickling."""
    for path, order in ((CKPT, "none"), (DATA / "omegaconf_2_3_config.pth", "zcurve")):
        _, config = read_svitt_checkpoint(path)
        assert config["vision_encoder_args"]["token_3d_order"] == order
        assert config["max_txt_l"] == {"image": 32, "video": 32} and config["optimizer"]["opt_betas"] == [0.9, 0.999]
        assert config["data_root"] == "${oc.env:SL_DATA_DIR}"  # an interpolation stays a string


def test_a_crafted_pickle_is_refused_without_running(tmp_path, capsys):
    target = tmp_path / "written"

    class Payload:
        def __reduce__(self):
            return (open, (str(target), "w"))

    torch.save({"model": {"temp": torch.tensor(0.1)}, "config": Payload()}, tmp_path / "evil.pth")
    assert main(["convert-svitt", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert not target.exists() and not (tmp_path / "out").exists()
    assert len(err.splitlines()) == 1 and "refused to load" in err


def test_a_stand_in_called_with_arguments_is_refused(tmp_path):
    """The OmegaConf stand-ins are inert: a pickle that calls one is refused, not run."""
    data = (b"\x80\x02}q\x00(X\x05\x00\x00\x00modelq\x01}X\x06\x00\x00\x00configq\x02comegaconf.dictconfig\n"
            b"DictConfig\nX\x06\x00\x00\x00rm -rf\x85Rq\x03u.")
    pickle.loads(data.replace(b"omegaconf.dictconfig\nDictConfig", b"builtins\nstr"))  # well formed
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"x": 1}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(tmp_path / "c.pth", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, data if item.filename.endswith("data.pkl") else src.read(item))
    with pytest.raises(CheckpointError, match="refused to load"):
        read_svitt_checkpoint(tmp_path / "c.pth")


def _resave(tmp_path: Path, name: str, change) -> Path:
    state, config = read_svitt_checkpoint(CKPT)
    path = tmp_path / name
    torch.save(change(dict(state)), path)
    return path


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {f"module.{k}": v for k, v in s.items()},
                                  lambda s: {"state_dict": s}])
def test_wrapped_layouts_convert_to_the_same_weights(tmp_path, vocab, wrap):
    path = _resave(tmp_path, "w.pth", wrap)
    # Without its config the sparsity and text length fall back to no sparsity and 32 tokens, and BERT's
    # heads come from the flag.
    folder = convert_svitt(path, tmp_path / "m", vocab=vocab, text_heads=2)
    model = SViTTEgo.from_pretrained(folder)
    assert model.config.vision.attention == "dense"
    reference = SViTTEgo.from_pretrained(convert_svitt(CKPT, tmp_path / "r", vocab=vocab))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_derived_copies_are_checked_and_unplaced_keys_listed(tmp_path, vocab, capsys):
    def tamper(state):
        state["text_encoder.bert.embeddings.position_ids"] = state["text_encoder.bert.embeddings.position_ids"] + 1
        return state

    bad = _resave(tmp_path, "bad.pth", tamper)
    assert main(["convert-svitt", str(bad), str(tmp_path / "a"), "--vocab", str(vocab), "--text-heads", "2"]) == 2
    assert "'text_encoder.bert.embeddings.position_ids' is not what SViTT derives" in capsys.readouterr().err
    extra = _resave(tmp_path, "extra.pth", lambda s: {**s, "text_encoder.bert.pooler.dense.weight": torch.ones(2)})
    assert main(["convert-svitt", str(extra), str(tmp_path / "b"), "--vocab", str(vocab), "--text-heads", "2"]) == 2
    assert "text_encoder.bert.pooler.dense.weight" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["convert-svitt", str(extra), str(tmp_path / "b"), "--vocab", str(vocab), "--text-heads", "2",
                 "--allow-unused"]) == 0


def test_a_retrieval_checkpoint_converts_without_an_mlm_head(tmp_path, vocab, capsys):
    def retrieval(state):  # SViTT's retrieval model: BertModel, no "bert." prefix, no "cls."
        return {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()
                if not k.startswith("text_encoder.cls.")}

    folder = convert_svitt(_resave(tmp_path, "r.pth", retrieval), tmp_path / "m", vocab=vocab, text_heads=2)
    model = SViTTEgo.from_pretrained(folder)
    assert model.mlm_head is None and model.encode_text(["a cup"]).shape == (1, 16)
    with pytest.raises(ConfigError, match="no MLM head"):
        model.mlm_logits(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), torch.zeros(1, 5, 32))


def test_what_is_not_recognised_is_named_in_one_line(tmp_path, vocab, capsys):
    state, _ = read_svitt_checkpoint(CKPT)
    cases = {"ours.pt": {"model": {"visual.cls_token": torch.zeros(1, 1, 4)}, "step": 3},
             "list.pth": [1, 2],
             "unresolved.pth": {"model": state, "config": {"vision_encoder_args": {"token_keep_rate": "${rate}"}}}}
    expected = {"ours.pt": "no 'vision_encoder.embeddings.cls_token'", "list.pth": "not a SViTT checkpoint",
                "unresolved.pth": "a value of its config cannot be read"}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        assert main(["convert-svitt", str(tmp_path / name), str(tmp_path / "out"), "--vocab", str(vocab)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and expected[name] in err, err


def test_settings_svitt_runs_that_we_do_not_reproduce_are_refused_naming_them():
    state, config = read_svitt_checkpoint(CKPT)
    for change, named in (({"num_cls_tokens": 2}, "vision_encoder_args.num_cls_tokens=2"),
                          ({"sparse_local_attn": 3}, "sparse_local_attn=3"),
                          ({"token_keep_strategy": "random"}, "token_keep_strategy=random")):
        args = {**config["vision_encoder_args"], **change}
        with pytest.raises(ConfigError, match=named):
            svitt_model_config(state, {**config, "vision_encoder_args": args})


def test_an_existing_folder_is_not_overwritten(tmp_path, vocab, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["convert-svitt", str(CKPT), str(tmp_path / "mine"), "--vocab", str(vocab)]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["convert-svitt", str(CKPT), str(tmp_path / "m"), "--vocab", str(tmp_path / "nothing")]) == 2
    assert "no BERT vocabulary" in capsys.readouterr().err


def test_init_from_starts_a_model_from_a_converted_folder(tmp_path, vocab):
    folder = convert_svitt(CKPT, tmp_path / "m", vocab=vocab)
    saved = SViTTEgo.from_pretrained(folder)
    cfg = saved.config
    cfg.init_from, cfg.text.tokenizer, cfg.vision.num_frames = str(folder), None, 4
    model = create_model(cfg)
    assert model.config.text.tokenizer == str(folder)
    assert torch.equal(model.text_proj.weight, saved.text_proj.weight)
    tables = [m.visual.blocks[0].attn.rel_pos_bias.table for m in (model, saved)]
    assert tables[0].shape[0] > tables[1].shape[0]  # inflated to 4 frames
    other = load_config("tiny", [f"model.init_from={folder}"]).model
    with pytest.raises(CheckpointError, match="does not fit"):
        create_model(other)


# The fixture's sizes as overrides of a run's config (what `pretrain model.init_from=...` needs).
FIXTURE_SIZES = ["model.vision.width=32", "model.vision.num_heads=2", "model.vision.depth=4",
                 "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.num_frames=2",
                 "model.vision.mlp_ratio=2.0", "model.vision.block_size=8", "model.vision.prune_layers=[1]",
                 "model.vision.pooling=mean", "model.vision.pretrained=null", "model.text.width=32",
                 "model.text.depth=4", "model.text.num_fusion_layers=2", "model.text.num_heads=2",
                 "model.text.intermediate_size=64", "model.text.vocab_size=1000",
                 "model.text.max_position_embeddings=40", "model.text.pretrained=null", "model.text.tokenizer=null",
                 "model.embed_dim=16"]


@pytest.mark.slow
def test_every_command_runs_on_a_converted_folder(tmp_path, vocab, capsys):
    """fixture -> convert-svitt -> extract-features, search, eval-mcq, visualize, extract-nlq-features,
    eval-epic-mir, eval-charades-ego on the toy world, and pretrain initialised from the folder."""
    from safetensors.torch import load_file

    from svitt_ego.data.toy import toy_data_overrides
    from svitt_ego.data.toy_benchmarks import make_toy_world

    toy = make_toy_world(tmp_path / "toy", seed=1, num_videos=6)
    model = str(tmp_path / "model")
    assert main(["convert-svitt", str(CKPT), model, "--vocab", str(vocab)]) == 0
    assert main(["extract-features", model, str(toy / "videos"), "--out", str(tmp_path / "features")]) == 0
    features = [load_file(f)["features"] for f in (tmp_path / "features" / "videos").iterdir()]
    assert len(features) == 6 and all(f.shape[0] >= 1 and f.shape[1] == 32 for f in features)  # pooled: BEiT's width
    capsys.readouterr()
    assert main(["search", model, str(tmp_path / "features"), "open the drawer", "--top-k", "2"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) >= 2
    out = tmp_path / "mcq.json"
    assert main(["eval-mcq", model, *toy_data_overrides(toy), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["inter"] <= 100 and result["num_inter"] >= 1
    video = next((toy / "videos").iterdir())
    assert main(["visualize", model, str(video), "--start", "0", "--end", "2", "--text", "open the drawer",
                 "--out", str(tmp_path / "figure.png")]) == 0
    assert main(["extract-nlq-features", model, "--annotations", str(toy / "nlq_val.json"), "--videos",
                 str(toy / "videos"), "--out", str(tmp_path / "nlq"), "--window", "2", "--stride", "2"]) == 0
    for command, folder in (("eval-epic-mir", "epic_mir"), ("eval-charades-ego", "charades_ego")):
        assert main([command, model, "--annotations", str(toy / folder), "--videos", str(toy / folder / "videos"),
                     "--workers", "0", "--output", str(tmp_path / f"{folder}.json")]) == 0
    run = ["pretrain", "--config", "tiny", *toy_data_overrides(toy), *FIXTURE_SIZES, f"model.init_from={model}",
           f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2", "data.num_workers=0",
           "train.eval_every_epoch=false", "train.precision=fp32"]
    assert main(run) == 0 and (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("blocks, repeated", [(3, True), (4, False), (2, False)])
def test_svitt_blocks_repeat_the_own_block_only_where_svitt_does(blocks, repeated):
    """SViTT's topk of K_r = 3 over the other blocks' noise takes the own block again only with exactly 3
    blocks (with 2 its topk fails; we take each block once)."""
    pattern = block_pattern_from_noise(torch.rand(blocks, blocks), 8, 1, 3, svitt_blocks=True)
    for row, (keys, valid) in enumerate(zip(pattern.key_blocks.tolist(), pattern.valid.tolist())):
        chosen = [k for k, ok in zip(keys, valid) if ok]
        assert set(chosen) == set(range(blocks))  # K_r = 3 takes every other block of at most 4
        assert chosen.count(row) == (2 if repeated else 1)
