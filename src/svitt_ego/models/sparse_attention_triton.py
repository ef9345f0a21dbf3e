"""The ``triton`` backend: edge-sparse attention with the 3D relative position bias in fused kernels.

Tiles. Query tile ``b`` holds the ``G`` patch tokens of block ``b``, padded to
``BLOCK = BlockPattern.tile_size`` rows (64 for G = 56; the padding rows masked); it visits the
[CLS] key and its key blocks, each loaded as one ``BLOCK``-row tile. The bias is looked up inside
the kernels from the tokens' positions: each patch position gives an offset code
``(t * span + h) * span + w`` (see :meth:`RelativePositionBias3D.offset_code`), and the table row of
a pair is the difference of the two codes plus the table's center row. Scores and softmax
statistics are fp32 whatever the input dtype. The offset of a (batch, head) is int64, offsets
inside one are int32 (:func:`svitt_ego.models.ops.triton_attention` checks that they fit), and the
grids are one-dimensional, so any batch x heads fits.

The model calls these launches through the PyTorch operators of :mod:`svitt_ego.models.ops`, which
also allocate every buffer the backward writes (:func:`~svitt_ego.models.ops.backward_buffers`).

Forward, two launches: ``_forward_kernel`` (one program per query tile, batch element and head;
the online softmax over the [CLS] key and the tile's key tiles, two tile matmuls per pair, the bias
read once per pair) writes the patch rows and their logsumexp; ``_cls_forward_kernel`` (one program
per batch element and head) writes the dense [CLS] query row, its logsumexp and ``cls_probs``, the
[CLS] query's probabilities that node sparsity ranks by.

Backward (FlashAttention-2), four launches:

- ``_pattern_kernel`` transposes the block pattern: each key tile's (query tile, slot) pairs.
- ``_cls_backward_kernel`` (per batch element and head): ``delta = rowsum(dO * O)`` of every row
  (for [CLS] plus ``sum(p * d cls_probs)``; an fp32 buffer beside the logsumexp), the [CLS] key's
  dK / dV and its share of every dQ row (which initialises the fp32 dQ buffer), the [CLS] query's
  dQ, and the three [CLS] table rows.
- ``_backward_key_kernel`` (per key tile, head and batch chunk): dK and dV of the tile in
  registers, over the [CLS] query (vector operations) and the query tiles that visited it (five
  tile matmuls per pair: S, dV, dP, dK, dQ; the bias read once). It computes the transposed tiles
  (S^T = K Q^T), so that P^T and dS^T are the left operands of dV and dK as computed; dQ is added
  to the fp32 buffer with atomics.
- ``_cast_kernel``: the fp32 dQ buffer to q's dtype (skipped for fp32).

The table gradient. A pair's dS goes to the table rows its index tile names, many elements to one
row, so it needs atomics. Where the batch shares the positions (every layer before the first
pruning) the index tile is the same for every batch element: a program takes
``svitt_ego.models.ops.BATCH_CHUNK`` (16) batch elements, adds each one's dS of a pair into a slot
of a private fp32 buffer (plain loads and stores: the slot is the program's own), and only then
adds the slot to the table with one atomic per element: 16x fewer table atomics at batch 16. With
per-sample positions every pair's dS goes to the table directly (one atomic per valid score element). These atomics come
after dQ's, when the q and dO tiles are dead, and compute their row indices anew from the codes
rather than keep the bias lookup's index tile live across the dK and dQ matmuls: without both,
ptxas spills. The counts, by ``benchmarks/kernel_atomics.py``, and the registers are in
``benchmarks/RESULTS.md``.

The forward's loop over a query tile's ``W`` key slots has a constant trip count (invalid slots
masked); loops whose trip count is known only at run time are ``while`` loops, since Triton 3.6's
interpreter cannot run ``range`` over a run-time bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svitt_ego.models.block_pattern import BlockPattern
from svitt_ego.models.position_bias import CLS_TO_CLS_ROW, CLS_TO_PATCH_ROW, PATCH_TO_CLS_ROW

# Launch options for 64-row tiles of head dim 64, from ptxas's report for sm_90a (Triton 3.6, see
# benchmarks/kernel_registers.py): the forward at 4 warps fits 168 registers without spills in fp16 /
# bf16 (3 programs per SM) with a two-stage pipeline; the key kernel needs 8 warps.
BACKWARD_WARPS = 8


def forward_options(dtype: torch.dtype) -> dict:
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(num_warps=4, num_stages=2, maxnreg=168 if half else None)


CLS_CHUNK = 64  # tokens per step of the [CLS] kernels


@triton.jit
def _tile(ptr, row_stride, tile, n, G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """Patch tokens ``tile * G ..`` (rows ``1 + token`` after [CLS]) of the (batch, head) at ``ptr``."""
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    token = tile * G + rows
    ok = (rows < G) & (token < n)
    offsets = (1 + token)[:, None] * row_stride + dims[None, :]
    x = tl.load(ptr + offsets, mask=ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    return x, token, ok


@triton.jit
def _row(ptr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row 0 ([CLS]) of the (batch, head) at ``ptr``, in fp32."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(ptr + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, row_stride, rows, ok, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    offsets = rows[:, None] * row_stride + dims[None, :]
    tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=ok[:, None] & (dims[None, :] < HEAD_DIM))


@triton.jit
def _codes(POS, pos_base, token, ok, GRID: tl.constexpr):
    """Offset codes of patch tokens from their positions ``(t * GRID + h) * GRID + w``."""
    p = tl.load(POS + pos_base + 1 + token, mask=ok, other=0).to(tl.int32)
    span = 2 * GRID - 1
    return ((p // (GRID * GRID)) * span + (p // GRID) % GRID) * span + p % GRID


@triton.jit
def _scores(q, k, q_code, k_code, q_ok, k_ok, table, table_stride, center, scale, PRECISION: tl.constexpr):
    """fp32 scores with the bias, keys outside the block -inf; also the table rows and the valid pairs."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    both = q_ok[:, None] & k_ok[None, :]
    rows = q_code[:, None] - k_code[None, :] + center
    s += tl.load(table + rows * table_stride, mask=both, other=0.0).to(tl.float32)
    return tl.where(k_ok[None, :], s, float("-inf")), rows, both


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, POS, TABLE, KEY_BLOCKS, VALID,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, pos_stride,
                    table_stride, table_head_stride, key_stride, valid_stride, n, num_heads, num_tiles,
                    center, patch_to_cls, scale,
                    G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    WIDTH: tl.constexpr, GRID: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    tile, bh = pid % num_tiles, pid // num_tiles
    batch, head = bh // num_heads, bh % num_heads
    table = TABLE + head * table_head_stride
    q_ptr, k_ptr, v_ptr = Q + batch * sqb + head * sqh, K + batch * skb + head * skh, V + batch * svb + head * svh
    q, q_token, q_ok = _tile(q_ptr, sqn, tile, n, G, BLOCK, HEAD_DIM, BLOCK_D)
    q_code = _codes(POS, batch * pos_stride, q_token, q_ok, GRID)
    # The [CLS] key starts the online softmax: every row has at least this one finite score.
    k0, v0 = _row(k_ptr, HEAD_DIM, BLOCK_D), _row(v_ptr, HEAD_DIM, BLOCK_D)
    m = tl.sum(q.to(tl.float32) * k0[None, :], 1) * scale + tl.load(table + patch_to_cls * table_stride).to(tl.float32)
    total = tl.full([BLOCK], 1.0, tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32) + v0[None, :]
    for w in range(0, WIDTH):  # invalid slots are masked: no load, no score
        key_tile = tl.load(KEY_BLOCKS + tile * key_stride + w)
        tokens = n * tl.load(VALID + tile * valid_stride + w).to(tl.int32)  # 0: the slot is invalid
        k, k_token, k_ok = _tile(k_ptr, skn, key_tile, tokens, G, BLOCK, HEAD_DIM, BLOCK_D)
        v, _, _ = _tile(v_ptr, svn, key_tile, tokens, G, BLOCK, HEAD_DIM, BLOCK_D)
        k_code = _codes(POS, batch * pos_stride, k_token, k_ok, GRID)
        s, _, _ = _scores(q, k, q_code, k_code, q_ok, k_ok, table, table_stride, center, scale, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    _store_rows(O + batch * sob + head * soh, son, 1 + q_token, q_ok, acc / total[:, None], HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh * (n + 1) + 1 + q_token, m + tl.log(total), mask=q_ok)


@triton.jit
def _cls_scores(Q0, K, row_stride, start, n, table, table_stride, cls_to_patch, cls_to_cls, scale,
                CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [CLS] query's fp32 scores against rows ``start ..`` (-inf past the last), with the rows."""
    token = start + tl.arange(0, CHUNK)
    ok = token < n + 1
    k = _load_rows(K, row_stride, token, ok, HEAD_DIM, BLOCK_D)
    bias = tl.load(table + tl.where(token == 0, cls_to_cls, cls_to_patch) * table_stride).to(tl.float32)
    return tl.where(ok, tl.sum(k * Q0[None, :], 1) * scale + bias, float("-inf")), token, ok, k


@triton.jit
def _load_rows(ptr, row_stride, token, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    return tl.load(ptr + token[:, None] * row_stride + dims[None, :],
                   mask=ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0).to(tl.float32)


@triton.jit
def _cls_forward_kernel(Q, K, V, O, LSE, PROBS, TABLE, sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh,
                        spb, sph, table_stride, table_head_stride, n, num_heads, cls_to_patch, cls_to_cls,
                        scale, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The dense [CLS] query row of one (batch, head): output, logsumexp and probabilities."""
    bh = tl.program_id(0).to(tl.int64)
    batch, head = bh // num_heads, bh % num_heads
    table = TABLE + head * table_head_stride
    k_ptr, v_ptr = K + batch * skb + head * skh, V + batch * svb + head * svh
    q0 = _row(Q + batch * sqb + head * sqh, HEAD_DIM, BLOCK_D)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    start = 0
    while start < n + 1:
        s, token, ok, _ = _cls_scores(q0, k_ptr, skn, start, n, table, table_stride, cls_to_patch,
                                      cls_to_cls, scale, CHUNK, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_ptr, svn, token, ok, HEAD_DIM, BLOCK_D)
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        total = total * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
        start += CHUNK
    lse = m + tl.log(total)
    dims = tl.arange(0, BLOCK_D)
    tl.store(O + batch * sob + head * soh + dims, (acc / total).to(O.dtype.element_ty), mask=dims < HEAD_DIM)
    tl.store(LSE + bh * (n + 1), lse)
    start = 0
    while start < n + 1:
        s, token, ok, _ = _cls_scores(q0, k_ptr, skn, start, n, table, table_stride, cls_to_patch,
                                      cls_to_cls, scale, CHUNK, HEAD_DIM, BLOCK_D)
        tl.store(PROBS + batch * spb + head * sph + token, tl.exp(s - lse).to(PROBS.dtype.element_ty), mask=ok)
        start += CHUNK


@triton.jit
def _pattern_kernel(KEY_BLOCKS, VALID, PAIRS, key_stride, valid_stride, num_tiles,
                    WIDTH: tl.constexpr, TILES_P: tl.constexpr, WIDTH_P: tl.constexpr):
    """Key tile ``j``'s visitors: the pairs ``query tile * WIDTH + slot`` whose slot names ``j``, in order,
    in row ``j`` of ``PAIRS`` [num_tiles, num_tiles]; their counts follow the rows."""
    j = tl.program_id(0)
    tiles = tl.arange(0, TILES_P)
    slots = tl.arange(0, WIDTH_P)
    inside = (tiles[:, None] < num_tiles) & (slots[None, :] < WIDTH)
    keys = tl.load(KEY_BLOCKS + tiles[:, None] * key_stride + slots[None, :], mask=inside, other=-1)
    valid = tl.load(VALID + tiles[:, None] * valid_stride + slots[None, :], mask=inside, other=0) != 0
    match = (keys == j) & valid  # a query tile names a key tile at most once
    visits = tl.max(match.to(tl.int32), 1)
    slot = tl.sum(tl.where(match, slots[None, :], 0), 1)
    tl.store(PAIRS + j * num_tiles + tl.cumsum(visits, 0) - 1, tiles * WIDTH + slot, mask=visits > 0)
    tl.store(PAIRS + num_tiles * num_tiles + j, tl.sum(visits, 0))


@triton.jit
def _cls_backward_kernel(Q, K, V, O, DO, DPROBS, LSE, DELTA, DQ, DK, DV, TABLE, DTABLE,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
                         spb, sph, spn, table_stride, table_head_stride, n, num_heads, cls_to_patch,
                         patch_to_cls, cls_to_cls, scale, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, HAS_DPROBS: tl.constexpr):
    """Per (batch, head): delta of every row, the [CLS] key's gradients and share of dQ, the [CLS] query's
    dQ, the [CLS] table rows. Writes every row of the fp32 dQ buffer (the key kernel adds to it after)
    and of ``DELTA``."""
    bh = tl.program_id(0).to(tl.int64)
    batch, head = bh // num_heads, bh % num_heads
    table = TABLE + head * table_head_stride
    dtable = DTABLE + head * table_head_stride
    q_ptr, k_ptr, v_ptr = Q + batch * sqb + head * sqh, K + batch * skb + head * skh, V + batch * svb + head * svh
    do_ptr, o_ptr, g_base = DO + batch * sdb + head * sdh, O + batch * sob + head * soh, bh * (n + 1) * HEAD_DIM
    q0, k0 = _row(q_ptr, HEAD_DIM, BLOCK_D), _row(k_ptr, HEAD_DIM, BLOCK_D)
    v0, do0 = _row(v_ptr, HEAD_DIM, BLOCK_D), _row(do_ptr, HEAD_DIM, BLOCK_D)
    lse0 = tl.load(LSE + bh * (n + 1))
    bias_p2c = tl.load(table + patch_to_cls * table_stride).to(tl.float32)
    # Patch queries against the [CLS] key, and delta.
    dk0 = tl.zeros([BLOCK_D], tl.float32)
    dv0 = tl.zeros([BLOCK_D], tl.float32)
    probs_dot = 0.0
    ds_p2c = 0.0
    start = 0
    while start < n + 1:
        token = start + tl.arange(0, CHUNK)
        ok = token < n + 1
        if HAS_DPROBS:
            s, _, _, _ = _cls_scores(q0, k_ptr, skn, start, n, table, table_stride, cls_to_patch, cls_to_cls,
                                     scale, CHUNK, HEAD_DIM, BLOCK_D)
            dprobs = tl.load(DPROBS + batch * spb + head * sph + token * spn, mask=ok, other=0.0).to(tl.float32)
            probs_dot += tl.sum(tl.where(ok, tl.exp(s - lse0) * dprobs, 0.0), 0)
        patch = ok & (token > 0)
        q = _load_rows(q_ptr, sqn, token, patch, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_ptr, sdn, token, patch, HEAD_DIM, BLOCK_D)
        delta = tl.sum(do * _load_rows(o_ptr, son, token, patch, HEAD_DIM, BLOCK_D), 1)
        tl.store(DELTA + bh * (n + 1) + token, delta, mask=patch)
        lse = tl.load(LSE + bh * (n + 1) + token, mask=patch, other=0.0)
        p0 = tl.where(patch, tl.exp(tl.sum(q * k0[None, :], 1) * scale + bias_p2c - lse), 0.0)
        ds0 = p0 * (tl.sum(do * v0[None, :], 1) - delta)
        _store_rows(DQ + g_base, HEAD_DIM, token, patch, ds0[:, None] * k0[None, :] * scale, HEAD_DIM, BLOCK_D)
        dk0 += tl.sum(ds0[:, None] * q, 0)
        dv0 += tl.sum(p0[:, None] * do, 0)
        ds_p2c += tl.sum(ds0, 0)
        start += CHUNK
    delta0 = tl.sum(do0 * _row(o_ptr, HEAD_DIM, BLOCK_D), 0) + probs_dot
    tl.store(DELTA + bh * (n + 1), delta0)
    # The [CLS] query against every key (its shares of the patch keys' dK / dV are the key kernel's).
    dq0 = tl.zeros([BLOCK_D], tl.float32)
    ds_c2p = 0.0
    ds_c2c = 0.0
    p_c2c = 0.0
    start = 0
    while start < n + 1:
        s, token, ok, k = _cls_scores(q0, k_ptr, skn, start, n, table, table_stride, cls_to_patch,
                                      cls_to_cls, scale, CHUNK, HEAD_DIM, BLOCK_D)
        p = tl.where(ok, tl.exp(s - lse0), 0.0)
        dp = tl.sum(_load_rows(v_ptr, svn, token, ok, HEAD_DIM, BLOCK_D) * do0[None, :], 1)
        if HAS_DPROBS:
            dp += tl.load(DPROBS + batch * spb + head * sph + token * spn, mask=ok, other=0.0).to(tl.float32)
        ds = p * (dp - delta0)
        dq0 += tl.sum(ds[:, None] * k, 0)
        ds_c2p += tl.sum(tl.where(token > 0, ds, 0.0), 0)
        ds_c2c += tl.sum(tl.where(token == 0, ds, 0.0), 0)
        p_c2c += tl.sum(tl.where(token == 0, p, 0.0), 0)
        start += CHUNK
    dims = tl.arange(0, BLOCK_D)
    in_row = dims < HEAD_DIM
    tl.store(DQ + g_base + dims, dq0 * scale, mask=in_row)
    tl.store(DK + g_base + dims, ((dk0 + ds_c2c * q0) * scale).to(DK.dtype.element_ty), mask=in_row)
    tl.store(DV + g_base + dims, (dv0 + p_c2c * do0).to(DV.dtype.element_ty), mask=in_row)
    tl.atomic_add(dtable + patch_to_cls * table_stride, ds_p2c, sem="relaxed")  # read only after the kernels
    tl.atomic_add(dtable + cls_to_patch * table_stride, ds_c2p, sem="relaxed")
    tl.atomic_add(dtable + cls_to_cls * table_stride, ds_c2c, sem="relaxed")


@triton.jit
def _backward_key_kernel(Q, K, V, DO, DPROBS, LSE, DELTA, DQ, DK, DV, POS, TABLE, DTABLE, SLOTS, PAIRS,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, spb, sph, spn, pos_stride,
                         table_stride, table_head_stride, n, batch_size, num_heads, num_tiles, center,
                         cls_to_patch, scale, G: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, WIDTH: tl.constexpr, GRID: tl.constexpr,
                         PRECISION: tl.constexpr, CHUNK: tl.constexpr, SHARED: tl.constexpr,
                         HAS_DPROBS: tl.constexpr):
    """dK and dV of one key tile and head for ``CHUNK`` batch elements; dQ and the table by atomics.

    ``SHARED`` (the batch shares the positions): each pair's dS is summed over the chunk in the
    program's own slots of ``SLOTS`` and reaches the table once, after the chunk.
    """
    pid = tl.program_id(0).to(tl.int64)
    key_tile, rest = pid % num_tiles, pid // num_tiles
    head, chunk = rest % num_heads, rest // num_heads
    table = TABLE + head * table_head_stride
    dtable = DTABLE + head * table_head_stride
    slots = SLOTS + (chunk * num_heads + head) * num_tiles * WIDTH * BLOCK * BLOCK
    tile_rows = tl.arange(0, BLOCK)
    slot_offsets = tile_rows[:, None] * BLOCK + tile_rows[None, :]
    count = tl.load(PAIRS + num_tiles * num_tiles + key_tile)
    bias_c2p = tl.load(table + cls_to_patch * table_stride).to(tl.float32)
    first = chunk * CHUNK
    batch = first
    while batch < tl.minimum(first + CHUNK, batch_size):
        bh = batch * num_heads + head
        q_ptr, k_ptr = Q + batch * sqb + head * sqh, K + batch * skb + head * skh
        v_ptr, do_ptr, g_base = V + batch * svb + head * svh, DO + batch * sdb + head * sdh, bh * (n + 1) * HEAD_DIM
        k, k_token, k_ok = _tile(k_ptr, skn, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D)
        v, _, _ = _tile(v_ptr, svn, key_tile, n, G, BLOCK, HEAD_DIM, BLOCK_D)
        k_code = _codes(POS, batch * pos_stride, k_token, k_ok, GRID)
        # The [CLS] query's share.
        q0, do0 = _row(q_ptr, HEAD_DIM, BLOCK_D), _row(do_ptr, HEAD_DIM, BLOCK_D)
        s0 = tl.sum(k.to(tl.float32) * q0[None, :], 1) * scale + bias_c2p
        p0 = tl.where(k_ok, tl.exp(s0 - tl.load(LSE + bh * (n + 1))), 0.0)
        dp0 = tl.sum(v.to(tl.float32) * do0[None, :], 1)
        if HAS_DPROBS:
            dp0 += tl.load(DPROBS + batch * spb + head * sph + (1 + k_token) * spn, mask=k_ok,
                           other=0.0).to(tl.float32)
        ds0 = p0 * (dp0 - tl.load(DELTA + bh * (n + 1)))
        dk = ds0[:, None] * q0[None, :]
        dv = p0[:, None] * do0[None, :]
        j = 0
        while j < count:
            pair = tl.load(PAIRS + key_tile * num_tiles + j)
            q, q_token, q_ok = _tile(q_ptr, sqn, pair // WIDTH, n, G, BLOCK, HEAD_DIM, BLOCK_D)
            do, _, _ = _tile(do_ptr, sdn, pair // WIDTH, n, G, BLOCK, HEAD_DIM, BLOCK_D)
            q_code = _codes(POS, batch * pos_stride, q_token, q_ok, GRID)
            lse = tl.load(LSE + bh * (n + 1) + 1 + q_token, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + bh * (n + 1) + 1 + q_token, mask=q_ok, other=0.0)
            # Transposed, [key, query]: P^T and dS^T are the left operands of dV and dK as computed.
            rows = q_code[None, :] - k_code[:, None] + center
            both = k_ok[:, None] & q_ok[None, :]
            s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale
            s += tl.load(table + rows * table_stride, mask=both, other=0.0).to(tl.float32)
            p = tl.where(both, tl.exp(s - lse[None, :]), 0.0)
            dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
            ds = p * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
            dq = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=PRECISION) * scale
            dims = tl.arange(0, BLOCK_D)
            dq_offsets = (1 + q_token)[:, None] * HEAD_DIM + dims[None, :]
            tl.atomic_add(DQ + g_base + dq_offsets, dq, mask=q_ok[:, None] & (dims[None, :] < HEAD_DIM), sem="relaxed")
            if SHARED:
                slot = slots + pair * BLOCK * BLOCK + slot_offsets
                tl.store(slot, ds + tl.load(slot, mask=slot_offsets < (batch - first) * BLOCK * BLOCK, other=0.0))
            else:  # the rows anew, in a form the compiler does not merge with ``rows`` (live this long, they spill)
                table_rows = (q_code + center)[None, :] - k_code[:, None]
                tl.atomic_add(dtable + table_rows * table_stride, ds, mask=both, sem="relaxed")
            j += 1
        _store_rows(DK + g_base, HEAD_DIM, 1 + k_token, k_ok, dk * scale, HEAD_DIM, BLOCK_D)
        _store_rows(DV + g_base, HEAD_DIM, 1 + k_token, k_ok, dv, HEAD_DIM, BLOCK_D)
        batch += 1
    if SHARED:  # one atomic per element for the whole chunk
        rows = tl.arange(0, BLOCK)
        k_token = key_tile * G + rows
        k_ok = (rows < G) & (k_token < n)
        k_code = _codes(POS, 0, k_token, k_ok, GRID)
        j = 0
        while j < count:
            pair = tl.load(PAIRS + key_tile * num_tiles + j)
            q_token = (pair // WIDTH) * G + rows
            q_ok = (rows < G) & (q_token < n)
            q_code = _codes(POS, 0, q_token, q_ok, GRID)
            table_rows = q_code[None, :] - k_code[:, None] + center
            ds = tl.load(slots + pair * BLOCK * BLOCK + slot_offsets)
            tl.atomic_add(dtable + table_rows * table_stride, ds, mask=k_ok[:, None] & q_ok[None, :], sem="relaxed")
            j += 1


@triton.jit
def _cast_kernel(SRC, DST, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    tl.store(DST + offsets, tl.load(SRC + offsets, mask=ok).to(DST.dtype.element_ty), mask=ok)


CAST_BLOCK = 1024


def _constants(q, pattern: BlockPattern, grid_size: int) -> dict:
    head_dim = q.shape[-1]
    return dict(G=pattern.block_size, BLOCK=pattern.tile_size, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), WIDTH=pattern.key_blocks.shape[1],
                GRID=grid_size, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()[:3]]


def _table_rows(table) -> dict:
    rows = table.shape[0]
    return dict(cls_to_patch=rows + CLS_TO_PATCH_ROW, patch_to_cls=rows + PATCH_TO_CLS_ROW,
                cls_to_cls=rows + CLS_TO_CLS_ROW)


def _positions_stride(positions) -> int:
    return positions.stride(0) if positions.shape[0] > 1 else 0  # 0: the batch shares the positions


def forward(q, k, v, table, positions, pattern: BlockPattern, grid_size: int, center: int):
    """The output ``[B, H, 1 + n, D]`` and [CLS] probabilities ``[B, H, 1 + n]`` (q's dtype) and the logsumexp
    of every row ``[B, H, 1 + n]`` (fp32). q, k, v of one dtype with unit last strides, the table contiguous,
    positions ``[1 or B, 1 + n]`` on q's device; ``center`` the table row of the zero offset."""
    B, H, N, D = q.shape
    n, nb = N - 1, pattern.num_blocks
    consts = _constants(q, pattern, grid_size)
    special = _table_rows(table)
    out = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    cls_probs = torch.empty(B, H, N, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    scale = D**-0.5
    _forward_kernel[(nb * B * H,)](q, k, v, out, lse, positions, table, pattern.key_blocks, pattern.valid,
                                   *_strides(q, k, v, out), _positions_stride(positions), *table.stride(),
                                   pattern.key_blocks.stride(0), pattern.valid.stride(0), n, H, nb, center,
                                   special["patch_to_cls"], scale, **forward_options(q.dtype), **consts)
    _cls_forward_kernel[(B * H,)](q, k, v, out, lse, cls_probs, table, *q.stride()[:2], *_strides(k, v),
                                  *out.stride()[:2], *cls_probs.stride()[:2], *table.stride(), n, H,
                                  special["cls_to_patch"], special["cls_to_cls"], scale, CHUNK=CLS_CHUNK,
                                  HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"])
    return out, cls_probs, lse


def backward(grad_out, grad_probs, q, k, v, out, lse, table, positions, pattern: BlockPattern, grid_size: int,
             center: int, buffers: dict, chunk: int) -> None:
    """Write dQ, dK, dV and the table's gradient into ``buffers`` (:func:`svitt_ego.models.ops.backward_buffers`,
    whose ``slots`` exist when ``chunk`` > 1: batch elements per key-kernel program). ``grad_out`` has unit
    last stride; ``grad_probs`` may be None (no loss reaches the [CLS] probabilities)."""
    B, H, N, D = q.shape
    n, nb = N - 1, pattern.num_blocks
    consts = _constants(q, pattern, grid_size)
    special, scale = _table_rows(table), D**-0.5
    has_probs = grad_probs is not None
    probs_arg = grad_probs if has_probs else lse
    pairs, delta, dq32, dk, dv, dtable32 = (buffers[k] for k in ("pairs", "delta", "dq32", "dk", "dv", "dtable32"))
    width = consts["WIDTH"]
    _pattern_kernel[(nb,)](pattern.key_blocks, pattern.valid, pairs, pattern.key_blocks.stride(0),
                           pattern.valid.stride(0), nb, WIDTH=width, TILES_P=triton.next_power_of_2(nb),
                           WIDTH_P=triton.next_power_of_2(width))
    _cls_backward_kernel[(B * H,)](q, k, v, out, grad_out, probs_arg, lse, delta, dq32, dk, dv, table, dtable32,
                                   *_strides(q, k, v, out, grad_out, probs_arg), *table.stride(), n, H,
                                   special["cls_to_patch"], special["patch_to_cls"], special["cls_to_cls"], scale,
                                   CHUNK=CLS_CHUNK, HEAD_DIM=D, BLOCK_D=consts["BLOCK_D"], HAS_DPROBS=has_probs)
    shared = chunk > 1
    slots = buffers["slots"] if shared else dtable32
    _backward_key_kernel[(nb * H * triton.cdiv(B, chunk),)](
        q, k, v, grad_out, probs_arg, lse, delta, dq32, dk, dv, positions, table, dtable32, slots, pairs,
        *_strides(q, k, v, grad_out, probs_arg), _positions_stride(positions), *table.stride(), n, B, H, nb,
        center, special["cls_to_patch"], scale, CHUNK=chunk, SHARED=shared, HAS_DPROBS=has_probs,
        num_warps=BACKWARD_WARPS, **consts)
    dq = buffers["dq"]
    if dq is not dq32:
        _cast_kernel[(triton.cdiv(dq.numel(), CAST_BLOCK),)](dq32, dq, dq.numel(), BLOCK=CAST_BLOCK)
    if buffers["dtable"] is not dtable32:
        buffers["dtable"].copy_(dtable32)
