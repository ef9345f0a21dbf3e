"""Reading Ego4D NLQ annotations (``nlq_{train,val,test_unannotated}.json``, v1 and v2).

``videos[] -> clips[] -> annotations[] -> language_queries[]``. A query is named by
``(clip_uid, annotation_uid, query_idx)``, ``query_idx`` being its index in
``language_queries``: a query whose text is missing or null is skipped (and counted) but keeps
its place in the numbering. Answers are in clip seconds, kept as written (slightly negative
times, -4e-07, and ends up to 0.43 s past ``video_end_sec - video_start_sec`` in the real files):
the official metric scores them so; training clamps its targets to the clip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from svitt_ego.data.errors import MetadataError, checked_id, json_number
from svitt_ego.data.errors import load_json as _load_json
from svitt_ego.untrusted import shown

# The real annotations sometimes carry the annotation tool's label in the text.
_PREFIX = re.compile(r"^\s*query\s*text\s*:\s*", re.IGNORECASE)


class NLQFormatError(MetadataError):
    """Malformed NLQ annotations or submission; the message names the file, the query and the field."""


@dataclass(frozen=True)
class NLQClip:
    clip_uid: str
    video_uid: str
    video_start_sec: float  # where the clip sits in its video
    video_end_sec: float

    @property
    def duration(self) -> float:
        return self.video_end_sec - self.video_start_sec


@dataclass(frozen=True)
class NLQQuery:
    clip_uid: str
    annotation_uid: str
    query_idx: int
    text: str
    start: float | None  # the answer in clip seconds; None in unannotated (test) files
    end: float | None

    @property
    def key(self) -> tuple[str, str, int]:
        return self.clip_uid, self.annotation_uid, self.query_idx


@dataclass
class NLQAnnotations:
    clips: dict[str, NLQClip] = field(default_factory=dict)
    queries: list[NLQQuery] = field(default_factory=list)
    skipped: int = 0  # queries without text


def clean_query(text) -> str | None:
    """The query's text without the tool's "Query Text:" label; None when there is none."""
    if not isinstance(text, str):
        return None
    text = _PREFIX.sub("", text).strip()
    return text or None


def _number(obj: dict, key: str, where: str, required: bool = True) -> float | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    number = json_number(value)
    if number is None:
        raise NLQFormatError(f"{where}: field '{key}' must be a finite number, got {shown(value)}")
    return number


def _items(obj: dict, key: str, where: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise NLQFormatError(f"{where}: field '{key}' must be a list, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise NLQFormatError(f"{where}: {key}[{i}] must be an object, got {type(item).__name__}")
    return value


def _uid(obj: dict, key: str, where: str) -> str:
    """An id that names files of its own (features, checkpoints): never a path."""
    return checked_id(obj.get(key), f"{where}: field '{key}'", NLQFormatError)


def _answer(query: dict, where: str) -> tuple[float | None, float | None]:
    start = _number(query, "clip_start_sec", where, required=False)
    end = _number(query, "clip_end_sec", where, required=False)
    if (start is None) != (end is None):
        missing = "clip_start_sec" if start is None else "clip_end_sec"
        raise NLQFormatError(f"{where}: field '{missing}' is missing while the other end is given")
    if start is None:
        return None, None
    if end < start:
        raise NLQFormatError(f"{where}: field 'clip_end_sec' ({end}) is before 'clip_start_sec' ({start})")
    return start, end


def _read_clip(video_uid: str, clip: dict, where: str, out: NLQAnnotations) -> None:
    clip_uid = _uid(clip, "clip_uid", where)
    where = f"{where} clip {clip_uid}"
    start, end = _number(clip, "video_start_sec", where), _number(clip, "video_end_sec", where)
    if end <= start:
        raise NLQFormatError(f"{where}: field 'video_end_sec' ({end}) is not after 'video_start_sec' ({start})")
    if clip_uid in out.clips:
        raise NLQFormatError(f"{where}: clip_uid appears twice")
    out.clips[clip_uid] = NLQClip(clip_uid, video_uid, max(start, 0.0), end)
    for annotation in _items(clip, "annotations", where):
        annotation_uid = _uid(annotation, "annotation_uid", where)
        for idx, query in enumerate(_items(annotation, "language_queries", f"{where} annotation {annotation_uid}")):
            text = clean_query(query.get("query"))
            if text is None:
                out.skipped += 1
                continue
            q_where = f"{where} annotation {annotation_uid} query {idx}"
            out.queries.append(NLQQuery(clip_uid, annotation_uid, idx, text, *_answer(query, q_where)))


def parse_nlq(data, source: str) -> NLQAnnotations:
    """Clips and queries of an already loaded NLQ file; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise NLQFormatError(f"{source}: expected a JSON object with 'videos', got {type(data).__name__}")
    out = NLQAnnotations()
    for v, video in enumerate(_items(data, "videos", source)):
        uid = _uid(video, "video_uid", f"{source}: videos[{v}]")
        for clip in _items(video, "clips", f"{source} video {uid}"):
            _read_clip(uid, clip, source, out)
    keys = [q.key for q in out.queries]
    if len(set(keys)) != len(keys):
        raise NLQFormatError(f"{source}: a (clip_uid, annotation_uid) pair appears twice")
    return out


def load_json(path: str | Path):
    """An NLQ JSON file (annotations, a submission); a missing or
    malformed one raises :class:`NLQFormatError` naming it."""
    return _load_json(path, NLQFormatError)


def read_nlq(path: str | Path) -> NLQAnnotations:
    return parse_nlq(load_json(path), str(path))
