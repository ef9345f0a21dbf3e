"""Zero-shot NLQ submissions with the dual encoder, and the fixed-window baseline.

Each query is scored against its clip's windows as :mod:`svitt_ego.search` scores any video (the
same moments, the same non-maximum suppression), from the query's extracted token states.
"""

from __future__ import annotations

import torch

from svitt_ego.features import MANIFEST, FeatureFolderError, model_of
from svitt_ego.nlq.annotations import NLQAnnotations
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.metric import submission_entry
from svitt_ego.nlq.text import SVITT
from svitt_ego.search import best_moments, moment_seconds, window_embeddings


def query_embedding(model, token_states: torch.Tensor) -> torch.Tensor:
    """[L, C] text token states (as extracted) -> [embed_dim], as ``encode_text`` pools them."""
    mask = torch.ones(1, len(token_states), dtype=torch.long)
    return model.text_embedding(token_states.float()[None], mask)[0]


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
    other than those the features were extracted with are refused, and so are queries' token states
    of another text encoder (the dual encoder scores its own)."""
    where = str(features.folder / MANIFEST)
    if features.manifest["text_encoder"] != SVITT:
        raise FeatureFolderError(f"{where}: the queries' token states are {features.manifest['text_encoder']}'s; "
                                 f"zero-shot scoring needs the dual encoder's own ({SVITT}): extract them with "
                                 "--text svitt-ego into another folder")
    return model_of(features.manifest, where, checkpoint)
