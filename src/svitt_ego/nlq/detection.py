"""Training targets, losses and decoding of the grounding model's pyramid outputs (GroundNLQ's).

All positions are in window indices (see :mod:`svitt_ego.nlq.features` for seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svitt_ego.nlq.model import GroundingConfig
from svitt_ego.search import segment_iou


def points(out: dict) -> torch.Tensor:
    """The window index of each point of a level's output."""
    return torch.arange(out["mask"].shape[1], device=out["mask"].device, dtype=torch.float32) * out["stride"]


def level_targets(p: torch.Tensor, stride: int, moments: torch.Tensor, cfg: GroundingConfig,
                  level: int) -> torch.Tensor:
    """Bool [B, T_l]: which points ``p`` of a level are positives for each row's moment [B, 2].

    A positive lies strictly inside the moment and within ``center_radius`` strides of its
    centre (ActionFormer's centre sampling), and the moment's farther boundary from it is in
    the level's regression range, both ends included.
    """
    start, end = moments[:, :1], moments[:, 1:]
    centre = (start + end) / 2
    radius = cfg.center_radius * stride
    p = p[None, :]
    inside = (p > torch.maximum(start, centre - radius)) & (p < torch.minimum(end, centre + radius))
    farther = torch.maximum(p - start, end - p)
    low, high = cfg.regress_range(level)
    return inside & (farther >= low) & (farther <= high)


def diou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - DIoU of 1-D segments given as offsets [N, 2] (to the start, to the end) from one point."""
    inter = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 1], target[:, 1])
    union = pred.sum(1) + target.sum(1) - inter
    enclosing = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 1], target[:, 1])
    centre_gap = 0.5 * (pred[:, 1] - pred[:, 0] - target[:, 1] + target[:, 0])
    return 1 - inter / union.clamp(min=1e-8) + (centre_gap / enclosing.clamp(min=1e-8)) ** 2


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                        gamma: float = 2.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = alpha * labels + (1 - alpha) * (1 - labels)
    return alpha_t * ce * (1 - p_t) ** gamma


def grounding_loss(outputs: list[dict], moments: torch.Tensor, cfg: GroundingConfig, normalizer: float) -> dict:
    """Focal loss (labels smoothed) on every valid point + DIoU loss on the positives.

    Both are divided by the EMA of the positive count, ``normalizer`` updated by this batch
    (returned as ``"normalizer"``), as GroundNLQ does. ``"zero_offsets"`` [2] counts the positives
    whose predicted distance to the start / end is exactly 0 (a ReLU that passes no gradient).
    """
    logits, labels, pred, target = [], [], [], []
    for level, out in enumerate(outputs):
        p = points(out)
        positive = level_targets(p, out["stride"], moments, cfg, level) & out["mask"]
        logits.append(out["logits"][out["mask"]])
        labels.append(positive[out["mask"]].float())
        rows, cols = positive.nonzero(as_tuple=True)
        pred.append(out["offsets"][rows, cols])
        target.append(torch.stack([p[cols] - moments[rows, 0], moments[rows, 1] - p[cols]], 1) / out["stride"])
    labels = torch.cat(labels)
    normalizer = cfg.loss_norm_momentum * normalizer + (1 - cfg.loss_norm_momentum) * max(int(labels.sum()), 1)
    smoothed = labels * (1 - cfg.label_smoothing) + cfg.label_smoothing / 2
    cls = sigmoid_focal_loss(torch.cat(logits), smoothed).sum() / normalizer
    pred = torch.cat(pred)
    reg = diou_loss(pred, torch.cat(target)).sum() / normalizer
    return {"loss": cls + reg, "cls": cls.detach(), "reg": reg.detach(), "normalizer": normalizer,
            "positives": len(pred), "zero_offsets": (pred.detach() == 0).sum(0)}


def soft_nms(segments: torch.Tensor, scores: torch.Tensor, top_k: int, sigma: float = 0.75,
             min_score: float = 0.0):
    """Gaussian soft-NMS: take the best segment, decay the others' scores by exp(-IoU^2 / sigma),
    drop those below ``min_score``, repeat.

    Returns the chosen ``(segments [k, 2], scores [k])``, best first, ``k <= top_k``.
    """
    segments, scores = segments.clone(), scores.clone()
    chosen, chosen_scores = [], []
    while scores.numel() and len(chosen) < top_k:
        best = int(scores.argmax())
        chosen.append(segments[best])
        chosen_scores.append(scores[best])
        scores = scores * torch.exp(-segment_iou(segments[best], segments) ** 2 / sigma)
        keep = scores >= min_score
        keep[best] = False
        segments, scores = segments[keep], scores[keep]
    if not chosen:
        return segments.new_zeros(0, 2), scores.new_zeros(0)
    return torch.stack(chosen), torch.stack(chosen_scores)


def decode(outputs: list[dict], row: int, cfg: GroundingConfig, top_k: int = 5):
    """One row's best moments as ``(segments [k, 2] in window indices, scores [k])``.

    Per level: the ``pre_nms`` best points scoring above ``score_threshold`` whose segment is
    longer than ``min_length``; then soft-NMS over all levels.
    """
    segments, scores = [], []
    for out in outputs:
        score = torch.sigmoid(out["logits"][row]) * out["mask"][row]
        keep = (score > cfg.score_threshold).nonzero(as_tuple=True)[0]
        keep = keep[score[keep].argsort(descending=True)[:cfg.pre_nms]]
        p, d = points(out)[keep], out["offsets"][row][keep] * out["stride"]
        segment = torch.stack([p - d[:, 0], p + d[:, 1]], dim=1)
        long = segment[:, 1] - segment[:, 0] > cfg.min_length
        segments.append(segment[long])
        scores.append(score[keep][long])
    return soft_nms(torch.cat(segments), torch.cat(scores), top_k, cfg.nms_sigma, cfg.min_score)
