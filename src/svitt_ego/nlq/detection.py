"""Training targets, losses and decoding of the grounding model's pyramid outputs.

All positions are in window indices (see :mod:`svitt_ego.nlq.features` for seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svitt_ego.nlq.model import GroundingConfig


def level_targets(points: torch.Tensor, stride: int, moments: torch.Tensor, cfg: GroundingConfig,
                  level: int) -> torch.Tensor:
    """Bool [B, T_l]: which points of a level are positives for each row's moment [B, 2].

    A positive lies inside the moment, within ``center_radius`` strides of its centre
    (ActionFormer's centre sampling), and the moment's farther boundary from it falls in the
    level's regression range.
    """
    start, end = moments[:, :1], moments[:, 1:]
    centre = (start + end) / 2
    radius = cfg.center_radius * stride
    p = points[None, :]
    inside = (p >= torch.maximum(start, centre - radius)) & (p <= torch.minimum(end, centre + radius))
    farther = torch.maximum(p - start, end - p)
    low, high = cfg.regress_range(level)
    return inside & (farther >= low) & (farther < high)


def diou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - DIoU of 1-D segments [N, 2] (start, end): 1 - IoU + (centre distance / enclosing length)^2."""
    inter = (torch.minimum(pred[:, 1], target[:, 1]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    union = (pred[:, 1] - pred[:, 0]) + (target[:, 1] - target[:, 0]) - inter
    enclosing = torch.maximum(pred[:, 1], target[:, 1]) - torch.minimum(pred[:, 0], target[:, 0])
    centre_gap = (pred.sum(1) - target.sum(1)) / 2
    return 1 - inter / union.clamp(min=1e-6) + (centre_gap / enclosing.clamp(min=1e-6)) ** 2


def grounding_loss(outputs: list[dict], moments: torch.Tensor, cfg: GroundingConfig) -> dict:
    """Focal loss on every valid point + DIoU loss on the positives, both per positive."""
    logits, labels, pred, target = [], [], [], []
    for level, out in enumerate(outputs):
        positive = level_targets(out["points"], 2 ** level, moments, cfg, level) & out["mask"]
        logits.append(out["logits"][out["mask"]])
        labels.append(positive[out["mask"]].float())
        rows, cols = positive.nonzero(as_tuple=True)
        p = out["points"][cols]
        d = out["distances"][rows, cols]
        pred.append(torch.stack([p - d[:, 0], p + d[:, 1]], dim=1))
        target.append(moments[rows])
    labels = torch.cat(labels)
    num_positive = labels.sum().clamp(min=1)
    cls = sigmoid_focal_loss(torch.cat(logits), labels).sum() / num_positive
    reg = diou_loss(torch.cat(pred), torch.cat(target)).sum() / num_positive
    return {"loss": cls + reg, "cls": cls.detach(), "reg": reg.detach()}


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                        gamma: float = 2.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = alpha * labels + (1 - alpha) * (1 - labels)
    return alpha_t * ce * (1 - p_t) ** gamma


def segment_iou(one: torch.Tensor, many: torch.Tensor) -> torch.Tensor:
    inter = (torch.minimum(one[1], many[:, 1]) - torch.maximum(one[0], many[:, 0])).clamp(min=0)
    union = torch.maximum(one[1], many[:, 1]) - torch.minimum(one[0], many[:, 0])
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def soft_nms(segments: torch.Tensor, scores: torch.Tensor, top_k: int, sigma: float = 0.5):
    """Gaussian soft-NMS: take the best segment, decay the others' scores by exp(-IoU^2 / sigma), repeat.

    Returns the chosen ``(segments [k, 2], scores [k])``, best first, ``k <= top_k``.
    """
    segments, scores = segments.clone(), scores.clone()
    chosen, chosen_scores = [], []
    while scores.numel() and len(chosen) < top_k:
        best = int(scores.argmax())
        chosen.append(segments[best])
        chosen_scores.append(scores[best])
        decay = torch.exp(-segment_iou(segments[best], segments) ** 2 / sigma)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[best] = False
        segments, scores = segments[keep], (scores * decay)[keep]
    if not chosen:
        return segments.new_zeros(0, 2), scores.new_zeros(0)
    return torch.stack(chosen), torch.stack(chosen_scores)


def decode(outputs: list[dict], row: int, top_k: int = 5, pre_nms: int = 1000, sigma: float = 0.5):
    """One row's best moments as ``(segments [k, 2] in window indices, scores [k])``."""
    segments, scores = [], []
    for out in outputs:
        valid = out["mask"][row]
        p, d = out["points"][valid], out["distances"][row][valid]
        segments.append(torch.stack([p - d[:, 0], p + d[:, 1]], dim=1))
        scores.append(torch.sigmoid(out["logits"][row][valid]))
    segments, scores = torch.cat(segments), torch.cat(scores)
    order = scores.argsort(descending=True)[:pre_nms]
    return soft_nms(segments[order], scores[order], top_k, sigma)
