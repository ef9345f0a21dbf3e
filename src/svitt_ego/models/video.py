"""The video encoder: BEiT inflated to video, with edge and node sparsity.

Frames are embedded one by one with BEiT's patch convolution and flattened
frame-major, ``(t h w)`` in raster order, behind one [CLS] token; there is no
absolute position embedding, every layer has its own 3D relative position
bias. Node sparsity runs after the FFN of the layers in ``prune_layers``: the
``ceil(keep_rate * n)`` patch tokens with the highest [CLS] attention (mean
over heads) survive in their original order, together with their original
(t, h, w) positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from svitt_ego.config import VisionConfig
from svitt_ego.models.attention import dense_attention, reference_attention, resolve_backend
from svitt_ego.models.block_pattern import BlockPattern, block_pattern_from_noise, sample_block_pattern
from svitt_ego.models.blocked import blocked_attention
from svitt_ego.models.layers import gelu_linear, norm_linear, scaled_linear
from svitt_ego.models.position_bias import CLS_POSITION, RelativePositionBias3D
from svitt_ego.models.pruning import gather_tokens, num_kept, prune_tokens
from svitt_ego.models.token_order import token_order

# Eval mode fixes layer l's pattern with the seed ``eval_seed * EVAL_SEED_STRIDE + l``: distinct per
# layer, and distinct per eval_seed for up to this many layers.
EVAL_SEED_STRIDE = 1009


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class VideoAttention(nn.Module):
    """BEiT self-attention (q and v biases, no k bias) with the 3D relative position bias."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.rel_pos_bias = RelativePositionBias3D(cfg.num_frames, cfg.grid_size, cfg.num_heads)
        self.backend = cfg.backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, pattern: BlockPattern | None,
                scale: torch.Tensor | None = None,
                norm: nn.LayerNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale * proj(attention(norm(x)))`` and the [CLS] row's attention probabilities. The block's
        layer scale, if given, is folded into the projection; its LayerNorm, if given, is recomputed in
        the backward rather than kept (``svitt_ego.models.layers``)."""
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = norm_linear(x, norm, self.qkv.weight, bias)
        q, k, v = qkv.view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if pattern is not None and pattern.svitt_blocks:
            attend = blocked_attention  # the one backend that computes SViTT's blocks
        elif self.backend == "reference":
            attend = reference_attention
        elif pattern is None:
            attend = dense_attention
        else:
            attend = resolve_backend(self.backend, q.device, q.dtype, q.shape[-1], pattern.block_size)
        out, cls_probs = attend(q, k, v, positions, self.rel_pos_bias, pattern)
        return scaled_linear(out.transpose(1, 2).reshape(B, N, C), self.proj, scale), cls_probs


class VideoBlock(nn.Module):
    """BEiT's block with layer scale: ``x + gamma_1 * attn(norm1(x))``, then ``x + gamma_2 * mlp(norm2(x))``,
    each branch dropped by drop path. The scales are folded into the projections, the LayerNorms and the
    MLP's GELU are recomputed in the backward (``svitt_ego.models.layers``): the same maths, keeping less
    for the backward."""

    def __init__(self, cfg: VisionConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VideoAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width))
        self.gamma_1 = nn.Parameter(torch.full((cfg.width,), cfg.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((cfg.width,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, positions, pattern):
        attn, cls_probs = self.attn(x, positions, pattern, self.gamma_1, self.norm1)
        x = x + self.drop_path(attn)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        x = x + self.drop_path(gelu_linear(norm_linear(x, self.norm2, fc1.weight, fc1.bias), fc2, self.gamma_2))
        return x, cls_probs


@dataclass
class VideoOutput:
    tokens: torch.Tensor  # [B, 1 + n, C] after the final LayerNorm: what the fusion layers see
    pooled: torch.Tensor  # [B, C]
    last_hidden_state: torch.Tensor  # [B, 1 + n, C] before the final LayerNorm
    # Per pruning layer: [B, n_l] original patch positions (frame-major (t h w) order) of the kept tokens.
    kept_positions: list[torch.Tensor] = field(default_factory=list)


class VideoEncoder(nn.Module):
    """BEiT over ``num_frames`` frames with edge sparsity (block-local + random attention, one block
    pattern per layer) and node sparsity (token pruning by [CLS] attention after ``prune_layers``).

    In training the patterns of all layers are drawn on the input's device at every forward, without
    host-device synchronisation; in eval mode they are fixed by ``eval_seed`` and cached.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self._eval_patterns: dict[tuple[int, int, str], BlockPattern] = {}
        self._orders: dict[str, torch.Tensor] = {}
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(VideoBlock(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        # Mean pooling's LayerNorm (BEiT's pooler.layernorm); [CLS] pooling reads ``norm``'s output.
        self.fc_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) if cfg.pooling == "mean" else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            nn.init.trunc_normal_(block.attn.rel_pos_bias.table, std=0.02)

    @property
    def sparse(self) -> bool:
        return self.cfg.attention == "sparse"

    def block_pattern(self, layer: int, num_tokens: int, device: torch.device | str) -> BlockPattern | None:
        """Random blocks for one layer: freshly drawn in training, fixed by ``eval_seed`` in eval mode."""
        if not self.sparse:
            return None
        cfg = self.cfg
        if self.training:
            return sample_block_pattern(num_tokens, cfg.block_size, cfg.k_local, cfg.k_random, device=device,
                                        svitt_blocks=cfg.svitt_blocks)
        key = (layer, num_tokens, str(torch.device(device)))
        if key not in self._eval_patterns:
            generator = torch.Generator().manual_seed(cfg.eval_seed * EVAL_SEED_STRIDE + layer)
            self._eval_patterns[key] = sample_block_pattern(num_tokens, cfg.block_size, cfg.k_local,
                                                            cfg.k_random, generator, device, cfg.svitt_blocks)
        return self._eval_patterns[key]

    def block_patterns(self, num_tokens: int, device: torch.device) -> list[BlockPattern | None]:
        """Every layer's pattern for ``num_tokens`` input patch tokens; in training one draw for all layers."""
        counts = self.tokens_per_layer(num_tokens)
        if not self.sparse or not self.training:
            return [self.block_pattern(layer, n, device) for layer, n in enumerate(counts)]
        cfg = self.cfg
        blocks = [math.ceil(n / cfg.block_size) for n in counts]
        noise = torch.rand(len(counts), blocks[0], blocks[0], device=device)
        return [block_pattern_from_noise(noise[layer, :nb, :nb], cfg.block_size, cfg.k_local, cfg.k_random,
                                         cfg.svitt_blocks)
                for layer, nb in enumerate(blocks)]

    def tokens_per_layer(self, num_tokens: int) -> list[int]:
        """Patch tokens each layer sees, given node sparsity."""
        counts = []
        for layer in range(self.cfg.depth):
            counts.append(num_tokens)
            if layer in self.cfg.prune_layers and self.cfg.keep_rate < 1.0:
                num_tokens = num_kept(self.cfg.keep_rate, num_tokens)
        return counts

    def token_order(self, device: torch.device) -> torch.Tensor | None:
        """[1 + n] indices that put the patch tokens in ``cfg.token_order`` behind [CLS]; None for raster."""
        if self.cfg.token_order == "raster":
            return None
        key = str(torch.device(device))
        if key not in self._orders:
            order = token_order(self.cfg.token_order, self.cfg.num_frames, self.cfg.grid_size)
            self._orders[key] = torch.cat([order.new_zeros(1), order + 1]).to(device)
        return self._orders[key]

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> [B, 1 + T*h*w, C] with [CLS] in front."""
        B, T = frames.shape[:2]
        if T != self.cfg.num_frames or frames.shape[-1] != self.cfg.image_size:
            raise ValueError(f"expected frames [B, {self.cfg.num_frames}, 3, {self.cfg.image_size}, "
                             f"{self.cfg.image_size}], got {list(frames.shape)}")
        x = self.patch_embed(frames.flatten(0, 1)).flatten(2).transpose(1, 2)
        x = x.reshape(B, -1, x.shape[-1])
        return torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)

    def forward(self, frames: torch.Tensor) -> VideoOutput:
        x = self.embed(frames)
        B, N, _ = x.shape
        positions = torch.arange(CLS_POSITION, N - 1, device=x.device)[None]  # [1, N]: [CLS], then 0 .. n-1
        order = self.token_order(x.device)
        if order is not None:  # blocks are cut along the curve; the output returns to raster order below
            x, positions = x[:, order], positions[:, order]
        kept = []
        patterns = self.block_patterns(N - 1, x.device)
        for layer, (block, pattern) in enumerate(zip(self.blocks, patterns)):
            if self.cfg.grad_checkpointing and self.training:
                x, cls_probs = checkpoint(block, x, positions, pattern, use_reentrant=False)
            else:
                x, cls_probs = block(x, positions, pattern)
            if layer in self.cfg.prune_layers and self.cfg.keep_rate < 1.0:
                x, positions = prune_tokens(x, positions, cls_probs.mean(1)[:, 1:], self.cfg.keep_rate)
                kept.append(positions[:, 1:])
        if order is not None:
            x, positions, kept = _to_raster(x, positions, kept)
        tokens = self.norm(x)
        if self.cfg.pooling == "mean":
            pooled = self.fc_norm(x[:, 1:].mean(1))
        else:
            pooled = tokens[:, 0]
        return VideoOutput(tokens=tokens, pooled=pooled, last_hidden_state=x, kept_positions=kept)



def _to_raster(x: torch.Tensor, positions: torch.Tensor,
               kept: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The tokens [B, 1 + n, C], their positions [1 or B, 1 + n] and each pruning step's kept positions,
    sorted by position: frame-major raster order, as without a token order."""
    rank = positions[:, 1:].argsort(dim=1) + 1
    idx = torch.cat([rank.new_zeros(rank.shape[0], 1), rank], dim=1).expand(x.shape[0], -1)
    return gather_tokens(x, idx), positions.expand(x.shape[0], -1).gather(1, idx), [p.sort(1).values for p in kept]
