"""``svitt-ego export-nlq-features DIR --to groundnlq OUT``: a features folder as GroundNLQ's inputs.

GroundNLQ (``libs/datasets/ego4d_loader.py``) reads two lmdb databases of npz values,
``clip_uid -> {"features": [T, D]}`` and ``<annotation_uid>_<query_idx> -> {"token_features":
[L, C]}``, one jsonl per split and a config with one ``default_fps`` for every clip. Written
under OUT:

| path | content |
|---|---|
| ``video_features/data.mdb`` | clip_uid -> npz ``features`` float32 [T, D] |
| ``text_features/data.mdb`` | ``<annotation_uid>_<query_idx>`` -> npz ``token_features`` float32 [L, C] |
| ``<annotation file stem>.jsonl`` | ``query_id``, ``video_id`` (clip_uid), ``duration``, ``query``, ``query_type`` "nlq", ``timestamps`` [[start, end]] when answered |
| ``groundnlq_dataset.yaml`` | ``input_vid_dim``, ``input_txt_dim``, ``feat_stride``, ``num_frames``, ``default_fps``, ``max_seq_len`` |

OUT is a new or empty folder, or one an earlier export made (its marker,
:func:`svitt_ego.run_folder.marker`), which is then emptied first: an export never mixes with another's
files. Everything is checked before OUT is touched.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from svitt_ego.atomic import atomic_write, atomic_write_text
from svitt_ego.nlq.annotations import NLQFormatError, NLQQuery, read_nlq
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.run_folder import run_folder

COMMAND = "export-nlq-features"


def _npz(**arrays: np.ndarray) -> bytes:
    with io.BytesIO() as buffer:
        np.savez(buffer, **arrays)
        return buffer.getvalue()


def _write_lmdb(path: Path, items: dict[str, bytes]) -> None:
    """An lmdb database of ``items`` as ``path/data.mdb``, written atomically."""
    import lmdb

    def write(tmp: Path) -> None:
        size = 2 * sum(len(k) + len(v) + 64 for k, v in items.items()) + 2 ** 20
        env = lmdb.open(str(tmp), subdir=False, lock=False, map_size=size)
        with env.begin(write=True) as txn:
            for key, value in items.items():
                txn.put(key.encode(), value)
        env.close()

    atomic_write(path / "data.mdb", write)


def _query_key(query: NLQQuery) -> str:
    return f"{query.annotation_uid}_{query.query_idx}"


def export_groundnlq(features_dir: str | Path, annotation_files: list, out: str | Path) -> dict:
    """Write GroundNLQ's inputs for the queries of ``annotation_files``; returns the config values."""
    features, out = NLQFeatures(features_dir), Path(out)
    _refuse_shared_stems(annotation_files)
    splits, owner = {}, {}
    for path in annotation_files:
        parsed = read_nlq(path)
        for q in parsed.queries:
            first = owner.setdefault(q.annotation_uid, (q.clip_uid, path))
            if first[0] != q.clip_uid:
                raise NLQFormatError(f"annotation_uid {q.annotation_uid} is under clip {first[0]} ({first[1]}) and "
                                     f"clip {q.clip_uid} ({path}): GroundNLQ's query keys would collide")
        splits[Path(path)] = parsed
    clips = sorted({q.clip_uid for parsed in splits.values() for q in parsed.queries})
    rates = {uid: features.clip(uid)["fps"] for uid in clips}
    if len(set(rates.values())) > 1:
        by_rate = {}
        for uid, fps in rates.items():
            by_rate.setdefault(fps, uid)
        raise NLQFormatError(f"{features_dir}: clips have different frame rates ("
                             + ", ".join(f"{uid} {fps:g} fps" for fps, uid in by_rate.items())
                             + "); GroundNLQ takes one default_fps: extract the features at a fixed --fps")
    longest = max((features.clip(uid)["windows"] for uid in clips), default=1)
    config = {"input_vid_dim": features.manifest["dimension"], "input_txt_dim": features.manifest["text_dimension"],
              "feat_stride": features.stride, "num_frames": features.window,
              "default_fps": next(iter(rates.values()), None), "max_seq_len": 512 * math.ceil(longest / 512)}
    videos = {uid: _npz(features=features.video(uid).float().numpy()) for uid in clips}
    texts = {_query_key(q): _npz(token_features=features.text(q).float().numpy())
             for parsed in splits.values() for q in parsed.queries}
    with run_folder(out, COMMAND, fresh=True):  # new, empty or an earlier export's: emptied
        _write_lmdb(out / "video_features", videos)
        _write_lmdb(out / "text_features", texts)
        for path, parsed in splits.items():
            atomic_write_text(out / f"{path.stem}.jsonl", "".join(json.dumps(item) + "\n" for item in _items(parsed)))
        atomic_write_text(out / "groundnlq_dataset.yaml", "dataset: {\n" + "".join(
            f"  {key}: {value},\n" for key, value in config.items()) + "}\n")
    return config


def _items(parsed) -> list[dict]:
    """The jsonl lines of one annotation file's queries."""
    items = []
    for q in parsed.queries:
        item = {"query_id": _query_key(q), "video_id": q.clip_uid, "duration": parsed.clips[q.clip_uid].duration,
                "query": q.text, "query_type": "nlq"}
        if q.start is not None:
            item["timestamps"] = [[q.start, q.end]]
        items.append(item)
    return items


def _refuse_shared_stems(annotation_files: list) -> None:
    """Each annotation file becomes ``<stem>.jsonl``: two of one stem are refused, naming both."""
    seen: dict[str, Path] = {}
    for path in map(Path, annotation_files):
        first = seen.setdefault(path.stem, path)
        if first != path:
            raise NLQFormatError(f"{first} and {path} would both be written as {path.stem}.jsonl; rename one or "
                                 "export them into separate folders")
