"""GroundNLQ's grounding model (houzhijian/GroundNLQ), at the paper's hidden size 128 (its Table 3).

Tensors are laid out ``[B, C, T]`` as in GroundNLQ. The query's token states pass two k1
convolutions (+ LayerNorm + ReLU) and ``text_layers`` transformer blocks; the video features two
k3 convolutions (+ LayerNorm + ReLU) and a sinusoidal position encoding, then ``stem_layers``
full-resolution blocks, each local self-attention, cross-attention to the query and an MLP.
``levels - 1`` further blocks without cross-attention each halve the time axis (strided
depthwise convolutions inside the attention, max-pool on the residual), so level ``l`` has
stride ``2 ** l`` windows. Every level is LayerNorm-ed and read by two shared heads (two k3
convolutions + LayerNorm + ReLU, then an output convolution): a foreground logit and the
distances to the moment's start and end, in units of the level's stride, scaled per level.

Local attention is banded: each point sees ``window`` points centred on itself, at a cost
linear in the clip's length, so clips of any length fit (GroundNLQ's Longformer-style kernel
needs lengths divisible by its chunk size; ours pads the last chunk; the results are the same).
:func:`from_groundnlq` maps a state dict saved by GroundNLQ's code to this model.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from svitt_ego.nlq.recipe import DROP_PATH, LABEL_SMOOTHING, LOSS_NORM_PER_GPU


@dataclass
class GroundingConfig:
    video_dim: int
    text_dim: int
    hidden: int = 128
    num_heads: int = 4
    text_layers: int = 4     # transformer blocks over the query's tokens
    stem_layers: int = 4     # full-resolution blocks with cross-attention to the query
    levels: int = 7          # pyramid levels, strides 1, 2, ..., 2 ** (levels - 1) windows
    window: int = 9          # points each point attends to, itself in the middle
    head_layers: int = 3     # convolutions per head, the output one included
    dropout: float = 0.0     # in the MLPs and after the attention projections
    drop_path: float = DROP_PATH
    prior: float = 0.01      # initial foreground probability
    center_radius: float = 1.5      # positives lie within this many strides of the moment's centre
    label_smoothing: float = LABEL_SMOOTHING
    loss_norm_init: float = LOSS_NORM_PER_GPU   # the loss is divided by an EMA of the number of positives
    loss_norm_momentum: float = 0.9
    score_threshold: float = 0.001  # decoding: candidates per level above this score,
    pre_nms: int = 2000             # at most this many per level,
    min_length: float = 0.001       # longer than this (windows); soft-NMS with
    nms_sigma: float = 0.75
    min_score: float = 0.001        # drops a candidate whose decayed score falls below this

    def to_dict(self) -> dict:
        return asdict(self)

    def regress_range(self, level: int) -> tuple[float, float]:
        """Moments whose farther boundary is this many windows from a point are learnt there
        (both ends included; GroundNLQ's ``[0,4], [2,8], ..., [64,10000]`` at 7 levels)."""
        low = 0.0 if level == 0 else 2.0 ** level
        high = 10000.0 if level == self.levels - 1 else 2.0 ** (level + 2)
        return low, high


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of ``[B, C, T]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def sinusoid_encoding(length: int, dim: int) -> torch.Tensor:
    """``[dim, length]``: sin / cos of ``position / 10000 ** (2 * (i // 2) / dim)`` on even / odd ``i``."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    angle = position / 10000 ** (2 * (torch.arange(dim) // 2) / dim).double()
    angle[:, 0::2], angle[:, 1::2] = angle[:, 0::2].sin(), angle[:, 1::2].cos()
    return angle.float().T


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drops the whole residual branch of a row with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = (1 - p + torch.rand(x.shape[0], 1, 1, dtype=x.dtype, device=x.device)).floor()
    return x / (1 - p) * keep


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, C, T] -> [B, heads, T, C / heads]."""
    B, C, T = x.shape
    return x.view(B, num_heads, C // num_heads, T).transpose(2, 3)


def banded_attention(q, k, v, mask, window: int, chunk: int = 32) -> torch.Tensor:
    """Each point of ``q`` [B, H, T, c] attends to the ``window`` keys centred on it that ``mask``
    [B, T] marks valid; masked queries give 0.

    Computed a ``chunk`` of queries at a time against the ``chunk + window - 1`` keys they can
    see (Longformer's sliding chunks): one matrix product per chunk rather than one tiny one per
    point, so it is fast on a CPU, and memory is ``O(T * (chunk + window))``, linear in ``T``.
    """
    B, H, T, c = q.shape
    r, C = window // 2, min(chunk, T)
    n = -(-T // C)
    tail = n * C - T
    seen = lambda t: F.pad(t, (0, 0, r, tail + r)).unfold(2, C + 2 * r, C).transpose(-1, -2)  # noqa: E731
    keys_valid = F.pad(mask, (r, tail + r)).unfold(1, C + 2 * r, C)                       # [B, n, C + 2r]
    i, j = torch.arange(C, device=q.device)[:, None], torch.arange(C + 2 * r, device=q.device)[None]
    valid = ((j >= i) & (j <= i + 2 * r))[None, None] & keys_valid[:, None, :, None, :]   # [B, 1, n, C, C + 2r]
    scores = F.pad(q, (0, 0, 0, tail)).view(B, H, n, C, c) / math.sqrt(c) @ seen(k).transpose(-1, -2)
    # A finite fill: a masked query's row is all fill and softmaxes without NaN (then is zeroed).
    weights = scores.masked_fill(~valid, torch.finfo(scores.dtype).min).softmax(-1)
    weights = weights * F.pad(mask, (0, tail)).view(B, 1, n, C, 1)
    return (weights @ seen(v)).reshape(B, H, n * C, c)[:, :, :T]


class ConvAttention(nn.Module):
    """Self-attention with depthwise-convolved, LayerNorm-ed q / k / v (GroundNLQ's MaskedMHCA).

    ``window`` None attends to every point; ``stride`` 2 halves the time axis.
    """

    def __init__(self, dim: int, num_heads: int, window: int | None, stride: int, dropout: float):
        super().__init__()
        kernel = stride + 1 if stride > 1 else 3
        conv = lambda: nn.Conv1d(dim, dim, kernel, stride, kernel // 2, groups=dim, bias=False)  # noqa: E731
        self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
        self.q_norm, self.k_norm, self.v_norm = ChannelNorm(dim), ChannelNorm(dim), ChannelNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Conv1d(dim, dim, 1) for _ in range(4))
        self.drop = nn.Dropout(dropout)
        self.num_heads, self.window, self.stride = num_heads, window, stride

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = mask[:, ::self.stride]
        m = mask[:, None].to(x.dtype)
        q, k, v = (_heads(proj(norm(conv(x) * m)), self.num_heads) for conv, norm, proj in
                   ((self.q_conv, self.q_norm, self.q), (self.k_conv, self.k_norm, self.k),
                    (self.v_conv, self.v_norm, self.v)))
        if self.window is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        else:
            y = banded_attention(q, k, v, mask, self.window)
        y = y.transpose(2, 3).reshape(x.shape[0], -1, mask.shape[1])
        return self.drop(self.proj(y)) * m, mask


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Conv1d(dim, dim, 1) for _ in range(4))
        self.drop = nn.Dropout(dropout)
        self.num_heads = num_heads

    def forward(self, x, mask, text, text_mask) -> torch.Tensor:
        """``x`` [B, C, T] attends to ``text`` [B, C, L] where ``text_mask`` [B, L] is True."""
        q, k, v = (_heads(proj(t), self.num_heads) for proj, t in ((self.q, x), (self.k, text), (self.v, text)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])
        y = y.transpose(2, 3).reshape(x.shape)
        return self.drop(self.proj(y)) * mask[:, None].to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: (strided) self-attention, optional cross-attention, MLP.

    With drop path, residual branches are scaled per channel (``gamma_*``, from 1e-4) and dropped
    per row; the cross-attention shares the self-attention's scale. Without (``drop_path`` 0) they
    are added unscaled and there is no ``gamma_*``: GroundNLQ's ``AffineDropPath`` or ``Identity``.
    """

    def __init__(self, cfg: GroundingConfig, window: int | None, stride: int = 1, cross: bool = False):
        super().__init__()
        dim = cfg.hidden
        self.norm1, self.norm2 = ChannelNorm(dim), ChannelNorm(dim)
        self.attn = ConvAttention(dim, cfg.num_heads, window, stride, cfg.dropout)
        if cross:
            self.cross_norm, self.cross_attn = ChannelNorm(dim), CrossAttention(dim, cfg.num_heads, cfg.dropout)
        self.pool = nn.MaxPool1d(stride + 1, stride, (stride + 1) // 2) if stride > 1 else nn.Identity()
        self.mlp = nn.Sequential(nn.Conv1d(dim, 4 * dim, 1), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Conv1d(4 * dim, dim, 1), nn.Dropout(cfg.dropout))
        scale = lambda: nn.Parameter(torch.full((dim,), 1e-4)) if cfg.drop_path > 0 else None  # noqa: E731
        self.gamma_attn, self.gamma_mlp = scale(), scale()
        self.drop_path = cfg.drop_path

    def _branch(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return x if gamma is None else drop_path(gamma[:, None] * x, self.drop_path, self.training)

    def forward(self, x, mask, text=None, text_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        out, mask = self.attn(self.norm1(x), mask)
        m = mask[:, None].to(x.dtype)
        x = self.pool(x) * m + self._branch(out, self.gamma_attn)
        if hasattr(self, "cross_attn"):
            cross = self.cross_attn(self.cross_norm(x), mask, self.cross_norm(text), text_mask)
            x = x * m + self._branch(cross, self.gamma_attn)
        x = x + self._branch(self.mlp(self.norm2(x)) * m, self.gamma_mlp)
        return x, mask


class Head(nn.Module):
    """``layers - 1`` k3 convolutions + LayerNorm + ReLU, then a k3 output convolution, all masked."""

    def __init__(self, dim: int, out: int, layers: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, 3, padding=1, bias=False) for _ in range(layers - 1))
        self.norms = nn.ModuleList(ChannelNorm(dim) for _ in range(layers - 1))
        self.out = nn.Conv1d(dim, out, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None].to(x.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x) * m))
        return self.out(x) * m


class GroundingModel(nn.Module):
    def __init__(self, cfg: GroundingConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.hidden
        self.video_embed = nn.ModuleList([nn.Conv1d(cfg.video_dim, dim, 3, padding=1, bias=False),
                                          nn.Conv1d(dim, dim, 3, padding=1, bias=False)])
        self.video_norms = nn.ModuleList(ChannelNorm(dim) for _ in range(2))
        self.text_embed = nn.ModuleList([nn.Conv1d(cfg.text_dim, dim, 1, bias=False), nn.Conv1d(dim, dim, 1, bias=False)])
        self.text_norms = nn.ModuleList(ChannelNorm(dim) for _ in range(2))
        self.text_blocks = nn.ModuleList(Block(cfg, None) for _ in range(cfg.text_layers))
        self.stem = nn.ModuleList(Block(cfg, cfg.window, cross=True) for _ in range(cfg.stem_layers))
        self.branch = nn.ModuleList(Block(cfg, cfg.window, stride=2) for _ in range(cfg.levels - 1))
        self.neck_norms = nn.ModuleList(ChannelNorm(dim) for _ in range(cfg.levels))
        self.cls_head, self.reg_head = Head(dim, 1, cfg.head_layers), Head(dim, 2, cfg.head_layers)
        self.scales = nn.Parameter(torch.ones(cfg.levels))
        self.register_buffer("loss_normalizer", torch.tensor(0.0))
        for module in self.modules():
            if isinstance(module, nn.Conv1d) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.reset_heads()

    def reset_heads(self) -> None:
        """Fresh classification and regression heads and loss normaliser (GroundNLQ fine-tunes so)."""
        for head in (self.cls_head, self.reg_head):
            for module in head.modules():
                if hasattr(module, "reset_parameters") and module is not head:
                    module.reset_parameters()
                if isinstance(module, nn.Conv1d) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        prior = self.config.prior
        nn.init.constant_(self.cls_head.out.bias, -math.log((1 - prior) / prior))
        nn.init.ones_(self.scales)
        self.loss_normalizer.fill_(self.config.loss_norm_init)

    @property
    def multiple(self) -> int:
        """Padded lengths are a multiple of this, so every level halves exactly."""
        return 2 ** (self.config.levels - 1)

    def padded_length(self, longest: int) -> int:
        """The length to pad a batch whose longest clip has ``longest`` windows to: the next multiple
        of :attr:`multiple` and one more, so every level keeps at least one padded point after its
        last valid one. The k3 convolutions and poolings then read padding there (whose values do
        not depend on how much of it there is), never the array's end: a clip's outputs are the
        same at any longer padding, GroundNLQ's ``max_seq_len`` included."""
        return (-(-longest // self.multiple) + 1) * self.multiple

    def _embed(self, x, mask, convs, norms) -> torch.Tensor:
        m = mask[:, None].to(x.dtype)
        for conv, norm in zip(convs, norms):
            x = F.relu(norm(conv(x) * m))
        return x

    def forward(self, video, video_mask, text, text_mask) -> list[dict]:
        """``video`` [B, T, D] (T a multiple of :attr:`multiple`, see :meth:`padded_length`), ``text``
        [B, L, C], bool masks.

        Returns per level ``{"logits": [B, T_l], "offsets": [B, T_l, 2] (to the start and the end,
        in strides), "mask": [B, T_l], "stride": int}``; point ``j`` of a level is window ``j * stride``.
        """
        if video.shape[1] % self.multiple:
            raise ValueError(f"video length {video.shape[1]} is not a multiple of {self.multiple}")
        text = self._embed(text.transpose(1, 2), text_mask, self.text_embed, self.text_norms)
        for block in self.text_blocks:
            text, _ = block(text, text_mask)
        x = self._embed(video.transpose(1, 2), video_mask, self.video_embed, self.video_norms)
        position = sinusoid_encoding(x.shape[2], x.shape[1]).to(x) / math.sqrt(x.shape[1])
        x, mask = x + position * video_mask[:, None].to(x.dtype), video_mask
        for block in self.stem:
            x, mask = block(x, mask, text, text_mask)
        levels = [(x, mask)]
        for block in self.branch:
            x, mask = block(x, mask)
            levels.append((x, mask))
        outputs = []
        for level, ((x, mask), norm) in enumerate(zip(levels, self.neck_norms)):
            x = norm(x)
            outputs.append({"logits": self.cls_head(x, mask)[:, 0],
                            "offsets": F.relu(self.scales[level] * self.reg_head(x, mask)).transpose(1, 2),
                            "mask": mask, "stride": 2 ** level})
        return outputs


_GROUNDNLQ_NAMES = [  # (GroundNLQ's name pattern, ours), the first that matches wins
    (r"backbone\.vid_embd\.(\d+)\.conv\.", r"video_embed.\1."),
    (r"backbone\.vid_embd_norm\.", "video_norms."),
    (r"backbone\.txt_embd\.(\d+)\.conv\.", r"text_embed.\1."),
    (r"backbone\.txt_embd_norm\.", "text_norms."),
    (r"backbone\.txt_stem\.", "text_blocks."),
    (r"backbone\.vid_stem\.", "stem."),
    (r"backbone\.branch\.", "branch."),
    (r"neck\.fpn_norms\.", "neck_norms."),
    (r"(cls|reg)_head\.head\.(\d+)\.conv\.", r"\1_head.convs.\2."),
    (r"(cls|reg)_head\.norm\.", r"\1_head.norms."),
    (r"cls_head\.cls_head\.conv\.", "cls_head.out."),
    (r"reg_head\.offset_head\.conv\.", "reg_head.out."),
]
_GROUNDNLQ_BLOCK = [
    (r"\.ln1\.", ".norm1."), (r"\.ln2\.", ".norm2."), (r"\.ln3\.", ".cross_norm."),
    (r"\.drop_path_attn\.scale$", ".gamma_attn"), (r"\.drop_path_mlp\.scale$", ".gamma_mlp"),
    (r"\.(query|key|value)_conv\.conv\.", lambda m: f".{m.group(1)[0]}_conv."),
    (r"\.(query|key|value)_norm\.", lambda m: f".{m.group(1)[0]}_norm."),
    (r"attn\.(query|key|value)\.", lambda m: f"attn.{m.group(1)[0]}."),
]


def from_groundnlq(state: dict[str, torch.Tensor], cfg: GroundingConfig) -> dict[str, torch.Tensor]:
    """Our state dict from one saved by GroundNLQ's ``LocPointTransformer`` of the same sizes.

    Names are mapped by rule, ``[1, C, 1]`` LayerNorm parameters and drop-path scales are
    flattened, the per-level ``Scale`` modules stacked into ``scales``. GroundNLQ keeps its loss
    normaliser outside its state dict: it starts at ``cfg.loss_norm_init``. Entries with no
    rule keep their name (and fail :func:`load_state_dict`'s strict check).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {"scales": torch.stack([state.pop(f"reg_head.scale.{level}.scale") for level in range(cfg.levels)]),
           "loss_normalizer": torch.tensor(cfg.loss_norm_init)}
    for key, value in state.items():
        for pattern, ours in _GROUNDNLQ_NAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, ours, key, count=1)
                break
        if key.startswith(("text_blocks.", "stem.", "branch.")):
            for pattern, ours in _GROUNDNLQ_BLOCK:
                key = re.sub(pattern, ours, key)
        out[key] = value.flatten() if value.dim() == 3 and value.shape[0] == value.shape[2] == 1 else value
    return out
