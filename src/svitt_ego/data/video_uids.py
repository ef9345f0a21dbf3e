"""The Ego4D videos a set of annotation files refers to, so that only those are downloaded and prepared,
and evaluation videos are kept out of pretraining.

Recognised files (docs/data-formats.md): EgoClip's ``egoclip.csv`` (tab-separated, with each video's
duration), EgoMCQ's ``egomcq.json`` (the query's and the choices' videos) and the Ego4D episodic-memory
files of NLQ, Moment Queries and Visual Queries (``{"videos": [{"video_uid": ..., "clips": [...]}]}``, told
apart by what their annotations hold: ``language_queries``, ``labels`` or ``query_sets``). A uid list is a
text file with one video uid per line; blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from svitt_ego.data.egoclip import read_egoclip
from svitt_ego.data.egomcq import read_egomcq
from svitt_ego.data.errors import MetadataError, checked_id, load_json

log = logging.getLogger(__name__)

# The key an episodic-memory annotation holds, by benchmark.
EPISODIC_KINDS = {"language_queries": "NLQ", "labels": "MQ", "query_sets": "VQ"}


@dataclass
class VideoSet:
    """Video uids with the durations (seconds) the files state, and each file's kind."""

    durations: dict[str, float | None] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def uids(self) -> list[str]:
        return sorted(self.durations)

    def add(self, uid: str, duration: float | None = None) -> None:
        if self.durations.get(uid) is None:
            self.durations[uid] = duration


def _json_kind(path: Path, data) -> str:
    """``EgoMCQ``, ``NLQ``, ``MQ`` or ``VQ``; anything else is a :class:`MetadataError`."""
    if isinstance(data, dict) and isinstance(data.get("videos"), list):
        return _episodic_kind(path, data["videos"])
    if isinstance(data, dict) and data and all(isinstance(q, dict) and "choices" in q for q in data.values()):
        return "EgoMCQ"
    raise MetadataError(f"{path}: not an EgoClip, EgoMCQ, NLQ, MQ or VQ file (expected egoclip.csv, an object "
                        "of EgoMCQ questions, or an Ego4D episodic-memory file with a 'videos' list)")


def _episodic_kind(path: Path, videos: list) -> str:
    found = {EPISODIC_KINDS[key] for video in videos if isinstance(video, dict)
             for clip in _list(video.get("clips")) for annotation in _list(clip.get("annotations"))
             if isinstance(annotation, dict) for key in EPISODIC_KINDS if key in annotation}
    if len(found) == 1:
        return found.pop()
    if found:
        raise MetadataError(f"{path}: annotations of several benchmarks in one file ({', '.join(sorted(found))})")
    raise MetadataError(f"{path}: an Ego4D episodic-memory file whose annotations hold none of "
                        f"{', '.join(repr(k) for k in EPISODIC_KINDS)}: cannot tell NLQ, MQ and VQ apart")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def read_videos(path: str | Path) -> tuple[str, dict[str, float | None]]:
    """One file's kind and the videos it refers to, with their durations where the file states them."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such annotation file")
    if path.suffix.lower() in (".csv", ".tsv"):
        table = read_egoclip(path)
        first = table.drop_duplicates("video_uid")
        return "EgoClip", dict(zip(first.video_uid, first.video_dur.astype(float)))
    data = load_json(path, what="annotation file")
    kind = _json_kind(path, data)
    if kind == "EgoMCQ":
        return kind, {clip.video_uid: None for q in read_egomcq(path) for clip in (q.query, *q.choices)}
    return kind, {uid: None for uid in _episodic_uids(path, data["videos"])}


def _episodic_uids(path: Path, videos: list) -> list[str]:
    uids = []
    for i, video in enumerate(videos):
        uids.append(checked_id(video.get("video_uid") if isinstance(video, dict) else None,
                              f"{path}: videos[{i}], field 'video_uid'"))
    return uids


def collect_videos(files, exclude=()) -> VideoSet:
    """The videos of ``files`` less those of ``exclude`` (annotation files or uid lists)."""
    videos = VideoSet()
    for path in files:
        kind, found = read_videos(path)
        videos.kinds[str(path)] = kind
        for uid, duration in found.items():
            videos.add(uid, duration)
    for uid in excluded_uids(exclude):
        videos.durations.pop(uid, None)
    return videos


def excluded_uids(files) -> set[str]:
    """The videos of annotation files or uid lists (a ``.txt`` file is read as a uid list)."""
    uids: set[str] = set()
    for path in map(Path, files):
        uids |= set(read_uid_list(path) if path.suffix.lower() == ".txt" else read_videos(path)[1])
    return uids


def read_uid_list(path: str | Path) -> list[str]:
    """A uid list's uids in file order (each one checked, so none can name a path outside a folder)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MetadataError(f"{path}: cannot read the video uid list: {err}") from None
    uids = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        uids.append(checked_id(line, f"{path}, line {number}"))
    if not uids:
        raise MetadataError(f"{path}: the video uid list is empty")
    return uids


def exclude_videos(table: pd.DataFrame, files) -> pd.DataFrame:
    """EgoClip rows less those of the videos the files refer to (``data.exclude_videos``), logged."""
    if not files:
        return table
    drop = table.video_uid.isin(excluded_uids(files))
    log.info("data.exclude_videos: dropped %d EgoClip rows of %d videos (%s); %d rows remain", int(drop.sum()),
             table.video_uid[drop].nunique(), ", ".join(map(str, files)), int((~drop).sum()))
    return table[~drop].reset_index(drop=True)


def warn_shared_eval_videos(table: pd.DataFrame, egomcq: str | Path, exclude) -> int:
    """Warn once when the EgoMCQ file evaluated on shares videos with the training rows and nothing excludes
    it; returns the number of shared videos (0 when the file is absent or excluded)."""
    egomcq = Path(egomcq)
    if not egomcq.is_file() or any(Path(f).resolve() == egomcq.resolve() for f in exclude):
        return 0
    shared = set(table.video_uid.unique()) & set(read_videos(egomcq)[1])
    if shared:
        log.warning("the EgoMCQ file %s shares %d videos with the pretraining rows (%d rows): its scores are not "
                    "held out; data.exclude_videos=[%s] drops them", egomcq, len(shared),
                    int(table.video_uid.isin(shared).sum()), egomcq)
    return len(shared)
