"""The order in which patch tokens are cut into blocks: frame-major raster (ours), or SViTT's optional
space-filling curves over (t, h, w), which keep the tokens of a block near each other in space and time.

A curve's order is the patches sorted by their code on a ``2^b``-cube, ``b`` the bit length of the
largest of T, H, W (as SViTT computes it): the z-curve (Morton) code interleaves the coordinates' bits,
bit ``j`` of coordinate ``i`` going to bit ``3j + i``; the Hilbert code is John Skilling's (2004), bits
taken from the most significant down and coordinate ``t`` first.
"""

from __future__ import annotations

import itertools

import torch

def token_order(kind: str, frames: int, grid: int) -> torch.Tensor | None:
    """Patch indices (frame-major raster) in ``kind``'s order; None for ``raster``."""
    if kind == "raster":
        return None
    shape = (frames, grid, grid)
    bits = max(shape).bit_length()
    code = _zcurve if kind == "zcurve" else _hilbert
    codes = [code(point, bits) for point in itertools.product(*map(range, shape))]
    return torch.tensor(sorted(range(len(codes)), key=codes.__getitem__))


def _zcurve(point: tuple[int, ...], bits: int) -> int:
    return sum(((value >> j) & 1) << (j * len(point) + i) for i, value in enumerate(point) for j in range(bits))


def _hilbert(point: tuple[int, ...], bits: int) -> int:
    """Skilling's transform of the coordinates' bits (most significant first), read out dimension by
    dimension per bit and turned from Gray code to binary."""
    x = [[(value >> j) & 1 for j in reversed(range(bits))] for value in point]  # x[dim][bit], MSB first
    for bit in range(bits):
        for dim in range(len(x)):
            for low in range(bit + 1, bits):
                if x[dim][bit]:
                    x[0][low] ^= 1
                elif x[0][low] != x[dim][low]:
                    x[0][low], x[dim][low] = x[dim][low], x[0][low]
    code, previous = 0, 0
    for bit in range(bits):
        for dim in range(len(x)):
            previous ^= x[dim][bit]
            code = (code << 1) | previous
    return code
