"""The lean layers (layer scale folded into the projections, GELU recomputed in the backward) against the
straightforward maths, and what they keep for the backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svitt_ego.config import TextConfig, VisionConfig
from svitt_ego.models.block_pattern import sample_block_pattern
from svitt_ego.models.text import BertLayer
from svitt_ego.models.video import VideoBlock, VideoEncoder

VISION = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, num_frames=2, block_size=4,
                      prune_layers=[0], drop_path=0.5, backend="blocked")
TEXT = TextConfig(width=32, num_heads=2, intermediate_size=64, dropout=0.3)
# Each output and gradient within this fraction of its largest magnitude. fp32: the same sums in another
# order. CPU autocast bf16 (8 mantissa bits): the unfused scale multiplies a bf16 projection in fp32, the
# folded one is rounded into the bf16 weight.
TOLERANCES = [(False, 1e-5), (True, 2e-2)]


def unfused_block(block, x, positions, pattern):
    """VideoBlock.forward as BEiT writes it: ``gamma * branch`` after the projections, ``nn.GELU`` kept."""
    attn, cls_probs = block.attn(block.norm1(x), positions, pattern)
    x = x + block.drop_path(block.gamma_1 * attn)
    x = x + block.drop_path(block.gamma_2 * block.mlp(block.norm2(x)))
    return x, cls_probs


def unfused_bert(layer, x, mask, video=None, query_weights=None):
    """BertLayer.forward as BERT writes it: ``output.dense(gelu(intermediate.dense(x)))``."""
    x, _ = layer.attention(x, x, mask)
    x, probs = layer.crossattention(x, video, None, query_weights)
    return layer.output(F.gelu(layer.intermediate.dense(x)), x), probs


def _lean_and_unfused(monkeypatch, model, cls, unfused, autocast, step):
    """Output and every parameter's gradient of ``step()``, with ``cls.forward`` as it is and as ``unfused``,
    from the same seed (the same block patterns, drop path and dropout)."""
    runs = []
    for forward in (cls.forward, unfused):
        monkeypatch.setattr(cls, "forward", forward)
        torch.manual_seed(1)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = step()
        # a fixed random direction: a sum of squares after a LayerNorm would have almost no gradient
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out.float() * probe).sum().backward()
        runs.append([out.detach().float()] + [p.grad.clone() for p in model.parameters()])
    assert all(g.abs().sum() > 0 for g in runs[1][1:])
    return runs


def _assert_close(lean, plain, tol):
    for i, (a, b) in enumerate(zip(lean, plain)):
        assert (a - b).abs().max() <= tol * b.abs().max(), i


def _scaled_encoder():
    torch.manual_seed(0)
    model = VideoEncoder(VISION).train()
    for block in model.blocks:  # layer scales far from their init, so that a misplaced one shows
        nn.init.normal_(block.gamma_1), nn.init.normal_(block.gamma_2)
    return model


@pytest.mark.parametrize("autocast, tol", TOLERANCES)
def test_video_encoder_equals_the_unfused_block_maths(monkeypatch, autocast, tol):
    """The encoder's tokens and every parameter's gradient, with drop path on."""
    model, frames = _scaled_encoder(), torch.randn(2, 2, 3, 32, 32)

    def step():
        out = model(frames)
        return torch.cat([out.tokens.flatten(), out.pooled.flatten()])

    lean, plain = _lean_and_unfused(monkeypatch, model, VideoBlock, unfused_block, autocast, step)
    _assert_close(lean, plain, tol)


@pytest.mark.parametrize("autocast, tol", TOLERANCES)
def test_bert_layer_equals_the_unfused_maths(monkeypatch, autocast, tol):
    """A fusion layer (self- and cross-attention, FFN) in training mode, dropout on."""
    torch.manual_seed(0)
    layer = BertLayer(TEXT, video_width=24).train()
    x, video_tokens = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    lean, plain = _lean_and_unfused(monkeypatch, layer, BertLayer, unfused_bert, autocast,
                                    lambda: layer(x, mask, video_tokens)[0])
    _assert_close(lean, plain, tol)


def test_a_video_block_keeps_eight_widths_a_token_less(monkeypatch):
    """fp32, [B, N, C] = [4, 33, 32]. The unfused block also keeps both LayerNorms' outputs and their
    mean and 1 / std (the lean one recomputes them from the input it keeps), the projection's output
    (gamma_1's gradient), the MLP's output (gamma_2's) and GELU's output [B, N, 4C]: 8C + 4 floats a
    token; the lean one keeps the two scaled weights instead, C^2 + 4C^2 floats."""
    torch.manual_seed(0)
    block = VideoBlock(VISION, drop_path=0.0).train()
    B, N, C = 4, 33, 32
    x = torch.randn(B, N, C, requires_grad=True)
    positions = torch.arange(-1, N - 1)[None]
    pattern = sample_block_pattern(N - 1, VISION.block_size, VISION.k_local, VISION.k_random)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def kept():
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, positions, pattern)
        return sum(storages.values())

    lean = kept()
    monkeypatch.setattr(VideoBlock, "forward", unfused_block)
    unfused = kept()
    assert unfused - lean == 4 * (B * N * (8 * C + 4) - 5 * C * C) == 4 * (34320 - 5120)
