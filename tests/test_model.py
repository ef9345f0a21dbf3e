"""The whole model: node sparsity counts, determinism, save / load, re-inflation, sizes."""

import pytest
import torch

from svitt_ego.config import load_config
from svitt_ego.models import SViTTEgo, create_model

SMALL = ["model.vision.width=48", "model.vision.num_heads=2", "model.vision.drop_path=0.0",
         "model.text.width=32", "model.text.depth=4", "model.text.num_fusion_layers=3", "model.text.num_heads=2",
         "model.text.intermediate_size=64", "model.text.vocab_size=120", "model.embed_dim=16"]


def _model(*overrides, preset="svitt_ego_kr3"):
    return SViTTEgo(load_config(preset, [*SMALL, *overrides]).model)


def _text(batch, length=9):
    ids = torch.randint(5, 120, (batch, length))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids, mask


def test_pruning_counts_at_paper_setting():
    """q_v = 0.7 after layers 3, 6, 9 at 4 frames of 224: 784 -> 549 -> 385 -> 270; q_m = 0.1 -> 27 (+ [CLS])."""
    model = _model("model.vision.depth=10").eval()
    frames = torch.randn(2, 4, 3, 224, 224)
    with torch.no_grad():
        video = model.forward_video(frames)
        assert [k.shape[1] for k in video.kept_positions] == [549, 385, 270]
        assert video.tokens.shape[1] == 271
        ids, mask = _text(2)
        fused = model.fusion(model.forward_text(ids, mask), mask, video.tokens)
    assert fused.kept_video_tokens.shape == (2, 28) and (fused.kept_video_tokens[:, 0] == 0).all()
    # Kept tokens keep their original indices, in order, and later sets are subsets of earlier ones.
    for earlier, later in zip(video.kept_positions, video.kept_positions[1:]):
        assert (later.diff(dim=1) > 0).all()
        for b in range(2):
            assert set(later[b].tolist()) <= set(earlier[b].tolist())


def test_pruned_tokens_keep_their_position_bias():
    """Pruning after layer 0 equals running the later layers on the survivors with their original positions."""
    model = _model("model.vision.depth=2", "model.vision.prune_layers=[0]", "model.vision.image_size=64",
                   "model.vision.block_size=8").eval()
    visual = model.visual
    frames = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        out = visual(frames)
        x = visual.embed(frames)
        positions = torch.arange(-1, x.shape[1] - 1)[None]
        x, _ = visual.blocks[0](x, positions, visual.block_pattern(0, x.shape[1] - 1, x.device))
        keep = torch.cat([torch.zeros(2, 1, dtype=torch.long), out.kept_positions[0] + 1], dim=1)
        x = x.gather(1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
        x, _ = visual.blocks[1](x, keep - 1, visual.block_pattern(1, x.shape[1] - 1, x.device))
    assert (x - out.last_hidden_state).abs().max() <= 1e-5


def test_eval_is_deterministic_and_training_resamples():
    model = _model("model.vision.depth=2", "model.vision.image_size=64", "model.vision.block_size=4",
                   "model.vision.k_random=2", "model.vision.prune_layers=[]")
    frames = torch.randn(2, 4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_video(frames), model.encode_video(frames))
    patterns = [model.visual.block_pattern(0, 64, "cpu").key_blocks for _ in range(2)]
    assert torch.equal(*patterns)
    model.train()
    patterns = [model.visual.block_pattern(0, 64, "cpu").key_blocks for _ in range(2)]
    assert not torch.equal(*patterns)
    with torch.no_grad():
        assert not torch.equal(model.encode_video(frames), model.encode_video(frames))


def test_block_patterns_follow_the_pruned_token_counts():
    """64 patches in blocks of 8, q_v = 0.7 after layer 1: 8 blocks, then ceil(0.7 * 64) = 45 tokens in 6."""
    visual = _model("model.vision.depth=4", "model.vision.prune_layers=[1]", "model.vision.image_size=64",
                    "model.vision.block_size=8").visual
    assert visual.tokens_per_layer(64) == [64, 64, 45, 45]
    visual.train()
    patterns = visual.block_patterns(64, torch.device("cpu"))
    assert [p.num_blocks for p in patterns] == [8, 8, 6, 6]
    assert not torch.equal(patterns[0].key_blocks, patterns[1].key_blocks)  # each layer draws its own
    visual.eval()
    patterns = visual.block_patterns(64, torch.device("cpu"))
    fresh = _model("model.vision.depth=4", "model.vision.prune_layers=[1]", "model.vision.image_size=64",
                   "model.vision.block_size=8").visual.eval()
    for layer, (pattern, n) in enumerate(zip(patterns, [64, 64, 45, 45])):
        assert pattern is visual.block_pattern(layer, n, "cpu")  # cached
        assert torch.equal(pattern.key_blocks, fresh.block_pattern(layer, n, "cpu").key_blocks)  # seeded


def test_save_and_load_reproduce_outputs(tmp_path):
    model = _model("model.vision.depth=2", "model.vision.image_size=64", "model.vision.block_size=8",
                   "model.vision.prune_layers=[1]", "model.text.keep_rate=0.5").eval()
    model.save_pretrained(tmp_path)
    loaded = SViTTEgo.from_pretrained(tmp_path).eval()
    frames, (ids, mask) = torch.randn(2, 4, 3, 64, 64), _text(2)
    with torch.no_grad():
        for m in (model, loaded):
            video = m.forward_video(frames)
            m.outputs = (m.video_embedding(video), m.encode_text(ids, mask),
                         m.vtm_logits(m.forward_text(ids, mask), mask, video.tokens),
                         m.mlm_logits(ids, mask, video.tokens))
    for a, b in zip(model.outputs, loaded.outputs):
        assert torch.equal(a, b)


def test_loaded_models_are_in_eval_mode(tmp_path):
    """from_pretrained and load_for_eval (a folder or a training checkpoint) return the model in eval mode,
    as transformers does: two encode_text calls on the same text give the same embedding."""
    from svitt_ego.config import Config
    from svitt_ego.models.loading import load_for_eval

    model = _model("model.vision.depth=1", "model.vision.prune_layers=[]", "model.text.dropout=0.5")
    folder = model.save_pretrained(tmp_path / "model")
    torch.save({"config": Config(model=model.config).to_dict(), "model": model.state_dict()}, tmp_path / "last.pt")
    ids, mask = _text(3)
    for loaded in (SViTTEgo.from_pretrained(folder), load_for_eval(folder)[0], load_for_eval(tmp_path / "last.pt")[0]):
        assert not loaded.training and not any(m.training for m in loaded.modules())
        with torch.no_grad():
            assert torch.equal(loaded.encode_text(ids, mask), loaded.encode_text(ids, mask))
    with torch.no_grad():  # the check has teeth: in training mode, dropout makes the two calls differ
        assert not torch.equal(loaded.train().encode_text(ids, mask), loaded.encode_text(ids, mask))


def test_save_pretrained_replaces_a_model_folder_whole(tmp_path, monkeypatch):
    first, second = (_model("model.vision.depth=1", "model.vision.prune_layers=[]") for _ in range(2))
    folder = first.save_pretrained(tmp_path / "model")
    written = sorted(p.name for p in folder.iterdir())
    second.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and sorted(p.name for p in folder.iterdir()) == written
    assert torch.equal(SViTTEgo.from_pretrained(folder).vision_proj.weight, second.vision_proj.weight)

    def fail(self, staging):
        (staging / "model.safetensors").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(SViTTEgo, "_write_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder left behind
    assert torch.equal(SViTTEgo.from_pretrained(folder).vision_proj.weight, second.vision_proj.weight)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"holds other files \(last\.pt\)"):
        second.save_pretrained(tmp_path / "run")


def test_reinflate_checkpoint_to_more_frames(tmp_path):
    model = _model("model.vision.depth=1", "model.vision.image_size=32", "model.vision.block_size=4",
                   "model.vision.prune_layers=[]")
    model.save_pretrained(tmp_path)
    longer = SViTTEgo.from_pretrained(tmp_path, {"vision": {"num_frames": 8}})
    old = model.visual.blocks[0].attn.rel_pos_bias.table.detach()
    new = longer.visual.blocks[0].attn.rel_pos_bias.table.detach()
    assert new.shape == (15 * 9 + 3, 2)
    old_t, new_t = old[:-3].view(7, 9, 2), new[:-3].view(15, 9, 2)
    # Offsets -7..7 map linearly onto -3..3: 0 and the extremes line up, +1 falls at 3/7.
    assert torch.allclose(new_t[7], old_t[3]) and torch.allclose(new_t[0], old_t[0])
    assert torch.allclose(new_t[14], old_t[6])
    assert torch.allclose(new_t[8], old_t[3] * 4 / 7 + old_t[4] * 3 / 7, atol=1e-7)
    assert torch.equal(new[-3:], old[-3:])
    assert longer.encode_video(torch.randn(1, 8, 3, 32, 32)).shape == (1, 16)


def test_from_pretrained_rejects_mismatched_checkpoint(tmp_path):
    _model("model.vision.depth=1", "model.vision.image_size=32", "model.vision.prune_layers=[]").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'visual\.blocks\.0\.attn\.rel_pos_bias\.table' does not fit: "
                                         r"checkpoint shape \(66, 2\), model shape \(346, 2\)"):
        SViTTEgo.from_pretrained(tmp_path, {"vision": {"patch_size": 8}})


def test_gradient_checkpointing_is_exact():
    overrides = ["model.vision.depth=3", "model.vision.image_size=64", "model.vision.block_size=8",
                 "model.vision.prune_layers=[1]"]
    plain = _model(*overrides).train()
    ckpt = _model(*overrides, "model.vision.grad_checkpointing=true").train()
    ckpt.load_state_dict(plain.state_dict())
    frames = torch.randn(2, 4, 3, 64, 64)
    grads = []
    for m in (plain, ckpt):
        torch.manual_seed(7)
        m.encode_video(frames).square().sum().backward()
        grads.append({n: p.grad for n, p in m.visual.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("rel_pos_bias" in n for n in grads[1])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_paper_presets_have_beit_b_and_bert_base_size():
    for preset in ("svitt_ego_kr3", "svitt_ego_kr5", "dense"):
        with torch.device("meta"):
            model = create_model(load_config(preset).model)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert 85.5e6 < count(model.visual) < 86.5e6  # BEiT-B/16 without absolute positions
        # BERT-base (109.5M without its pooler) + cross-attention in 3 layers (3 x 2.4M) + MLM head transform.
        assert 116e6 < count(model.text) + count(model.fusion) + count(model.mlm_head) < 118e6


def test_text_pooling_cls_or_masked_mean():
    ids, mask = _text(2)
    for pooling in ("cls", "mean"):
        model = _model("model.vision.depth=1", "model.vision.prune_layers=[]", f"model.text.pooling={pooling}").eval()
        with torch.no_grad():
            hidden = model.forward_text(ids, mask)
            pooled = hidden[:, 0] if pooling == "cls" else torch.stack(
                [hidden[b, mask[b].bool()].mean(0) for b in range(2)])
            expected = torch.nn.functional.normalize(model.text_proj(pooled), dim=-1)
            assert torch.allclose(model.encode_text(ids, mask), expected, atol=1e-6)


def test_fusion_pooling_mean_reads_the_masked_mean_and_ignores_padding():
    ids, mask = _text(2)
    model = _model("model.vision.depth=1", "model.vision.prune_layers=[]", "model.vision.image_size=64",
                   "model.vision.block_size=8", "model.text.keep_rate=0.5", "model.text.fusion_pooling=mean").eval()
    with torch.no_grad():
        video = model.forward_video(torch.randn(2, 4, 3, 64, 64)).tokens
        text = model.forward_text(ids, mask)
        fused = model.fusion(text, mask, video).hidden
        pooled = torch.stack([fused[0, :6].mean(0), fused[1].mean(0)])
        torch.testing.assert_close(model.vtm_logits(text, mask, video), model.vtm_head(pooled))
        # Row 0 without its padding gives the same logits.
        short = model.vtm_logits(model.forward_text(ids[:1, :6], mask[:1, :6]), mask[:1, :6], video[:1])
        torch.testing.assert_close(short, model.vtm_logits(text, mask, video)[:1])


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_multimodal_pruning_ranks_by_the_pooled_text_queries(pooling):
    """q_m keeps the video tokens of highest cross-attention, averaged over heads and over the text
    queries that ``fusion_pooling`` pools ([CLS], or every real token)."""
    model = _model("model.vision.depth=1", "model.vision.prune_layers=[]", "model.vision.image_size=64",
                   "model.vision.block_size=8", "model.text.keep_rate=0.25",
                   f"model.text.fusion_pooling={pooling}").eval()
    ids, mask = _text(2)
    with torch.no_grad():
        video = model.forward_video(torch.randn(2, 4, 3, 64, 64)).tokens
        text = model.forward_text(ids, mask)
        kept = model.fusion(text, mask, video).kept_video_tokens
        layer = model.fusion.layers[0]
        x, _ = layer.attention(text, text, mask.bool())
        cross = layer.crossattention.self
        q, k = cross._heads(cross.query(x)), cross._heads(cross.key(video))
        probs = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1).mean(1)  # [B, L, N]
    for b in range(2):
        n_real = int(mask[b].sum())
        scores = probs[b, 0] if pooling == "cls" else probs[b, :n_real].mean(0)
        expected = scores[1:].topk(kept.shape[1] - 1).indices.sort().values + 1
        assert torch.equal(kept[b, 1:], expected)


def test_multimodal_pruning_changes_only_the_fusion_layers_after_the_first():
    """q_m prunes what the later fusion layers see: with one fusion layer (``tiny``) it changes nothing."""
    common = ["model.vision.depth=1", "model.vision.prune_layers=[]", "model.vision.image_size=64",
              "model.vision.block_size=8", "model.text.fusion_pooling=mean"]
    ids, mask = _text(2)
    video = torch.randn(2, 33, 48)
    for layers, same in ((1, True), (2, False)):
        pruned = _model(*common, f"model.text.num_fusion_layers={layers}", "model.text.keep_rate=0.25").eval()
        full = _model(*common, f"model.text.num_fusion_layers={layers}", "model.text.keep_rate=1.0").eval()
        full.load_state_dict(pruned.state_dict())
        with torch.no_grad():
            text = pruned.forward_text(ids, mask)
            a, b = pruned.vtm_logits(text, mask, video), full.vtm_logits(text, mask, video)
        assert torch.equal(a, b) == same
