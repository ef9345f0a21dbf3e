"""The ``triton`` backend against ``reference_attention``, run by the Triton interpreter on the CPU.

Not collected by default (its name does not start with ``test_``): ``test_sparse_attention_triton.py``
runs it in a subprocess with ``TRITON_INTERPRET=1``, which must be set before Triton is imported, once
per Triton version (``EXPECTED_TRITON`` names the one the subprocess must have imported).
The interpreter's ``tl.dot`` gives wrong results on bfloat16, so bf16 is checked on CUDA only.
"""

import os

import pytest
import torch
import triton
from attention_helpers import attention_inputs, max_relative_error, outputs_and_grads

from svitt_ego.models import ops, sparse_attention_triton
from svitt_ego.models.attention import reference_attention, triton_attention
from svitt_ego.models.block_pattern import BlockPattern, sample_block_pattern

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def test_runs_the_expected_triton():
    assert triton.__version__ == os.environ["EXPECTED_TRITON"]


def assert_matches_reference(q, k, v, positions, bias, pattern, tol):
    ref = outputs_and_grads(reference_attention, q, k, v, positions, bias, pattern)
    got = outputs_and_grads(triton_attention, q, k, v, positions, bias, pattern)
    assert max_relative_error(got, ref) <= tol


@pytest.mark.parametrize("num_patches,block_size,k_local,k_random,dim,per_sample", [
    (45, 8, 1, 2, 16, True),    # partial last block, pruned positions that differ per sample
    (30, 7, 3, 9, 32, True),    # K_r larger than the free blocks; G not a power of two
    (48, 16, 1, 1, 64, False),  # whole blocks, one set of positions for the batch
    (20, 4, 1, 0, 24, True),    # local only; head dim not a power of two
    (150, 56, 1, 1, 64, True),  # the model's G and head dim, pruned positions per sample
])
def test_triton_equals_reference_fp32(num_patches, block_size, k_local, k_random, dim, per_sample):
    heads = 1 if block_size == 56 else 2  # keeps the interpreter fast
    q, k, v, positions, bias = attention_inputs(2, heads, num_patches, dim, frames=4, grid=7, per_sample=per_sample,
                                                dtype=torch.float32)
    pattern = sample_block_pattern(num_patches, block_size, k_local, k_random,
                                   generator=torch.Generator().manual_seed(0))
    assert_matches_reference(q, k, v, positions, bias, pattern, tol=1e-5)


def test_triton_equals_reference_fp16():
    q, k, v, positions, bias = attention_inputs(2, 2, 45, 16, frames=4, grid=4, per_sample=True,
                                                dtype=torch.float16)
    pattern = sample_block_pattern(45, 8, 1, 2, generator=torch.Generator().manual_seed(0))
    assert_matches_reference(q, k, v, positions, bias, pattern, tol=2e-2)


def test_triton_handles_invalid_slots_anywhere_in_a_row():
    """A hand-made pattern whose invalid entries are not at the end of their row (5 tokens, G = 2)."""
    q, k, v, positions, bias = attention_inputs(1, 2, 5, 16, frames=1, grid=4, per_sample=True,
                                                dtype=torch.float32)
    pattern = BlockPattern(key_blocks=torch.tensor([[2, 0], [1, 0], [0, 2]]),
                           valid=torch.tensor([[False, True], [True, True], [True, False]]), block_size=2)
    assert_matches_reference(q, k, v, positions, bias, pattern, tol=1e-5)


def test_triton_reads_strided_views_like_the_model():
    """q, k, v as the model makes them: views of one [B, N, 3, H, D] projection; gradients reach it."""
    B, H, n, D = 2, 2, 21, 16
    qkv = torch.randn(B, n + 1, 3, H, D, requires_grad=True)
    _, _, _, positions, bias = attention_inputs(B, H, n, D, frames=2, grid=4, per_sample=True,
                                                dtype=torch.float32)
    pattern = sample_block_pattern(n, 8, 1, 1, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (reference_attention, triton_attention):
        qkv.grad = None
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out, cls_probs = fn(q, k, v, positions, bias, pattern)
        (out.square().sum() + cls_probs.sum()).backward()
        grads.append((out.detach(), qkv.grad.clone()))
    assert (grads[0][0] - grads[1][0]).abs().max() <= 1e-5
    assert (grads[0][1] - grads[1][1]).abs().max() <= 1e-5


def test_triton_sums_shared_positions_over_batch_chunks(monkeypatch):
    """Shared positions, batch 3 in chunks of 2: the table gradient of a full and of a partial chunk."""
    monkeypatch.setattr(ops, "BATCH_CHUNK", 2)
    q, k, v, positions, bias = attention_inputs(3, 2, 40, 16, frames=2, grid=5, per_sample=False,
                                                dtype=torch.float32)
    pattern = sample_block_pattern(40, 8, 3, 1, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(q, k, v, positions, bias, pattern, tol=1e-5)


@pytest.mark.parametrize("loss", [lambda out: out.square().sum(), lambda out: out.sum()],
                         ids=["square", "sum"])  # out.sum(): an expanded output gradient, all strides 0
def test_triton_gradients_without_a_cls_probs_gradient(loss):
    """As in the model: pruning ranks by ``cls_probs`` but no loss reaches them."""
    q, k, v, positions, bias = attention_inputs(2, 2, 30, 16, frames=2, grid=5, per_sample=True,
                                                dtype=torch.float32)
    pattern = sample_block_pattern(30, 8, 1, 2, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (reference_attention, triton_attention):
        for t in (q, k, v, bias.table):
            t.grad = None
        loss(fn(q, k, v, positions, bias, pattern)[0]).backward()
        grads.append([t.grad.clone() for t in (q, k, v, bias.table)])
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) <= 1e-5


def test_pattern_kernel_transposes_the_pattern():
    """Each key tile's visitors as pairs ``query tile * W + slot``, in query tile order, and their count."""
    pattern = BlockPattern(key_blocks=torch.tensor([[2, 0], [1, 0], [0, 2]]),
                           valid=torch.tensor([[False, True], [True, True], [True, False]]), block_size=2)
    pairs = torch.full((4, 3), -1, dtype=torch.int32)
    sparse_attention_triton._pattern_kernel[(3,)](pattern.key_blocks, pattern.valid, pairs, 2, 2, 3,
                                                  WIDTH=2, TILES_P=4, WIDTH_P=2)
    assert pairs[3].tolist() == [3, 1, 0]  # the counts; key tile 0: query tiles 0, 1, 2; tile 1: 1; tile 2: none
    assert pairs[0].tolist() == [1, 3, 4] and pairs[1, 0].item() == 2


@pytest.mark.parametrize("per_sample,dtype", [(True, torch.float32), (False, torch.float16)])
def test_the_kernel_ops_allocate_what_their_fakes_say(per_sample, dtype):
    """The operators' kernel path (the interpreter's CPU stands for CUDA) against their fakes: every output's
    shape, dtype and strides, the backward's workspaces included (shared positions at batch 3: the slots)."""
    q, k, v, positions, bias = attention_inputs(3, 2, 21, 16, frames=2, grid=4, per_sample=per_sample, dtype=dtype)
    pattern = sample_block_pattern(21, 8, 1, 1, generator=torch.Generator().manual_seed(0))
    args = (q, k, v, bias.table, positions, pattern.key_blocks, pattern.valid, 8, 2, 4)
    torch.library.opcheck(torch.ops.svitt_ego.sparse_attention_fwd.default, args, test_utils="test_faketensor")
    out, probs, lse = (t.detach() for t in torch.ops.svitt_ego.sparse_attention_fwd(*args))
    saved = (q.detach(), k.detach(), v.detach(), out, lse, *(a.detach() for a in args[3:7]), 8, 2, 4)
    torch.library.opcheck(torch.ops.svitt_ego.sparse_attention_bwd.default, (torch.randn_like(out), None, *saved),
                          test_utils="test_faketensor")
