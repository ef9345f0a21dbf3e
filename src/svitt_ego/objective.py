"""The pretraining objective: EgoNCE (or InfoNCE) + video-text matching + masked language modelling."""

from __future__ import annotations

import torch
from torch import nn

from svitt_ego.config import Config
from svitt_ego.data.egoclip import action_positive_mask
from svitt_ego.distributed import all_gather_with_grad, gather_tags, rank
from svitt_ego.losses import (IGNORE_INDEX, ego_nce, mask_tokens, mlm_loss, replacement_ids, sample_vtm_negatives,
                              vtm_loss, vtm_pairs)
from svitt_ego.models import SViTTEgo


class PretrainingObjective(nn.Module):
    """The model plus its three objectives; ``forward(batch)`` returns the weighted sum and each loss.

    Wrapping the objective (not only the model) in DDP makes every parameter's
    gradient flow through one ``forward`` call, as DDP expects.
    """

    def __init__(self, model: SViTTEgo, cfg: Config, tokenizer):
        super().__init__()
        self.model = model
        self.loss_cfg = cfg.loss
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = cfg.model.text.vocab_size
        # Buffers, so that they move with the module and masking copies nothing to the device per step.
        special = sorted(set(tokenizer.all_special_ids))
        self.register_buffer("special_ids", torch.tensor(special), persistent=False)
        self.register_buffer("replacement_ids", replacement_ids(self.vocab_size, special, self.mask_token_id),
                             persistent=False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, cfg = self.model, self.loss_cfg
        ids, mask = batch["input_ids"], batch["attention_mask"]
        video = m.forward_video(batch["frames"])
        text_hidden = m.forward_text(ids, mask)
        video_emb, text_emb = m.video_embedding(video), m.text_embedding(text_hidden, mask)

        # Contrastive, over the global batch: embeddings and tags from every process.
        if cfg.contrastive == "egonce":
            positives = action_positive_mask(gather_tags(batch["nouns"]), gather_tags(batch["verbs"]))
        else:
            positives = None
        contrastive = ego_nce(all_gather_with_grad(video_emb), all_gather_with_grad(text_emb), positives,
                              m.temperature)

        # VTM, on the local batch; positives (action-aware with EgoNCE) are never drawn as negatives.
        n = ids.shape[0]
        first = rank() * n
        local_positives = positives[first:first + n, first:first + n] if positives is not None else None
        with torch.no_grad():
            sim = video_emb @ text_emb.T / m.temperature
        if cfg.vtm_negatives == "random":
            sim = torch.zeros_like(sim)  # a uniform draw among the non-positives
        neg_text, neg_video = sample_vtm_negatives(sim, local_positives)
        vtm = vtm_loss(m.vtm_logits(*vtm_pairs(text_hidden, mask, video.tokens, neg_text, neg_video)), n)

        # MLM: masked text through the text layers, then the fusion layers with the video.
        masked_ids, labels = mask_tokens(ids, mask, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                         special_token_ids=self.special_ids, probability=cfg.mlm_probability,
                                         replacements=self.replacement_ids)
        # Only the masked positions go through the vocabulary projection: one host sync for their
        # count, much cheaper than [B, L, V] logits.
        selected = labels != IGNORE_INDEX
        mlm_logits = m.mlm_logits(masked_ids, mask, video.tokens, select=selected)
        mlm = mlm_loss(mlm_logits, labels[selected])

        loss = cfg.contrastive_weight * contrastive + cfg.vtm_weight * vtm + cfg.mlm_weight * mlm
        return {"loss": loss, "contrastive": contrastive.detach(), "vtm": vtm.detach(), "mlm": mlm.detach()}
