"""Zero-shot moments with the dual encoder, and the fixed-window baseline.

Every window's video feature goes through the checkpoint's video projection and is scored by
its cosine with the query's text embedding. A moment is a run of ``2 ** j`` windows scored by
the mean of its windows' cosines; the best moments are kept with non-maximum suppression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from svitt_ego.features import MANIFEST, model_of
from svitt_ego.nlq.annotations import NLQAnnotations
from svitt_ego.nlq.detection import segment_iou
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.metric import submission_entry

MOMENT_LENGTHS = (1, 2, 4, 8, 16, 32)  # windows


def window_embeddings(model, features: torch.Tensor) -> torch.Tensor:
    """[T, D] pooled video features -> [T, embed_dim], L2-normalised as ``encode_video`` does."""
    return F.normalize(model.vision_proj(features.float()), dim=-1)


def query_embedding(model, token_states: torch.Tensor) -> torch.Tensor:
    """[L, C] text token states (as extracted) -> [embed_dim], as ``encode_text`` pools them."""
    mask = torch.ones(1, len(token_states), dtype=torch.long)
    return model.text_embedding(token_states.float()[None], mask)[0]


def best_moments(scores: torch.Tensor, top_k: int, iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """The ``top_k`` best runs ``(first, last, mean score)`` of windows; a run overlapping a better
    one by more than ``iou_threshold`` is dropped."""
    candidates, values = [], []
    for length in MOMENT_LENGTHS:
        if length > len(scores):
            break
        means = scores.unfold(0, length, 1).mean(1)
        starts = torch.arange(len(means))
        candidates.append(torch.stack([starts, starts + length - 1], 1))
        values.append(means)
    candidates, values = torch.cat(candidates).double(), torch.cat(values)
    chosen = []
    for i in values.argsort(descending=True).tolist():
        span = candidates[i] + torch.tensor([0.0, 1.0])  # a run covers [first, last + 1)
        if all(segment_iou(span, (candidates[j] + torch.tensor([0.0, 1.0]))[None])[0] <= iou_threshold
               for j in chosen):
            chosen.append(i)
            if len(chosen) == top_k:
                break
    return [(int(candidates[i, 0]), int(candidates[i, 1]), float(values[i])) for i in chosen]


def moment_seconds(features: NLQFeatures, clip_uid: str, first: int, last: int) -> tuple[float, float]:
    """A run of windows in clip seconds: from half a stride before its first centre to half after its last."""
    return (float(features.to_seconds(clip_uid, first - 0.5)), float(features.to_seconds(clip_uid, last + 0.5)))


@torch.no_grad()
def zero_shot_results(model, features: NLQFeatures, annotations: NLQAnnotations, top_k: int = 5) -> list[dict]:
    """The official submission's ``results`` for every query, by dual-encoder scoring."""
    results = []
    embedded: dict[str, torch.Tensor] = {}
    for q in annotations.queries:
        if q.clip_uid not in embedded:
            embedded[q.clip_uid] = window_embeddings(model, features.video(q.clip_uid))
        scores = embedded[q.clip_uid] @ query_embedding(model, features.text(q))
        duration = annotations.clips[q.clip_uid].duration
        times = [_clamped(moment_seconds(features, q.clip_uid, a, b), duration) for a, b, _ in
                 best_moments(scores, top_k)]
        results.append(submission_entry(q, times))
    return results


def _clamped(times: tuple[float, float], duration: float) -> tuple[float, float]:
    return min(max(times[0], 0.0), duration), min(max(times[1], 0.0), duration)


@torch.no_grad()
def search(model, features: NLQFeatures, text: str, top_k: int = 10) -> list[tuple[str, float, float, float]]:
    """``(clip_uid, start, end, score)`` of the best moments over every clip for a free-text query."""
    query = model.encode_text([text])[0].float()
    found = []
    for clip_uid in features.keys():
        scores = window_embeddings(model, features.video(clip_uid)) @ query
        for a, b, score in best_moments(scores, top_k):
            found.append((clip_uid, *moment_seconds(features, clip_uid, a, b), score))
    return sorted(found, key=lambda m: -m[3])[:top_k]


def fixed_window_baseline(annotations: NLQAnnotations, step: float = 0.01) -> tuple[float, float]:
    """The one interval ``(start, end)``, as fractions of the clip, with the best R@1 IoU=0.3 on ``annotations``."""
    grid = torch.arange(0, 1 + step / 2, step, dtype=torch.float64)
    start, end = torch.meshgrid(grid, grid, indexing="ij")
    keep = end > start
    start, end = start[keep], end[keep]
    hits = torch.zeros_like(start)
    for q in annotations.queries:
        d = annotations.clips[q.clip_uid].duration
        a, b = start * d, end * d
        inter = (torch.minimum(b, torch.tensor(q.end)) - torch.maximum(a, torch.tensor(q.start))).clamp(min=0)
        union = torch.maximum(b, torch.tensor(q.end)) - torch.minimum(a, torch.tensor(q.start))
        hits += (inter / union) > 0.3
    best = int(hits.argmax())
    return float(start[best]), float(end[best])


def fixed_window_results(annotations: NLQAnnotations, interval: tuple[float, float]) -> list[dict]:
    return [submission_entry(q, [(interval[0] * annotations.clips[q.clip_uid].duration,
                                  interval[1] * annotations.clips[q.clip_uid].duration)])
            for q in annotations.queries]


def load_dual_encoder(features: NLQFeatures, checkpoint: str | None = None):
    """The SViTT-Ego model the features came from (the manifest's checkpoint unless given); weights
    other than those the features were extracted with are refused."""
    return model_of(features.manifest, str(features.folder / MANIFEST), checkpoint)
