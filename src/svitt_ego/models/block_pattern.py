"""The block pattern of edge sparsity: which key blocks each query block attends to.

The ``n`` patch tokens ([CLS] excluded) are cut into blocks of ``G`` consecutive tokens (the last
block may be partial). Query block ``b`` attends to its ``K_l`` local blocks (``b`` and
``(K_l-1)/2`` neighbours each side) and to ``K_r`` random other blocks, drawn without repetition
and never a local block (fewer when fewer are free). Every attention backend reads the pattern
from here; this module imports none of them.

``svitt_blocks`` reproduces SViTT's own block attention (K_l = 1), for its checkpoints: a query block
with fewer than K_r other blocks attends to its own block once more (SViTT's ``topk`` over the other
blocks' noise falls back on the own block's zero), and the zero-padded keys of a partial last block
take part in the softmax (score 0, the patch -> [CLS] bias, value 0), where ours are masked. Only the
``blocked`` backend computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class BlockPattern:
    """Key blocks of each query block: ``key_blocks[b, :]`` where ``valid[b, :]``."""

    key_blocks: torch.Tensor  # [num_blocks, W] long
    valid: torch.Tensor  # [num_blocks, W] bool
    block_size: int
    svitt_blocks: bool = False  # SViTT's padded keys and repeated own block (module docstring)

    @property
    def num_blocks(self) -> int:
        return self.key_blocks.shape[0]

    @property
    def tile_size(self) -> int:
        """Rows of the tile a kernel gives each block: the next power of two of G, at least 16 (Triton's
        smallest matrix product), e.g. 64 for G = 56."""
        return max(16, 1 << (self.block_size - 1).bit_length())


def sample_block_pattern(num_tokens: int, block_size: int, k_local: int, k_random: int,
                         generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu", svitt_blocks: bool = False) -> BlockPattern:
    """Draw the random blocks for ``num_tokens`` patch tokens (the [CLS] token excluded).

    Without a generator the draw happens on ``device`` (no host-device copy); with one, on the
    generator's device, and the pattern is moved to ``device``.
    """
    nb = math.ceil(num_tokens / block_size)
    if generator is None:
        noise = torch.rand(nb, nb, device=device)
    else:
        noise = torch.rand(nb, nb, generator=generator, device=generator.device).to(device)
    return block_pattern_from_noise(noise, block_size, k_local, k_random, svitt_blocks)


def block_pattern_from_noise(noise: torch.Tensor, block_size: int, k_local: int, k_random: int,
                             svitt_blocks: bool = False) -> BlockPattern:
    """The pattern that ``noise`` [nb, nb] (uniform in [0, 1)) ranks: per query block, the local blocks
    first, then the ``k_random`` other blocks with the lowest noise (with ``svitt_blocks``, the own block
    again when fewer are free and there are at least ``k_random`` blocks). Runs on ``noise``'s device."""
    nb, device = noise.shape[0], noise.device
    blocks = torch.arange(nb, device=device)
    local = (blocks[:, None] - blocks[None, :]).abs() <= (k_local - 1) // 2
    keys = noise.masked_fill(local, -1.0)  # local blocks sort first
    width = min(k_local + k_random, nb)
    key_blocks = keys.argsort(dim=1)[:, :width]
    count = (local.sum(1) + k_random).clamp(max=nb)
    valid = torch.arange(width, device=device)[None, :] < count[:, None]
    if svitt_blocks and width < k_local + k_random <= nb + 1:
        key_blocks = torch.cat([key_blocks, blocks[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(nb, 1)], dim=1)
    return BlockPattern(key_blocks, valid, block_size, svitt_blocks)


def dense_mask(pattern: BlockPattern, num_tokens: int) -> torch.Tensor:
    """The [1 + n, 1 + n] boolean mask (True = attend) equivalent to ``pattern``."""
    block_of = torch.arange(num_tokens, device=pattern.key_blocks.device) // pattern.block_size
    allowed_blocks = torch.zeros(pattern.num_blocks, pattern.num_blocks, dtype=torch.bool,
                                 device=block_of.device)
    rows = torch.arange(pattern.num_blocks, device=block_of.device)[:, None].expand_as(pattern.key_blocks)
    allowed_blocks[rows[pattern.valid], pattern.key_blocks[pattern.valid]] = True
    mask = torch.ones(num_tokens + 1, num_tokens + 1, dtype=torch.bool, device=block_of.device)
    mask[1:, 1:] = allowed_blocks[block_of[:, None], block_of[None, :]]
    return mask
