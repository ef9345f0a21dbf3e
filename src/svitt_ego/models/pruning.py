"""Node sparsity: keep the tokens a [CLS] query attends to most.

The video encoder prunes its own patch tokens by the video [CLS] attention (``q_v``, after the
layers in ``prune_layers``); the multimodal encoder prunes the video tokens it cross-attends to by
the text [CLS] attention (``q_m``, in its first layer). Both keep the [CLS] token and the
``ceil(keep_rate * n)`` best patch tokens in their original order, by a gather (whose backward is
a plain scatter of the kept rows, no accumulation over repeated indices).
"""

from __future__ import annotations

import math

import torch


def num_kept(keep_rate: float, n: int) -> int:
    """``ceil(keep_rate * n)``, immune to float error (0.1 * 270 is 27.000000000000004)."""
    return max(1, math.ceil(round(keep_rate * n, 6)))


def kept_indices(scores: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """[B, 1 + k]: 0 for [CLS], then the indices (counting [CLS]) of the top ``k = ceil(keep_rate * n)``
    of the ``n`` patch scores ``[B, n]``, in increasing order."""
    idx = scores.topk(num_kept(keep_rate, scores.shape[1]), dim=1).indices.sort(dim=1).values + 1
    return torch.cat([idx.new_zeros(idx.shape[0], 1), idx], dim=1)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` [B, m] of the token sequences ``x`` [B, N, C]."""
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))


def prune_tokens(x: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
                 keep_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep [CLS] and the ``ceil(keep_rate * n)`` highest-scoring patch tokens, in their original order.

    ``x`` [B, 1 + n, C], ``positions`` [1 or B, 1 + n], ``scores`` [B, n]; returns the kept tokens and
    their positions [B, 1 + k].
    """
    idx = kept_indices(scores, keep_rate)
    return gather_tokens(x, idx), positions.expand(x.shape[0], -1).gather(1, idx)
