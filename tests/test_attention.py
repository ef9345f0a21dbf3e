"""Edge sparsity: the block pattern, and the blocked backend against the dense reference."""

import math

import pytest
import torch
from attention_helpers import attention_inputs, max_relative_error, outputs_and_grads

from svitt_ego.models.attention import blocked_attention, dense_attention, flex_attention, reference_attention
from svitt_ego.models.block_pattern import dense_mask, sample_block_pattern
from svitt_ego.models.position_bias import RelativePositionBias3D


def test_pattern_local_random_and_no_repeats():
    g = torch.Generator().manual_seed(1)
    p = sample_block_pattern(num_tokens=784, block_size=56, k_local=3, k_random=3, generator=g)
    assert p.num_blocks == 14
    for b in range(14):
        chosen = p.key_blocks[b][p.valid[b]].tolist()
        assert len(set(chosen)) == len(chosen)  # never the same block twice
        local = {c for c in range(b - 1, b + 2) if 0 <= c < 14}
        assert local <= set(chosen)
        assert len(set(chosen) - local) == 3  # K_r random blocks, none of them local


def test_pattern_caps_random_blocks_at_the_free_ones():
    p = sample_block_pattern(num_tokens=10, block_size=4, k_local=1, k_random=5)  # 3 blocks (4, 4, 2 tokens)
    assert p.key_blocks.shape == (3, 3)
    assert p.valid.all()
    for b in range(3):
        assert sorted(p.key_blocks[b].tolist()) == [0, 1, 2]


def test_dense_mask_by_hand():
    # 5 patch tokens, blocks of 2 -> blocks {0,1} {2,3} {4}; query block 0 sees block 2, block 1 sees 0, 2 sees 1.
    p = sample_block_pattern(5, 2, k_local=1, k_random=0)
    p.key_blocks = torch.tensor([[0, 2], [1, 0], [2, 1]])
    p.valid = torch.ones(3, 2, dtype=torch.bool)
    m = dense_mask(p, 5).int()
    expected = torch.tensor([
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 1],
        [1, 1, 1, 0, 0, 1],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(m, expected)


@pytest.mark.parametrize("num_patches,block_size,k_local,k_random,per_sample", [
    (48, 8, 1, 2, False),   # whole blocks
    (45, 8, 1, 2, True),    # partial last block, pruned token sets that differ per sample
    (30, 7, 3, 9, True),    # K_r larger than the free blocks
    (20, 4, 1, 0, False),   # local only
])
def test_blocked_equals_reference(num_patches, block_size, k_local, k_random, per_sample):
    q, k, v, positions, bias = attention_inputs(3, 2, num_patches, 8, frames=4, grid=4, per_sample=per_sample)
    pattern = sample_block_pattern(num_patches, block_size, k_local, k_random,
                                   generator=torch.Generator().manual_seed(0))
    ref = outputs_and_grads(reference_attention, q, k, v, positions, bias, pattern)
    got = outputs_and_grads(blocked_attention, q, k, v, positions, bias, pattern)
    assert (got[0] - ref[0]).abs().max() <= 1e-5
    assert (got[1] - ref[1]).abs().max() <= 1e-5
    for g_got, g_ref in zip(got[2], ref[2]):
        assert (g_got - g_ref).abs().max() <= 1e-5


def test_reference_is_sparse_attention_written_out():
    """One query by hand: softmax over exactly the allowed keys, with the bias of their offsets."""
    q, k, v, positions, bias = attention_inputs(1, 1, 12, 4, frames=1, grid=4, per_sample=False)
    pattern = sample_block_pattern(12, 4, k_local=1, k_random=1, generator=torch.Generator().manual_seed(3))
    out, _ = reference_attention(q, k, v, positions, bias, pattern)
    i = 6  # patch token 5, in block 1
    allowed = [0] + [1 + j for j in range(12) if j // 4 in pattern.key_blocks[1].tolist()]
    scores = torch.stack([q[0, 0, i] @ k[0, 0, j] / math.sqrt(4) + bias(positions[:, i:i + 1], positions[:, j:j + 1])
                          .reshape(()) for j in allowed])
    expected = scores.softmax(0) @ v[0, 0, allowed]
    assert torch.allclose(out[0, 0, i], expected, atol=1e-10)


def test_dense_backend_equals_reference_without_pattern():
    q, k, v, positions, bias = attention_inputs(2, 2, 16, 8, frames=1, grid=4, per_sample=True)
    out, cls_probs = dense_attention(q, k, v, positions, bias)
    ref_out, ref_cls = reference_attention(q, k, v, positions, bias, None)
    assert (out - ref_out).abs().max() <= 1e-6 and (cls_probs - ref_cls).abs().max() <= 1e-6


def test_flex_forward_equals_reference_on_cpu():
    """FlexAttention has no CPU backward; its forward (compiled for CPU) is checked here, the rest on CUDA."""
    q, k, v, positions, bias = attention_inputs(2, 2, 45, 16, frames=4, grid=4, per_sample=True)
    q, k, v, bias = q.detach().float(), k.detach().float(), v.detach().float(), bias.float()
    pattern = sample_block_pattern(45, 8, 1, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference_attention(q, k, v, positions, bias, pattern)
        got = flex_attention(q, k, v, positions, bias, pattern)
    assert (got[0] - ref[0]).abs().max() <= 1e-5 and (got[1] - ref[1]).abs().max() <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("num_patches,block_size,k_local,k_random", [(784, 56, 1, 3), (549, 56, 1, 5), (45, 8, 3, 9)])
def test_flex_equals_reference_on_cuda(dtype, tol, num_patches, block_size, k_local, k_random):
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, positions, bias = attention_inputs(2, 4, num_patches, 64, frames=4, grid=14, per_sample=True, dtype=dtype,
                                       device="cuda")
    pattern = sample_block_pattern(num_patches, block_size, k_local, k_random,
                                   generator=torch.Generator().manual_seed(0), device="cuda")
    ref = outputs_and_grads(reference_attention, q, k, v, positions, bias, pattern)
    got = outputs_and_grads(flex_attention, q, k, v, positions, bias, pattern)
    assert max_relative_error(got, ref) <= tol


def test_offset_codes_give_the_table_rows_by_hand():
    """Every pair of patches on a 3 x 4 x 4 grid: the fused kernel's row (code difference + center row)
    is ``index``'s; worked out by hand for one pair."""
    bias = RelativePositionBias3D(num_frames=3, grid_size=4, num_heads=1)
    pos = torch.arange(3 * 16)
    codes = bias.offset_code(pos)
    assert torch.equal(codes[:, None] - codes[None, :] + bias.center_row, bias.index(pos[:, None], pos[None, :]))
    # (t, h, w) = (2, 1, 3) against (0, 3, 0): offset (2, -2, 3) -> ((2 + 2) * 7 + (-2 + 3)) * 7 + (3 + 3) = 209
    assert bias.index(torch.tensor(2 * 16 + 1 * 4 + 3), torch.tensor(3 * 4)).item() == 209


def test_tile_size_is_the_next_power_of_two_from_16():
    sizes = {g: sample_block_pattern(4 * g, g, 1, 1).tile_size for g in (4, 8, 16, 17, 56, 64)}
    assert sizes == {4: 16, 8: 16, 16: 16, 17: 32, 56: 64, 64: 64}
