"""The ``blocked`` backend: edge-sparse attention in plain PyTorch, without an N x N matrix.

Each query block's G patch queries meet [CLS] and their block pattern's key blocks, gathered into
one ``1 + W * G`` key row; the [CLS] query meets every key. Memory O(N * W * G), runs anywhere.
It is also the CPU implementation of the fused kernel's operators (:mod:`svitt_ego.models.ops`).
Scores are formed in at least fp32 (fp16 scores can overflow before the softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svitt_ego.models.block_pattern import BlockPattern
from svitt_ego.models.position_bias import CLS_POSITION, RelativePositionBias3D


def blocked_attention(q, k, v, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern):
    """Each query block against its gathered key blocks plus [CLS]; memory O(N * W * G)."""
    n = q.shape[2] - 1
    cls_out, cls_probs = cls_row(q, k, v, positions, rel_bias)
    scores = _block_scores(q, k, positions, rel_bias, pattern)
    out = scores.softmax(-1).to(q.dtype) @ _gathered(v, pattern)
    return torch.cat([cls_out, _unblocked(out, n)], dim=2), cls_probs


def blocked_logsumexp(q, k, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern) -> torch.Tensor:
    """The logsumexp of every query row's scores ``[B, H, 1 + n]`` in fp32: what the fused kernel keeps for
    its backward."""
    cls = cls_query_scores(q, k, rel_bias(positions[:, :1], positions)).logsumexp(-1)
    patch = _block_scores(q, k, positions, rel_bias, pattern).logsumexp(-1, keepdim=True)
    return torch.cat([cls, _unblocked(patch, q.shape[2] - 1)[..., 0]], dim=2).float()


def _block_scores(q, k, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern) -> torch.Tensor:
    """Scores ``[B, H, nb, G, 1 + W * G]`` of each query block against [CLS] and its key blocks, with the
    bias; -inf for keys past the last token and in invalid slots."""
    n, G, nb = q.shape[2] - 1, pattern.block_size, pattern.num_blocks
    W = pattern.key_blocks.shape[1]
    idx = pattern.key_blocks
    # SViTT's zero-padded keys take part, with the patch -> [CLS] bias (BlockPattern.svitt_blocks); ours are masked.
    padding = CLS_POSITION if pattern.svitt_blocks else 0
    patch_pos = F.pad(positions[:, 1:], (0, nb * G - n), value=padding).view(-1, nb, G)
    key_pos = patch_pos[:, idx].reshape(-1, nb, W * G)
    key_pos = torch.cat([key_pos.new_full((key_pos.shape[0], nb, 1), CLS_POSITION), key_pos], dim=2)
    bias = rel_bias(patch_pos, key_pos).transpose(1, 2)  # [B', H, nb, G, 1 + W*G]

    token_ok = torch.arange(nb * G, device=q.device).view(nb, G) < (nb * G if pattern.svitt_blocks else n)
    key_ok = (token_ok[idx] & pattern.valid[:, :, None]).reshape(nb, W * G)
    key_ok = torch.cat([key_ok.new_ones(nb, 1), key_ok], dim=1)

    acc = score_dtype(q)
    qb = _blocks(q[:, :, 1:], pattern)
    scores = (qb.to(acc) @ _gathered(k, pattern).to(acc).transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
    return scores.masked_fill(~key_ok[:, None, :], float("-inf"))


def _blocks(x, pattern: BlockPattern):
    """Patch rows ``[B, H, n, D]`` -> ``[B, H, nb, G, D]``, the last block padded with zeros."""
    B, H, n, D = x.shape
    G, nb = pattern.block_size, pattern.num_blocks
    return F.pad(x, (0, 0, 0, nb * G - n)).view(B, H, nb, G, D)


def _gathered(x, pattern: BlockPattern):
    """Rows ``[B, H, 1 + n, D]`` -> each query block's keys ``[B, H, nb, 1 + W * G, D]``: [CLS], then its key blocks."""
    B, H, _, D = x.shape
    nb, W, G = pattern.num_blocks, pattern.key_blocks.shape[1], pattern.block_size
    cls = x[:, :, :1, None].expand(B, H, nb, 1, D)
    return torch.cat([cls, _blocks(x[:, :, 1:], pattern)[:, :, pattern.key_blocks].reshape(B, H, nb, W * G, D)], dim=3)


def _unblocked(x, n: int):
    """``[B, H, nb, G, D]`` -> the first ``n`` rows ``[B, H, n, D]``."""
    B, H, nb, G, D = x.shape
    return x.reshape(B, H, nb * G, D)[:, :, :n]


def cls_query_scores(q, k, cls_bias):
    """The [CLS] query's scores over all keys ``[B, H, 1, N]``, in at least fp32, with the bias."""
    acc = score_dtype(q)
    return (q[:, :, :1].to(acc) @ k.to(acc).transpose(-2, -1)) * q.shape[-1] ** -0.5 + cls_bias


def cls_query_probs(q, k, cls_bias):
    """The [CLS] query's probabilities over all keys [B, H, N] (cast back to q's dtype)."""
    return cls_query_scores(q, k, cls_bias).softmax(-1).to(q.dtype)[:, :, 0]


def score_dtype(q: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (fp16 scores overflow), the input's own dtype from fp32 up."""
    return torch.promote_types(q.dtype, torch.float32)


def cls_row(q, k, v, positions, rel_bias: RelativePositionBias3D):
    """The dense [CLS] query row: its output [B, H, 1, D] and its probabilities [B, H, N]."""
    probs = cls_query_probs(q, k, rel_bias(positions[:, :1], positions))
    return probs[:, :, None] @ v, probs
