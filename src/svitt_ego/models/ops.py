"""The fused edge-sparse attention as PyTorch operators, so that FakeTensor, ``torch.compile`` and
``FlopCounterMode`` see it as what it is.

Importing this module (which :mod:`svitt_ego.models.attention` does) registers, once, with
``torch.library.custom_op``; neither Triton nor a GPU is needed for that:

- ``svitt_ego::sparse_attention_fwd(q, k, v, table, positions, key_blocks, valid, block_size, num_frames,
  grid_size)``
  -> ``(out, cls_probs, lse)``: the output ``[B, H, 1 + n, D]`` and the [CLS] probabilities
  ``[B, H, 1 + n]`` in q's dtype, and the logsumexp of every row ``[B, H, 1 + n]`` in fp32 (kept for the
  backward, not differentiable). The block pattern travels as its two tensors and ``G``, the bias as
  its table and layout (frames, grid).
- ``svitt_ego::sparse_attention_bwd(grad_out, grad_probs, q, k, v, out, lse, table, positions,
  key_blocks, valid, block_size, num_frames, grid_size)`` -> ``(dq, dk, dv, dtable, workspaces)``: the gradients in
  their inputs' dtypes, then the backward's workspaces (:func:`backward_buffers`), returned so that a
  memory tracker over FakeTensors sees them live until the op ends, as they are on the GPU (what a fake
  implementation allocates and drops inside itself no dispatch mode above it sees).

``register_autograd`` saves what the kernels save: q, k, v, out, lse, the table, positions and the
pattern. Each fake allocates what the CUDA implementation allocates, with the same dtypes and
shapes, through the same function. The implementations: on CUDA, and on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``: the tests and ``benchmarks/kernel_*.py``), the Triton kernels of
:mod:`svitt_ego.models.sparse_attention_triton`; otherwise on the CPU the blocked math
(:mod:`svitt_ego.models.blocked`), the backward by recomputing it under autograd (its workspaces
zeros). The FLOP formulas count the attended (query, key) pairs of the pattern
(:func:`attended_pairs`): 4 D FLOPs a pair forward (QK^T, PV), 10 D backward (S, dV, dP, dK, dQ).

Dispatch modes see them as ``torch.ops.svitt_ego.sparse_attention_fwd.default`` and ``..._bwd.default``;
``hasattr(torch.ops.svitt_ego, "sparse_attention_fwd")`` says whether this module has registered them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.flop_counter import register_flop_formula

from svitt_ego.models.block_pattern import BlockPattern
from svitt_ego.models.blocked import blocked_attention, blocked_logsumexp
from svitt_ego.models.position_bias import RelativePositionBias3D, center_row

# Batch elements one key-kernel program takes when the batch shares the positions: its table
# gradient goes through that many per-program slots before one atomic add (see the kernels' module).
BATCH_CHUNK = 16
GRADIENTS = ("dq", "dk", "dv", "dtable")


def triton_attention(q, k, v, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern):
    """The fused Triton kernels: edge-sparse attention ``[B, H, 1 + n, D]`` and the [CLS] query's
    probabilities ``[B, H, 1 + n]``. ``q``, ``k``, ``v`` are ``[B, H, 1 + n, D]`` (any strides),
    ``positions`` ``[1 or B, 1 + n]``."""
    k, v = (t if t.dtype == q.dtype else t.to(q.dtype) for t in (k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.shape[2] * max(t.stride(2) for t in (q, k, v)) >= 2**31:
        raise ValueError(f"{q.shape[2]} tokens x row stride {max(t.stride(2) for t in (q, k, v))} do not fit "
                         "the kernel's int32 offsets inside one (batch, head)")
    if positions.device != q.device or positions.stride(-1) != 1:
        positions = positions.to(q.device).contiguous()
    table = rel_bias.table if rel_bias.table.is_contiguous() else rel_bias.table.contiguous()
    out, cls_probs, _ = sparse_attention_fwd(q, k, v, table, positions, pattern.key_blocks, pattern.valid,
                                             pattern.block_size, rel_bias.num_frames, rel_bias.grid_size)
    return out, cls_probs


def _kernels_run_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    from svitt_ego.models import sparse_attention_triton  # imports Triton: only where the kernels run

    return sparse_attention_triton


def _blocked(q, k, v, table, positions, pattern: BlockPattern, num_frames: int, grid_size: int,
             with_lse: bool = False):
    """The blocked math on the op's arguments (the table as a functional parameter of the bias)."""
    with torch.device("meta"):
        module = RelativePositionBias3D(num_frames, grid_size, table.shape[1])

    def bias(query_pos, key_pos):
        return torch.func.functional_call(module, {"table": table}, (query_pos, key_pos))

    out, cls_probs = blocked_attention(q, k, v, positions, bias, pattern)
    if not with_lse:
        return out, cls_probs
    return out, cls_probs, blocked_logsumexp(q, k, positions, bias, pattern)


@torch.library.custom_op("svitt_ego::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(q: Tensor, k: Tensor, v: Tensor, table: Tensor, positions: Tensor, key_blocks: Tensor,
                         valid: Tensor, block_size: int, num_frames: int,
                         grid_size: int) -> tuple[Tensor, Tensor, Tensor]:
    pattern = BlockPattern(key_blocks, valid, block_size)
    if _kernels_run_on(q.device):
        return _kernels().forward(q, k, v, table, positions, pattern, grid_size, center_row(num_frames, grid_size))
    out, cls_probs, lse = _blocked(q, k, v, table, positions, pattern, num_frames, grid_size, with_lse=True)
    return out.contiguous(), cls_probs.contiguous(), lse


@sparse_attention_fwd.register_fake
def _(q, k, v, table, positions, key_blocks, valid, block_size, num_frames, grid_size):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N), q.new_empty(B, H, N, dtype=torch.float32)


def batch_chunk(batch: int, positions: Tensor) -> int:
    """Batch elements one key-kernel program takes: :data:`BATCH_CHUNK` (at most the batch) where the
    batch shares the positions, else 1."""
    shared = positions.shape[0] == 1 or positions.stride(0) == 0
    return min(batch, BATCH_CHUNK) if shared else 1


def backward_buffers(q: Tensor, table: Tensor, positions: Tensor, pattern: BlockPattern) -> dict[str, Tensor]:
    """Every tensor the kernels' backward writes, as it allocates them: the transposed pattern ``pairs``
    (int32 ``[nb + 1, nb]``), ``delta`` (fp32 ``[B, H, N]``), the fp32 dQ accumulator ``dq32``, ``dk`` and
    ``dv`` (q's dtype), the zeroed fp32 table gradient ``dtable32``, the table gradient's per-program
    ``slots`` (fp32, where batch chunks > 1), and ``dq`` and ``dtable`` in their inputs' dtypes (for fp32
    the accumulators themselves)."""
    B, H, N, D = q.shape
    nb, width = pattern.key_blocks.shape
    chunk, tile = batch_chunk(B, positions), pattern.tile_size

    def empty(*shape, dtype=q.dtype):  # torch.empty: one aten op a buffer (the host's cost counts)
        return torch.empty(shape, dtype=dtype, device=q.device)

    f32 = torch.float32
    buffers = dict(pairs=empty(nb + 1, nb, dtype=torch.int32), delta=empty(B, H, N, dtype=f32),
                   dq32=empty(B, H, N, D, dtype=f32), dk=empty(B, H, N, D), dv=empty(B, H, N, D),
                   dtable32=torch.zeros(table.shape, dtype=f32, device=q.device))
    if chunk > 1:
        buffers["slots"] = empty(-(-B // chunk) * H * nb * width * tile * tile, dtype=f32)
    buffers["dq"] = buffers["dq32"] if q.dtype == f32 else empty(B, H, N, D)
    buffers["dtable"] = buffers["dtable32"] if table.dtype == f32 else empty(*table.shape, dtype=table.dtype)
    return buffers


def _outputs(buffers: dict[str, Tensor]):
    """The gradients, then the other buffers (the workspaces)."""
    grads = [buffers[name] for name in GRADIENTS]
    workspaces = [t for name, t in buffers.items() if name not in GRADIENTS and all(t is not g for g in grads)]
    return *grads, workspaces


@torch.library.custom_op("svitt_ego::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd(grad_out: Tensor, grad_probs: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                         out: Tensor, lse: Tensor, table: Tensor, positions: Tensor, key_blocks: Tensor,
                         valid: Tensor, block_size: int, num_frames: int,
                         grid_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    pattern = BlockPattern(key_blocks, valid, block_size)
    buffers = backward_buffers(q, table, positions, pattern)
    if _kernels_run_on(q.device):
        _kernels().backward(grad_out, grad_probs, q, k, v, out, lse, table, positions, pattern, grid_size,
                            center_row(num_frames, grid_size), buffers, batch_chunk(q.shape[0], positions))
        return _outputs(buffers)
    for t in buffers.values():  # deterministic workspaces
        t.zero_()
    with _autograd_recorded():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, table)]
        out, cls_probs = _blocked(*leaves, positions, pattern, num_frames, grid_size)
        outputs, grads = ((out,), (grad_out,)) if grad_probs is None else ((out, cls_probs), (grad_out, grad_probs))
        for name, grad in zip(GRADIENTS, torch.autograd.grad(outputs, leaves, grads)):
            buffers[name].copy_(grad)
    return _outputs(buffers)


@contextlib.contextmanager
def _autograd_recorded():
    """Autograd inside an operator's implementation, which ``torch.library`` runs with the autograd keys
    excluded (the blocked backward recomputes its forward under autograd; ``torch.func.vjp`` would do too,
    but fails ``opcheck``'s schema check)."""
    key = torch._C.DispatchKey.AutogradFunctionality
    excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, excluded)


@sparse_attention_bwd.register_fake
def _(grad_out, grad_probs, q, k, v, out, lse, table, positions, key_blocks, valid, block_size, num_frames,
      grid_size):
    return _outputs(backward_buffers(q, table, positions, BlockPattern(key_blocks, valid, block_size)))


def _setup_context(ctx, inputs, output):
    q, k, v, table, positions, key_blocks, valid, block_size, num_frames, grid_size = inputs
    out, _, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, positions, key_blocks, valid)
    ctx.layout = block_size, num_frames, grid_size
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_probs, _):
    q, k, v, out, lse, table, positions, key_blocks, valid = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        grad_out = grad_out.contiguous()
    dq, dk, dv, dtable, _ = sparse_attention_bwd(grad_out, grad_probs, q, k, v, out, lse, table, positions,
                                                 key_blocks, valid, *ctx.layout)
    return dq, dk, dv, dtable, None, None, None, None, None, None


sparse_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attended_pairs(num_patches: int, key_blocks: Tensor, valid: Tensor, block_size: int) -> int:
    """(query, key) pairs the edge-sparse pattern attends to among [CLS] and ``num_patches`` patch tokens:
    the [CLS] query with every key, each patch query with [CLS], and each valid (query block, key block)
    pair of the pattern with the two blocks' token counts (the last block may be partial). Exact for a
    pattern with values; for one without (FakeTensor, meta) every slot counts as a valid, full block."""
    n, G = num_patches, block_size
    nb, width = key_blocks.shape
    if is_fake(valid) or valid.is_meta:
        patch_pairs = n * width * G
    else:
        tokens = (n - G * torch.arange(nb, device=valid.device)).clamp(max=G)
        patch_pairs = int((tokens[:, None] * tokens[key_blocks] * valid).sum())
    return (n + 1) + n + patch_pairs


def _attention_flops(q, key_blocks, valid, block_size, per_pair: int) -> int:
    B, H, N, D = q.shape
    return per_pair * B * H * D * attended_pairs(N - 1, key_blocks, valid, block_size)


@register_flop_formula(torch.ops.svitt_ego.sparse_attention_fwd, get_raw=True)
def _(q, k, v, table, positions, key_blocks, valid, block_size, num_frames, grid_size, out_val=None) -> int:
    return _attention_flops(q, key_blocks, valid, block_size, per_pair=4)  # QK^T and PV: 2 D each


@register_flop_formula(torch.ops.svitt_ego.sparse_attention_bwd, get_raw=True)
def _(grad_out, grad_probs, q, k, v, out, lse, table, positions, key_blocks, valid, block_size, num_frames,
      grid_size, out_val=None) -> int:
    return _attention_flops(q, key_blocks, valid, block_size, per_pair=10)  # S, dV, dP, dK, dQ: 2 D each
