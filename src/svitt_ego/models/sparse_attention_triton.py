"""The ``triton`` backend: edge-sparse attention with the 3D relative position bias in one fused kernel.

Layout: query tile ``b`` holds the ``G`` patch tokens of block ``b``, padded to
``BLOCK = BlockPattern.tile_size`` rows (64 for G = 56; the padding rows masked). It visits the
[CLS] key and its key blocks, each loaded as one ``BLOCK``-row tile (the tokens past ``G`` or past
the last token masked).
The bias is looked up inside the kernel from the two tokens' kept positions: each token carries
one int32, its :meth:`RelativePositionBias3D.offset_code`, and the table row of a pair is the
difference of their codes plus the table's center row. Scores and the online softmax are fp32
whatever the input dtype, and the forward stores each row's logsumexp.

The backward follows FlashAttention-2: one kernel per query tile computes dQ (and adds dS into an
fp32 copy of the bias table with atomics, since many pairs share a table row), one kernel per key
tile computes dK and dV over the query tiles that visited it (the transposed pattern). The [CLS]
key's dK / dV are per-tile partial sums reduced afterwards, without atomics.

The [CLS] query row (dense over all keys) is not computed here: :func:`sparse_attention` is the
patch rows; :mod:`svitt_ego.models.attention` adds the [CLS] row with plain PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from svitt_ego.models.block_pattern import BlockPattern
from svitt_ego.models.position_bias import PATCH_TO_CLS_ROW, RelativePositionBias3D

# Warps per program for 64-row tiles of head dim 64, chosen from ptxas's report for sm_90 (fp16): the
# forward needs 168 registers a thread with 4 warps, no spills; with 4 warps both backward kernels hit
# the 255-register cap and one spills, with 8 they fit.
FORWARD_WARPS, BACKWARD_WARPS = 4, 8

@triton.jit
def _tile(ptr, batch_stride, head_stride, row_stride, batch, head, tile, n,
          G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          FIRST_ROW: tl.constexpr):
    """Patch tokens ``tile * G ..`` of one (batch, head) with their indices and mask.

    Token ``t`` is row ``FIRST_ROW + t``: 1 in a sequence with [CLS] in front, 0 in the patch-only output.
    """
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    token = tile * G + rows
    ok = (rows < G) & (token < n)
    offsets = batch * batch_stride + head * head_stride + (FIRST_ROW + token)[:, None] * row_stride + dims[None, :]
    x = tl.load(ptr + offsets, mask=ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    return x, token, ok


@triton.jit
def _cls_vector(ptr, batch_stride, head_stride, batch, head, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    return tl.load(ptr + batch * batch_stride + head * head_stride + dims, mask=dims < HEAD_DIM,
                   other=0.0).to(tl.float32)


@triton.jit
def _scores(q, k, query_code, key_code, q_ok, k_ok, table_center, scale, PRECISION: tl.constexpr):
    """fp32 scores with the bias (table row: code difference + center row); keys outside the block are -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    both = q_ok[:, None] & k_ok[None, :]
    s += tl.load(table_center + (query_code[:, None] - key_code[None, :]), mask=both, other=0.0)
    return tl.where(k_ok[None, :], s, float("-inf"))


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, CODES, TABLE, KEY_BLOCKS, KEY_COUNT,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    code_stride, n, num_heads, table_rows, center, width, scale,
                    G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    CLS_ROW: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    table_head = TABLE + head * table_rows
    q, q_token, q_ok = _tile(Q, sqb, sqh, sqn, batch, head, tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
    query_code = tl.load(CODES + batch * code_stride + 1 + q_token, mask=q_ok, other=0)
    # The [CLS] key starts the online softmax: every row has at least this one finite score.
    k0 = _cls_vector(K, skb, skh, batch, head, HEAD_DIM, BLOCK_D)
    v0 = _cls_vector(V, svb, svh, batch, head, HEAD_DIM, BLOCK_D)
    m = tl.sum(q.to(tl.float32) * k0[None, :], 1) * scale + tl.load(table_head + CLS_ROW)
    total = tl.full([BLOCK], 1.0, tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32) + v0[None, :]
    for w in range(0, tl.load(KEY_COUNT + tile)):
        key_tile = tl.load(KEY_BLOCKS + tile * width + w)
        k, k_token, k_ok = _tile(K, skb, skh, skn, batch, head, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
        v, _, _ = _tile(V, svb, svh, svn, batch, head, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
        key_code = tl.load(CODES + batch * code_stride + 1 + k_token, mask=k_ok, other=0)
        s = _scores(q, k, query_code, key_code, q_ok, k_ok, table_head + center, scale, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    dims = tl.arange(0, BLOCK_D)
    out_offsets = batch * sob + head * soh + q_token[:, None] * son + dims[None, :]
    tl.store(O + out_offsets, (acc / total[:, None]).to(O.dtype.element_ty),
             mask=q_ok[:, None] & (dims[None, :] < HEAD_DIM))
    tl.store(LSE + (batch * num_heads + head) * n + q_token, m + tl.log(total), mask=q_ok)


@triton.jit
def _backward_query_kernel(Q, K, V, DO, LSE, DELTA, DQ, CLS_DKV, CODES, TABLE, DTABLE, KEY_BLOCKS, KEY_COUNT,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                           code_stride, n, num_heads, num_tiles, table_rows, center, width, scale,
                           G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           CLS_ROW: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one query tile, its share of the [CLS] key's dK / dV, and dS into the table."""
    tile = tl.program_id(0)
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    table_head = TABLE + head * table_rows
    dtable_head = DTABLE + head * table_rows
    q, q_token, q_ok = _tile(Q, sqb, sqh, sqn, batch, head, tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
    do, _, _ = _tile(DO, sdb, sdh, sdn, batch, head, tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 0)
    query_code = tl.load(CODES + batch * code_stride + 1 + q_token, mask=q_ok, other=0)
    row = (batch * num_heads + head) * n + q_token
    lse = tl.load(LSE + row, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=q_ok, other=0.0)
    k0 = _cls_vector(K, skb, skh, batch, head, HEAD_DIM, BLOCK_D)
    v0 = _cls_vector(V, svb, svh, batch, head, HEAD_DIM, BLOCK_D)
    s0 = tl.sum(q.to(tl.float32) * k0[None, :], 1) * scale + tl.load(table_head + CLS_ROW)
    p0 = tl.where(q_ok, tl.exp(s0 - lse), 0.0)
    ds0 = p0 * (tl.sum(do.to(tl.float32) * v0[None, :], 1) - delta)
    dq = ds0[:, None] * k0[None, :]
    tl.atomic_add(dtable_head + CLS_ROW, tl.sum(ds0, 0), sem="relaxed")  # read only after the kernel
    dims = tl.arange(0, BLOCK_D)
    partial = CLS_DKV + ((batch * num_heads + head) * num_tiles + tile) * 2 * BLOCK_D + dims
    tl.store(partial, tl.sum(ds0[:, None] * q.to(tl.float32), 0) * scale)
    tl.store(partial + BLOCK_D, tl.sum(p0[:, None] * do.to(tl.float32), 0))
    for w in range(0, tl.load(KEY_COUNT + tile)):
        key_tile = tl.load(KEY_BLOCKS + tile * width + w)
        k, k_token, k_ok = _tile(K, skb, skh, skn, batch, head, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
        v, _, _ = _tile(V, svb, svh, svn, batch, head, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
        key_code = tl.load(CODES + batch * code_stride + 1 + k_token, mask=k_ok, other=0)
        s = _scores(q, k, query_code, key_code, q_ok, k_ok, table_head + center, scale, PRECISION)
        both = q_ok[:, None] & k_ok[None, :]
        p = tl.where(both, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.atomic_add(dtable_head + center + (query_code[:, None] - key_code[None, :]), ds, mask=both, sem="relaxed")
    offsets = batch * sgb + head * sgh + (1 + q_token)[:, None] * sgn + dims[None, :]
    tl.store(DQ + offsets, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (dims[None, :] < HEAD_DIM))


@triton.jit
def _backward_key_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CODES, TABLE, QUERY_BLOCKS, QUERY_COUNT,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                         code_stride, n, num_heads, num_tiles, table_rows, center, scale,
                         G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dK and dV of one key tile, over the query tiles that visited it."""
    key_tile = tl.program_id(0)
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    table_head = TABLE + head * table_rows
    k, k_token, k_ok = _tile(K, skb, skh, skn, batch, head, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
    v, _, _ = _tile(V, svb, svh, svn, batch, head, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
    key_code = tl.load(CODES + batch * code_stride + 1 + k_token, mask=k_ok, other=0)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for j in range(0, tl.load(QUERY_COUNT + key_tile)):
        tile = tl.load(QUERY_BLOCKS + key_tile * num_tiles + j)
        q, q_token, q_ok = _tile(Q, sqb, sqh, sqn, batch, head, tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 1)
        do, _, _ = _tile(DO, sdb, sdh, sdn, batch, head, tile, n, G, BLOCK, HEAD_DIM, BLOCK_D, 0)
        query_code = tl.load(CODES + batch * code_stride + 1 + q_token, mask=q_ok, other=0)
        row = (batch * num_heads + head) * n + q_token
        lse = tl.load(LSE + row, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=q_ok, other=0.0)
        s = _scores(q, k, query_code, key_code, q_ok, k_ok, table_head + center, scale, PRECISION)
        p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dims = tl.arange(0, BLOCK_D)
    mask = k_ok[:, None] & (dims[None, :] < HEAD_DIM)
    offsets = batch * sgb + head * sgh + (1 + k_token)[:, None] * sgn + dims[None, :]
    tl.store(DK + offsets, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=mask)


def kernel_pattern(pattern: BlockPattern) -> tuple[torch.Tensor, ...]:
    """The pattern as the kernels read it, built on the pattern's device without synchronising.

    Returns each query tile's key tiles (valid ones first) and their count, and the transposed
    pattern: each key tile's query tiles (visitors first) and their count.
    """
    nb = pattern.num_blocks
    order = (~pattern.valid).to(torch.int8).argsort(dim=1, stable=True)
    key_blocks = pattern.key_blocks.gather(1, order).int().contiguous()
    key_count = pattern.valid.sum(1).int()
    visits = torch.zeros(nb, nb, dtype=torch.bool, device=pattern.valid.device)
    visits.scatter_(1, pattern.key_blocks, pattern.valid)  # [query tile, key tile]
    query_blocks = (~visits.t()).to(torch.int8).argsort(dim=1, stable=True).int().contiguous()
    return key_blocks, key_count, query_blocks, visits.sum(0).int()


def _launch_constants(q, pattern: BlockPattern) -> dict:
    head_dim = q.shape[-1]
    return dict(G=pattern.block_size, BLOCK=pattern.tile_size, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _strides(*tensors):
    return [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, table, codes, center, pattern):
        B, H, N, D = q.shape
        n, nb = N - 1, pattern.num_blocks
        key_blocks, key_count, query_blocks, query_count = kernel_pattern(pattern)
        table_t = table.detach().float().t().contiguous()  # [H, rows]: one head's rows contiguous
        out = q.new_empty(B, H, n, D)
        lse = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
        consts = _launch_constants(q, pattern)
        rows = table_t.shape[1]
        _forward_kernel[(nb, B * H)](q, k, v, out, lse, codes, table_t, key_blocks, key_count,
                                     *_strides(q, k, v, out), codes.stride(0), n, H, rows, center,
                                     key_blocks.shape[1], D**-0.5, CLS_ROW=rows + PATCH_TO_CLS_ROW,
                                     num_warps=FORWARD_WARPS, **consts)
        ctx.save_for_backward(q, k, v, out, lse, codes, table_t, key_blocks, key_count, query_blocks, query_count)
        ctx.consts, ctx.center, ctx.table_dtype = consts, center, table.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, codes, table_t, key_blocks, key_count, query_blocks, query_count = ctx.saved_tensors
        B, H, N, D = q.shape
        n, nb = N - 1, key_blocks.shape[0]
        consts = ctx.consts
        grad_out = grad_out.contiguous()
        delta = (grad_out.float() * out.float()).sum(-1)
        dq = torch.zeros(q.shape, device=q.device, dtype=q.dtype)  # the [CLS] row's share comes from PyTorch
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        cls_dkv = torch.empty(B, H, nb, 2, consts["BLOCK_D"], device=q.device, dtype=torch.float32)
        dtable = torch.zeros_like(table_t)
        rows, scale = table_t.shape[1], D**-0.5
        _backward_query_kernel[(nb, B * H)](q, k, v, grad_out, lse, delta, dq, cls_dkv, codes, table_t, dtable,
                                            key_blocks, key_count, *_strides(q, k, v, grad_out, dq),
                                            codes.stride(0), n, H, nb, rows, ctx.center, key_blocks.shape[1],
                                            scale, CLS_ROW=rows + PATCH_TO_CLS_ROW, num_warps=BACKWARD_WARPS,
                                            **consts)
        _backward_key_kernel[(nb, B * H)](q, k, v, grad_out, lse, delta, dk, dv, codes, table_t,
                                          query_blocks, query_count, *_strides(q, k, v, grad_out, dk),
                                          codes.stride(0), n, H, nb, rows, ctx.center, scale,
                                          num_warps=BACKWARD_WARPS, **consts)
        cls_dkv = cls_dkv.sum(2)[..., :D]
        dk[:, :, 0], dv[:, :, 0] = cls_dkv[:, :, 0], cls_dkv[:, :, 1]
        return dq, dk, dv, dtable.t().contiguous().to(ctx.table_dtype), None, None, None


def sparse_attention(q, k, v, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern) -> torch.Tensor:
    """The patch query rows ``[B, H, n, D]`` of edge-sparse attention (the [CLS] row is left to the caller).

    ``q``, ``k``, ``v`` are ``[B, H, 1 + n, D]`` with unit stride along D, ``positions`` ``[1 or B, 1 + n]``.
    """
    k, v = k.to(q.dtype), v.to(q.dtype)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    codes = rel_bias.offset_code(positions.to(q.device)).to(torch.int32).expand(q.shape[0], -1).contiguous()
    return _SparseAttention.apply(q, k, v, rel_bias.table, codes, rel_bias.center_row, pattern)
