"""Narration queries for pretraining the grounding model, GroundNLQ's recipe.

GroundNLQ (its ``create_pretrain_data_from_egoclip.py``) pretrains on EgoClip narrations used as
queries: every narration of a video whose EgoClip interval lies strictly inside a clip of the
NLQ / MQ / VQ *training* files becomes a query of that clip, answered by that interval in clip
seconds. :func:`narration_queries` writes them as an NLQ-format file (one annotation per clip,
``<clip_uid>_narrations``), so features are extracted and training runs as for NLQ. A video of
any file passed as ``exclude`` (val, test) gives no query. GroundNLQ's temporal jittering of the
answers is an option of a training stage (``Stage.jitter``, :func:`jitter`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from svitt_ego.data.egoclip import read_egoclip
from svitt_ego.nlq.annotations import NLQFormatError, _items, _number, _uid, load_json
from svitt_ego.untrusted import shown


def _clips(path: str | Path) -> list[tuple[str, str, float, float]]:
    """``(video_uid, clip_uid, video_start_sec, video_end_sec)`` of an Ego4D episodic-memory file
    (NLQ, MQ and VQ share ``videos[] -> clips[]``)."""
    data, out = load_json(path), []
    if not isinstance(data, dict):
        raise NLQFormatError(f"{path}: expected a JSON object with 'videos'")
    for video in _items(data, "videos", str(path)):
        video_uid = _uid(video, "video_uid", str(path))
        for clip in _items(video, "clips", f"{path} video {video_uid}"):
            where = f"{path} video {video_uid} clip {shown(clip.get('clip_uid'))}"
            out.append((video_uid, _uid(clip, "clip_uid", where), _number(clip, "video_start_sec", where),
                        _number(clip, "video_end_sec", where)))
    return out


def narration_queries(egoclip: str | Path, train: list, exclude: list = ()) -> dict:
    """The NLQ-format file of the narrations inside the clips of ``train`` (NLQ / MQ / VQ files),
    none from a video of ``exclude``; ``"skipped_videos"`` counts the training videos left out so."""
    table = read_egoclip(egoclip)
    rows_of = table.groupby("video_uid", observed=True).indices
    excluded = {video_uid for path in exclude for video_uid, *_ in _clips(path)}
    videos: dict[str, list] = {}
    seen, skipped = set(), set()
    for path in train:
        for video_uid, clip_uid, start, end in _clips(path):
            if video_uid in excluded:
                skipped.add(video_uid)
                continue
            if clip_uid in seen or video_uid not in rows_of:
                continue
            seen.add(clip_uid)
            rows = table.iloc[rows_of[video_uid]]
            rows = rows[(rows.clip_start > start) & (rows.clip_end < end)]
            queries = [{"query": text, "clip_start_sec": a - start, "clip_end_sec": b - start}
                       for text, a, b in zip(rows.clip_text, rows.clip_start, rows.clip_end)]
            if queries:
                videos.setdefault(video_uid, []).append({
                    "clip_uid": clip_uid, "video_start_sec": start, "video_end_sec": end,
                    "annotations": [{"annotation_uid": f"{clip_uid}_narrations", "language_queries": queries}]})
    return {"version": "narrations", "skipped_videos": len(skipped),
            "videos": [{"video_uid": v, "clips": clips} for v, clips in videos.items()]}


def jitter(start: float, end: float, duration: float, generator: torch.Generator | None = None) -> tuple[float, float]:
    """GroundNLQ's temporal jittering: the answer scaled by a factor drawn from 1..10 about a centre
    shifted by up to ``(factor - 1) / 2`` of its length, so the original stays inside; then clamped
    to ``[0, duration]``."""
    length, centre = end - start, (start + end) / 2
    factor = int(torch.randint(1, 11, (1,), generator=generator))
    centre -= float(torch.rand((), generator=generator) * 2 - 1) * (factor - 1) * length / 2
    return max(centre - factor * length / 2, 0.0), min(centre + factor * length / 2, duration)
