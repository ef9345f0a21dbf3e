"""BERT, split in two: the text encoder (the first layers) and the multimodal
(fusion) encoder (the last ``num_fusion_layers`` layers, each with an added
cross-attention to the video tokens).

Module names follow Hugging Face's ``BertModel`` below the layer level
(``attention.self.query``, ``intermediate.dense``, ...) so that its weights map
one to one. Multimodal node sparsity: in the first fusion layer the video
tokens most attended by the text [CLS] (or, with ``fusion_pooling: mean``, by
the text tokens on average; mean over heads) are kept,
``ceil(keep_rate * n)`` patch tokens plus the video [CLS]; the later fusion
layers see only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from svitt_ego.config import TextConfig
from svitt_ego.models.layers import gelu_linear
from svitt_ego.models.pruning import gather_tokens, kept_indices


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(kv_width, cfg.width)
        self.value = nn.Linear(kv_width, cfg.width)
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x, context, context_mask, query_weights: torch.Tensor | None = None):
        """``context_mask`` is boolean [B, Nk] (True = attend) or None.

        With ``query_weights`` [B, Lq] (rows summing to 1) also returns the attention probabilities
        [B, Nk] averaged over heads and weighted over the queries (else None)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        mask = None if context_mask is None else context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        probs = None
        if query_weights is not None:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            per_query = scores.float().softmax(-1).mean(1)  # [B, Lq, Nk]
            probs = (query_weights[:, :, None].float() * per_query).sum(1)
        return out.transpose(1, 2).flatten(2), probs


class BertResidual(nn.Module):
    """Dense, dropout, add the residual, LayerNorm (BERT's ``*Output`` modules)."""

    def __init__(self, in_width: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.add_norm(self.dense(x), residual)

    def add_norm(self, branch: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(branch) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertResidual(cfg.width, cfg)

    def forward(self, x, context, context_mask, query_weights=None):
        out, probs = self.self(x, context, context_mask, query_weights)
        return self.output(out, x), probs


class BertIntermediate(nn.Module):
    """BERT's intermediate dense layer. Its GELU is applied with the output's dense layer, ``gelu_linear``
    (the same maths; GELU's output is recomputed in the backward rather than kept)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, video_width: int | None = None):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.width)
        self.crossattention = BertAttention(cfg, video_width) if video_width is not None else None
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidual(cfg.intermediate_size, cfg)

    def forward(self, x, mask, video=None, query_weights=None):
        x, _ = self.attention(x, x, mask)
        probs = None
        if self.crossattention is not None:
            x, probs = self.crossattention(x, video, None, query_weights)
        ffn = gelu_linear(self.intermediate.dense(x), self.output.dense)
        return self.output.add_norm(ffn, x), probs


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TextEncoder(nn.Module):
    """BERT layers ``0 .. depth - num_fusion_layers - 1`` on text alone."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_text_layers))
        init_bert_weights(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask.bool()
        for layer in self.layers:
            x, _ = layer(x, mask)
        return x


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # [B, L, C] text tokens after the fusion layers
    # [B, 1 + m] indices into the video token sequence (0 = [CLS]) of the tokens the later layers saw;
    # None without multimodal pruning.
    kept_video_tokens: torch.Tensor | None


def text_query_weights(attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L] weights of the text positions, each row summing to 1: all on [CLS] (``"cls"``) or
    spread evenly over the real tokens (``"mean"``). They pool the fused text states for the VTM head
    and the text queries' cross-attention that ranks the video tokens for multimodal pruning."""
    if pooling == "cls":
        weights = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
        weights[:, 0] = 1.0
        return weights
    weights = attention_mask.float()
    return weights / weights.sum(1, keepdim=True).clamp(min=1)


class FusionEncoder(nn.Module):
    """The last BERT layers, each with cross-attention to the video tokens, and multimodal pruning:
    the first layer keeps the video tokens most attended by the text queries of ``cfg.fusion_pooling``."""

    def __init__(self, cfg: TextConfig, video_width: int):
        super().__init__()
        self.keep_rate = cfg.keep_rate
        self.pooling = cfg.fusion_pooling
        self.layers = nn.ModuleList(BertLayer(cfg, video_width) for _ in range(cfg.num_fusion_layers))
        init_bert_weights(self)

    def forward(self, text: torch.Tensor, attention_mask: torch.Tensor, video: torch.Tensor) -> FusionOutput:
        mask = attention_mask.bool()
        kept = None
        for i, layer in enumerate(self.layers):
            prune = i == 0 and self.keep_rate < 1.0
            weights = text_query_weights(attention_mask, self.pooling) if prune else None
            text, probs = layer(text, mask, video, query_weights=weights)
            if prune:
                kept = kept_indices(probs[:, 1:], self.keep_rate)  # text queries -> video patches
                video = gather_tokens(video, kept)
        return FusionOutput(hidden=text, kept_video_tokens=kept)


class MLMHead(nn.Module):
    """BERT's masked-language-model head; the decoder is tied to the word embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = nn.Sequential()
        self.transform.dense = nn.Linear(cfg.width, cfg.width)
        self.transform.act = nn.GELU()
        self.transform.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_bert_weights(self.transform)

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(x), word_embeddings, self.bias)
