"""The 3D relative position bias of the video encoder.

Every patch token has an original (t, h, w) index; pruning drops tokens but the
survivors keep their index, so the bias between two tokens is always looked up
from their original offsets. A position is stored as one integer: the patch's
index in frame-major raster order, ``p = (t * H + h) * W + w``, and ``-1`` for
[CLS].

The table has ``(2T-1) * (2H-1) * (2W-1) + 3`` rows per head. The last three are
BEiT's: [CLS] query -> patch key, patch query -> [CLS] key, [CLS] -> [CLS]. With
T = 1 the layout is exactly BEiT's 2D table, so image checkpoints load as is and
are inflated by repeating the 2D table over the temporal offsets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLS_POSITION = -1
# BEiT's three special rows, counted from the end of the table.
CLS_TO_PATCH_ROW = -3  # [CLS] query -> patch key
PATCH_TO_CLS_ROW = -2  # patch query -> [CLS] key
CLS_TO_CLS_ROW = -1  # [CLS] query -> [CLS] key
NUM_SPECIAL_ROWS = 3


class RelativePositionBias3D(nn.Module):
    """One learned bias per head and relative (t, h, w) offset, plus BEiT's three [CLS] rows.

    ``table`` is ``[(2T-1) * (2H-1) * (2W-1) + 3, heads]``; :meth:`index` maps two encoded positions
    (see the module docstring) to a row, :meth:`forward` looks the bias up for every pair.
    """

    def __init__(self, num_frames: int, grid_size: int, num_heads: int):
        super().__init__()
        self.num_frames = num_frames
        self.grid_size = grid_size
        self.num_relative = (2 * num_frames - 1) * (2 * grid_size - 1) ** 2 + NUM_SPECIAL_ROWS
        self.table = nn.Parameter(torch.zeros(self.num_relative, num_heads))

    @property
    def center_row(self) -> int:
        """The table row of the zero offset (t, h, w) = (0, 0, 0)."""
        return center_row(self.num_frames, self.grid_size)

    def offset_code(self, pos: torch.Tensor) -> torch.Tensor:
        """``(t * span + h) * span + w`` with ``span = 2 * grid - 1``: between two patches the table row
        is ``offset_code(query) - offset_code(key) + center_row`` (what the fused kernel relies on)."""
        t, h, w = _split(pos, self.grid_size)
        span = 2 * self.grid_size - 1
        return (t * span + h) * span + w

    def index(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """Table rows for every (query, key) pair; the inputs broadcast against each other."""
        idx = self.offset_code(query_pos) - self.offset_code(key_pos) + self.center_row
        q_cls, k_cls = query_pos == CLS_POSITION, key_pos == CLS_POSITION
        r = self.num_relative
        idx = torch.where(q_cls, r + CLS_TO_PATCH_ROW, idx)
        idx = torch.where(k_cls, r + PATCH_TO_CLS_ROW, idx)
        return torch.where(q_cls & k_cls, r + CLS_TO_CLS_ROW, idx)

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """Bias ``[..., heads, Nq, Nk]`` between positions ``[..., Nq]`` and ``[..., Nk]``."""
        return self.table[self.index(query_pos[..., :, None], key_pos[..., None, :])].movedim(-1, -3)


def center_row(num_frames: int, grid_size: int) -> int:
    """The table row of the zero offset (t, h, w) = (0, 0, 0) for ``num_frames`` frames of ``grid_size`` squared."""
    span = 2 * grid_size - 1
    return ((num_frames - 1) * span + grid_size - 1) * span + grid_size - 1


def _split(pos: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = pos.clamp(min=0)
    return p // (grid * grid), (p // grid) % grid, p % grid


def resize_bias_table(table: torch.Tensor, frames_from: int, frames_to: int, grid_size: int) -> torch.Tensor:
    """Adapt a table made for ``frames_from`` frames to ``frames_to`` frames.

    From one frame (an image checkpoint) the 2D table is repeated over all
    ``2T-1`` temporal offsets; between videos it is interpolated linearly along
    the temporal offset axis, keeping offset 0 and the extremes aligned.
    """
    spatial = (2 * grid_size - 1) ** 2
    expected = (2 * frames_from - 1) * spatial + NUM_SPECIAL_ROWS
    if table.shape[0] != expected:
        raise ValueError(f"relative position bias table has {table.shape[0]} rows; expected {expected} "
                         f"for {frames_from} frame(s) on a {grid_size}x{grid_size} grid")
    if frames_from == frames_to:
        return table
    heads = table.shape[1]
    patch, special = table[:-NUM_SPECIAL_ROWS].reshape(2 * frames_from - 1, spatial, heads), table[-NUM_SPECIAL_ROWS:]
    if frames_from == 1:
        patch = patch.expand(2 * frames_to - 1, spatial, heads)
    else:
        patch = F.interpolate(patch.permute(1, 2, 0), size=2 * frames_to - 1, mode="linear",
                              align_corners=True).permute(2, 0, 1)
    return torch.cat([patch.reshape(-1, heads), special]).contiguous()
