"""The fused kernel as PyTorch operators (``svitt_ego::sparse_attention_fwd`` / ``_bwd``) on the CPU, where
their implementation is the blocked math: numerics, opcheck, the fakes' buffers, torch.compile, FLOPs."""

import os
import subprocess
import sys

import pytest
import torch
from attention_helpers import attention_inputs, max_relative_error, outputs_and_grads
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from svitt_ego.config import VisionConfig
from svitt_ego.models import attention, ops, video
from svitt_ego.models.attention import reference_attention, triton_attention
from svitt_ego.models.block_pattern import BlockPattern, sample_block_pattern
from svitt_ego.models.video import VideoEncoder

FWD, BWD = torch.ops.svitt_ego.sparse_attention_fwd, torch.ops.svitt_ego.sparse_attention_bwd


def hand_pattern() -> BlockPattern:
    """5 tokens in blocks of 2 ({0, 1}, {2, 3}, {4}); invalid slots at either end of a row."""
    return BlockPattern(key_blocks=torch.tensor([[2, 0], [1, 0], [0, 2]]),
                        valid=torch.tensor([[False, True], [True, True], [True, False]]), block_size=2)


@pytest.mark.parametrize("per_sample,with_probs", [(True, True), (False, False)])
def test_op_on_the_cpu_equals_the_reference(per_sample, with_probs):
    q, k, v, positions, bias = attention_inputs(3, 2, 45, 8, frames=4, grid=4, per_sample=per_sample)
    pattern = sample_block_pattern(45, 8, 3, 2, generator=torch.Generator().manual_seed(0))
    if with_probs:
        got = outputs_and_grads(triton_attention, q, k, v, positions, bias, pattern)
        ref = outputs_and_grads(reference_attention, q, k, v, positions, bias, pattern)
        assert max_relative_error(got, ref) <= 1e-10
    else:  # no gradient reaches cls_probs: the backward op gets None
        grads = []
        for fn in (reference_attention, triton_attention):
            leaves = (q, k, v, bias.table)
            grads.append(torch.autograd.grad(fn(q, k, v, positions, bias, pattern)[0].square().sum(), leaves))
        assert max((a - b).abs().max().item() for a, b in zip(*grads)) <= 1e-10


def test_forward_op_returns_the_logsumexp_of_every_row():
    """lse is what the kernel keeps: logsumexp of the row's scores with the bias, over the allowed keys."""
    q, k, v, positions, bias = attention_inputs(1, 1, 5, 4, frames=1, grid=4, per_sample=False)
    pattern = hand_pattern()
    _, _, lse = FWD(q, k, v, bias.table, positions, pattern.key_blocks, pattern.valid, 2, 1, 4)
    allowed = {0: range(6), 1: [0, 1, 2], 3: [0, 1, 2, 3, 4], 5: [0, 1, 2]}  # token 4 (row 5) sees block 0
    for row, keys in allowed.items():
        scores = [q[0, 0, row] @ k[0, 0, j] / 2 + bias(positions[:, row:row + 1], positions[:, j:j + 1]).reshape(())
                  for j in keys]
        assert torch.allclose(lse[0, 0, row], torch.stack(scores).logsumexp(0).float())
    assert lse.dtype == torch.float32 and lse.shape == (1, 1, 6)


@pytest.mark.parametrize("per_sample,batch", [(True, 2), (False, 3)])
def test_opcheck(per_sample, batch):
    """Schema, autograd registration, fake against real, AOT dispatch with dynamic shapes; the backward
    with and without a [CLS]-probabilities gradient."""
    q, k, v, positions, bias = attention_inputs(batch, 2, 21, 8, frames=2, grid=4, per_sample=per_sample,
                                                dtype=torch.float32)
    pattern = sample_block_pattern(21, 4, 3, 1, generator=torch.Generator().manual_seed(0))
    args = (q, k, v, bias.table, positions, pattern.key_blocks, pattern.valid, 4, 2, 4)
    torch.library.opcheck(FWD.default, args)
    out, probs, lse = (t.detach() for t in FWD(*args))
    saved = (q.detach(), k.detach(), v.detach(), out, lse, *(a.detach() for a in args[3:7]), 4, 2, 4)
    grad_probs = torch.randn_like(probs) if per_sample else None
    torch.library.opcheck(BWD.default, (torch.randn_like(out), grad_probs, *saved))


def test_fake_backward_returns_the_kernels_workspaces():
    """fp16 activations, fp32 table, shared positions, batch 3 (one chunk): the fake allocates what the
    CUDA backward does, the gradients in their inputs' dtypes then the workspaces."""
    B, H, n, D, G = 3, 2, 45, 16, 8
    pattern = sample_block_pattern(n, G, 1, 2, generator=torch.Generator().manual_seed(0))  # 6 blocks, width 3
    with FakeTensorMode():
        q, k, v, out = (torch.empty(B, H, 1 + n, D, dtype=torch.float16) for _ in range(4))
        lse, table = torch.empty(B, H, 1 + n), torch.empty(7 * 49 + 3, H)
        positions, key_blocks, valid = torch.empty(1, 1 + n, dtype=torch.long), *(
            torch.empty(t.shape, dtype=t.dtype) for t in (pattern.key_blocks, pattern.valid))
        dq, dk, dv, dtable, workspaces = BWD(out, None, q, k, v, out, lse, table, positions, key_blocks, valid,
                                             G, 4, 4)
    assert [(t.shape, t.dtype) for t in (dq, dk, dv, dtable)] == [((B, H, 1 + n, D), torch.float16)] * 3 + [
        ((7 * 49 + 3, H), torch.float32)]
    assert [(tuple(t.shape), t.dtype) for t in workspaces] == [
        ((7, 6), torch.int32),  # the transposed pattern: per key tile, its visitors, then the counts
        ((B, H, 1 + n), torch.float32),  # delta
        ((B, H, 1 + n, D), torch.float32),  # the fp32 dQ accumulator
        ((1 * H * 6 * 3 * 16 * 16,), torch.float32),  # the table gradient's slots: chunk x head x pair x tile^2
    ]


def test_the_ops_register_without_triton():
    """The fakes and the CPU implementation need neither Triton nor a GPU: a planner can run anywhere."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from svitt_ego.models.attention import triton_attention\n"
            "from svitt_ego.models.block_pattern import sample_block_pattern\n"
            "from svitt_ego.models.position_bias import RelativePositionBias3D\n"
            "q = torch.randn(2, 2, 17, 8, requires_grad=True)\n"
            "out, _ = triton_attention(q, q, q, torch.arange(-1, 16)[None], RelativePositionBias3D(1, 4, 2),"
            " sample_block_pattern(16, 4, 1, 1))\n"
            "out.sum().backward()\n"
            "print(torch.ops.svitt_ego.sparse_attention_fwd.default, q.grad.shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["svitt_ego.sparse_attention_fwd.default", "torch.Size([2,", "2,", "17,", "8])"]


def test_a_compiled_encoder_traces_the_ops_without_a_graph_break(monkeypatch):
    """A pruning video encoder on the ``triton`` backend, compiled whole (``fullgraph=True`` raises at a
    graph break) for forward and backward: the ops are in the graphs, the gradients are eager's."""
    monkeypatch.setattr(video, "resolve_backend", lambda name, *args: attention.BACKENDS[name])
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, num_frames=2, block_size=4,
                       prune_layers=[0], backend="triton")
    model = VideoEncoder(cfg).train()
    frames = torch.randn(2, 2, 3, 32, 32)
    graphs = []

    def keep(graph, inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    def step(frames):
        out = model(frames)
        return out.tokens.square().mean() + out.pooled.sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))):
        torch.manual_seed(0)  # the same block patterns and drop path
        model.zero_grad()
        fn(frames).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) <= 1e-6
    assert all(g.abs().sum() > 0 for g in grads[0])
    forward, backward = (sum(node.target == op.default for node in graph.graph.nodes)
                         for graph, op in zip(graphs, (FWD, BWD)))
    assert (forward, backward) == (2, 2)  # one a layer


def test_flop_counter_counts_the_pattern_by_hand():
    """5 tokens in blocks of 2 (``hand_pattern``): query block 0 sees block 0 (2 x 2 pairs), block 1 sees
    blocks 1 and 0 (2 x 2 + 2 x 2), block 2 (one token) sees block 0 (1 x 2); plus [CLS] with all 6 keys
    and each of the 5 patch queries with [CLS]: 25 pairs. 4 D FLOPs a pair forward, 10 D backward."""
    B, H, D = 1, 2, 16
    q, k, v, positions, bias = attention_inputs(B, H, 5, D, frames=1, grid=4, per_sample=False,
                                                dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out, _ = triton_attention(q, k, v, positions, bias, hand_pattern())
        out.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert (counts[FWD], counts[BWD]) == (4 * B * H * D * 25, 10 * B * H * D * 25)
    # Without values (FakeTensor) every slot counts as a valid, full block: 5 queries x 2 slots x 2 keys.
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(hand_pattern().valid)
    assert ops.attended_pairs(5, hand_pattern().key_blocks, fake, 2) == 6 + 5 + 20
