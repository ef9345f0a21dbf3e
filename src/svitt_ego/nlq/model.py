"""A GroundNLQ / ActionFormer-style grounding model (hidden size 128, as the paper's Table 3).

Video features ``[T, D]`` are embedded by two 1-D convolutions, the query's token states by a
projection and a small transformer. Each level of a temporal pyramid (level ``l`` has stride
``2 ** l`` in windows) runs a fusion block: local self-attention over time, cross-attention
to the text, a feed-forward layer. Shared heads give, at every point of every level, a
foreground logit (trained with a focal loss) and the distances to the moment's start and end
(trained with a DIoU loss). Positions are in window indices: point ``j`` of level ``l`` sits at
window ``j * 2 ** l``; :mod:`svitt_ego.nlq.features` turns window indices into seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GroundingConfig:
    video_dim: int
    text_dim: int
    hidden: int = 128
    levels: int = 4          # pyramid levels, strides 1, 2, 4, ... windows
    num_heads: int = 4
    local_radius: int = 4    # self-attention reaches this many points either side
    text_layers: int = 1
    dropout: float = 0.1
    center_radius: float = 1.5  # positives lie within this many strides of the moment's centre

    def to_dict(self) -> dict:
        return asdict(self)

    def regress_range(self, level: int) -> tuple[float, float]:
        """Moments whose farther boundary is this many windows away are learnt at ``level``."""
        low = 0.0 if level == 0 else 2.0 ** (level + 1)
        high = float("inf") if level == self.levels - 1 else 2.0 ** (level + 2)
        return low, high


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T, C] attends to ``context`` [B, S, C] where ``mask`` [B, T or 1, S] is True."""
        B, T, C = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        k, v = self.kv(context).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(k), heads(v), attn_mask=mask[:, None])
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class FusionBlock(nn.Module):
    """Local self-attention over time, cross-attention to the query, feed-forward (pre-norm)."""

    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        dim = cfg.hidden
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        # Dropout only in the feed-forward layer: on the attention weights it cost a fifth of a CPU step.
        self.self_attn = Attention(dim, cfg.num_heads)
        self.cross_attn = Attention(dim, cfg.num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(4 * dim, dim))
        self.radius = cfg.local_radius

    def forward(self, x, mask, text, text_mask):
        T = x.shape[1]
        offset = torch.arange(T, device=x.device)
        near = (offset[:, None] - offset[None, :]).abs() <= self.radius
        # Every point may see itself, so padded points never attend to nothing.
        local = (near & mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)
        x = x + self.self_attn(self.norms[0](x), self.norms[0](x), local)
        x = x + self.cross_attn(self.norms[1](x), text, text_mask[:, None, :])
        x = x + self.ffn(self.norms[2](x))
        return x * mask[..., None]


class Head(nn.Module):
    """Two 1-D convolutions shared by every level; padding is zeroed in between."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.hidden, self.out = nn.Conv1d(dim, dim, 3, padding=1), nn.Conv1d(dim, out, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, out, T]."""
        return self.out(F.relu(self.hidden(x)) * mask[:, None])


class GroundingModel(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden
        self.video_embed = nn.ModuleList([nn.Conv1d(cfg.video_dim, dim, 3, padding=1), nn.Conv1d(dim, dim, 3, padding=1)])
        self.text_embed = nn.Linear(cfg.text_dim, dim)
        layer = nn.TransformerEncoderLayer(dim, cfg.num_heads, 4 * dim, cfg.dropout, batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.blocks = nn.ModuleList(FusionBlock(cfg) for _ in range(cfg.levels))
        self.cls_head, self.reg_head = Head(dim, 1), Head(dim, 2)
        self.scales = nn.Parameter(torch.ones(cfg.levels))
        nn.init.constant_(self.cls_head.out.bias, -4.6)  # a prior of 1% foreground, as in focal-loss detectors

    @property
    def multiple(self) -> int:
        """Padded lengths are a multiple of this, so every level halves exactly."""
        return 2 ** (self.config.levels - 1)

    def forward(self, video, video_mask, text, text_mask) -> list[dict]:
        """``video`` [B, T, D] (T a multiple of :attr:`multiple`), ``text`` [B, L, C], bool masks.

        Returns per level ``{"logits": [B, T_l], "distances": [B, T_l, 2] (in windows),
        "mask": [B, T_l], "points": [T_l] (window index of each point)}``.
        """
        text = self.text_encoder(self.text_embed(text), src_key_padding_mask=~text_mask)
        # Padding is zeroed after every layer that mixes neighbours, so a clip's outputs do not
        # depend on how far its batch is padded.
        x = video.transpose(1, 2) * video_mask[:, None]
        for conv in self.video_embed:
            x = F.relu(conv(x)) * video_mask[:, None]
        x, mask, outputs = x.transpose(1, 2), video_mask, []
        for level, block in enumerate(self.blocks):
            if level:
                x = x.masked_fill(~mask[..., None], float("-inf"))
                x = F.max_pool1d(x.transpose(1, 2), 3, stride=2, padding=1).transpose(1, 2)
                mask = mask[:, ::2]
                x = x.masked_fill(~mask[..., None], 0.0)
            x = block(x, mask, text, text_mask)
            features = x.transpose(1, 2)
            stride = 2 ** level
            outputs.append({
                "logits": self.cls_head(features, mask)[:, 0],
                "distances": F.relu(self.scales[level] * self.reg_head(features, mask)).transpose(1, 2) * stride,
                "mask": mask,
                "points": torch.arange(x.shape[1], device=x.device, dtype=x.dtype) * stride,
            })
        return outputs
