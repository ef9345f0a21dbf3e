"""Charades-Ego action recognition, zero-shot: the annotation readers, the mAP of the reference
code and the evaluation (docs/zero-shot.md).

Each test video is one clip of ``num_frames`` frames spread over the whole video; a class's score
is the cosine of the clip's embedding and the embedding of the class name (no template, no softmax).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from svitt_ego.atomic import atomic_write_text
from svitt_ego.config import Config
from svitt_ego.data.errors import MetadataError, checked_id
from svitt_ego.data.video import read_frames_by_index
from svitt_ego.device import pick_device
from svitt_ego.distributed import is_main, setup_distributed
from svitt_ego.models.loading import load_for_eval
from svitt_ego.models import SViTTEgo
from svitt_ego.untrusted import shown
from svitt_ego.eval.embed import embed_clips, embed_texts, expected_random_ap, read_csv_rows, segment_frame_ids

TEST_CSV = "CharadesEgo_v1_test_only1st.csv"
CLASSES_TXT = "Charades_v1_classes.txt"
_CLASS_LINE = re.compile(r"(c\d{3}) (\S.*)")
_ACTION = re.compile(r"(c\d{3}) (\d+(?:\.\d*)?) (\d+(?:\.\d*)?)")


def _class_list(indices: np.ndarray, class_names) -> str:
    names = [class_names[i] if class_names is not None else str(i) for i in indices]
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")


def charades_ego_map(scores, labels, class_names=None) -> float:
    """The Charades-Ego mAP in percent (EgoVLP's and LaViLa's ``charades_map``).

    Videos without a label are dropped; per class, the non-interpolated AP of the videos ranked by
    descending score (ties in index order), then the mean over classes. A class without a positive
    video is an error that names it (``class_names[i]``, else its index), never a NaN.

    Args:
        scores: [videos, classes] scores.
        labels: [videos, classes] multi-hot (1 where the video shows the class).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"expected scores and labels of the same shape [videos, classes], got {scores.shape} "
                         f"and {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    labelled = labels.any(axis=1)
    scores, positive = scores[labelled], labels[labelled] == 1
    empty = np.flatnonzero(~positive.any(axis=0))
    if empty.size:
        raise ValueError(f"{empty.size} classes have no positive video: {_class_list(empty, class_names)}")
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(positive, order, axis=0)
    precision = np.cumsum(ranked, axis=0) / np.arange(1, len(ranked) + 1)[:, None]
    return float(100 * np.mean(np.sum(np.where(ranked, precision, 0.0), axis=0) / ranked.sum(axis=0)))


def chance_map(labels) -> float:
    """The expected :func:`charades_ego_map` of uniformly random scores (exact, not sampled)."""
    labels = np.asarray(labels)
    labels = labels[labels.any(axis=1)]
    return float(100 * np.mean(expected_random_ap(len(labels), labels.sum(axis=0))))


# ---------------------------------------------------------------- the annotations

@dataclass(frozen=True)
class CharadesVideo:
    video_id: str
    length: float  # seconds
    classes: tuple[int, ...]  # indices into the class list
    segments: tuple[tuple[int, float, float], ...] = ()  # (class, start, end seconds) of each action


@dataclass(frozen=True)
class CharadesAnnotations:
    class_ids: list[str]  # "c000", ...
    class_names: list[str]  # the text prompts
    videos: list[CharadesVideo]

    def labels(self) -> np.ndarray:
        """The multi-hot [videos, classes] (int64)."""
        labels = np.zeros((len(self.videos), len(self.class_ids)), dtype=np.int64)
        for i, video in enumerate(self.videos):
            labels[i, list(video.classes)] = 1
        return labels


def read_classes(path: Path) -> tuple[list[str], list[str]]:
    """The class ids and names of ``Charades_v1_classes.txt`` (``cNNN name`` per line)."""
    if not path.is_file():
        raise MetadataError(f"{path}: no such class list")
    ids, names = [], []
    for line, text in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        match = _CLASS_LINE.fullmatch(text.strip())
        if match is None:
            raise MetadataError(f"{path}, line {line}: expected 'cNNN class name', got {shown(text)}")
        if match[1] in ids:
            raise MetadataError(f"{path}, line {line}: class {match[1]} repeats")
        ids.append(match[1])
        names.append(match[2])
    if not ids:
        raise MetadataError(f"{path}: holds no classes")
    return ids, names


def read_charades_annotations(folder: str | Path, split_csv: str = TEST_CSV) -> CharadesAnnotations:
    """Read ``split_csv`` (by default ``CharadesEgo_v1_test_only1st.csv``) and ``Charades_v1_classes.txt``
    from ``folder``. A missing file or a malformed row raises :class:`MetadataError` naming the file, line
    and field."""
    folder = Path(folder)
    test = folder / split_csv
    class_ids, class_names = read_classes(folder / CLASSES_TXT)
    index = {c: i for i, c in enumerate(class_ids)}
    videos = []
    for line, row in read_csv_rows(test, ("id", "actions", "length")):
        where = f"{test}, line {line}"
        checked_id(row["id"], f"{where}, field 'id'")
        try:
            length = float(row["length"])
        except ValueError:
            length = float("nan")
        if not 0 < length < float("inf"):
            raise MetadataError(f"{where}, field 'length': expected a positive number of seconds, "
                                f"got {shown(row['length'])}")
        segments = []
        for action in filter(None, row["actions"].split(";")):
            match = _ACTION.fullmatch(action.strip())
            if match is None or match[1] not in index:
                raise MetadataError(f"{where}, field 'actions': expected 'cNNN start end' of a class of "
                                    f"{CLASSES_TXT}, got {shown(action)}")
            segments.append((index[match[1]], float(match[2]), float(match[3])))
        videos.append(CharadesVideo(row["id"], length, tuple(sorted({c for c, _, _ in segments})), tuple(segments)))
    if not videos:
        raise MetadataError(f"{test}: holds no videos")
    return CharadesAnnotations(class_ids, class_names, videos)


# ---------------------------------------------------------------- the evaluation

class VideoReader:
    """``num_frames`` uint8 frames ``[T, H, W, 3]`` of ``<root>/<id>.mp4``, the middle of each of
    ``num_frames`` segments of the whole video (LaViLa's rounding, frames ``0`` to ``length x fps``)."""

    def __init__(self, root: str | Path, num_frames: int):
        self.root, self.num_frames = Path(root), num_frames

    def __call__(self, video: CharadesVideo) -> torch.Tensor:
        return read_frames_by_index(self.root / f"{video.video_id}.mp4",
                                    lambda fps: segment_frame_ids(0, float(fps) * video.length, self.num_frames))


def evaluate_charades_ego(model: SViTTEgo, cfg: Config, device: torch.device, annotations: CharadesAnnotations,
                          reader: VideoReader, batch_size: int = 16, on_error: str = "fail",
                          source: str = TEST_CSV) -> dict:
    """:func:`charades_ego_map` of ``model``'s cosine scores; every process returns the result.
    Videos left out by ``on_error="skip"`` are dropped (counted in the result)."""
    videos, skipped = embed_clips(model, annotations.videos, reader, cfg, device, batch_size, on_error,
                                  "Charades-Ego")
    texts = embed_texts(model, annotations.class_names, cfg, device)
    kept = np.asarray([i not in skipped for i in range(len(annotations.videos))])
    labels = annotations.labels()[kept]
    scores = (videos[torch.from_numpy(kept)] @ texts.T).double().numpy()
    try:
        value = charades_ego_map(scores, labels, annotations.class_names)
    except ValueError as err:
        raise MetadataError(f"{source}: {err}") from None
    return {"mAP": value, "videos": int(labels.any(axis=1).sum()), "unlabelled": int((~labels.any(axis=1)).sum()),
            "classes": len(annotations.class_ids), "skipped_videos": len(skipped), "skipped": list(skipped.values())}


def run_charades_ego(checkpoint: str | Path, annotations: str | Path, videos: str | Path, num_frames: int = 16,
                     batch_size: int = 16, on_error: str = "fail", workers: int = 4,
                     output: str | Path | None = None, device: str | None = None) -> dict:
    """``svitt-ego eval-charades-ego``: evaluate on ``device`` (:func:`pick_device`), print the table,
    optionally write JSON."""
    _, _, device = setup_distributed(pick_device(device))
    charades = read_charades_annotations(annotations)
    model, cfg = load_for_eval(checkpoint, overrides=[f"model.vision.num_frames={num_frames}",
                                                                   f"data.num_workers={workers}"])
    result = evaluate_charades_ego(model.to(device), cfg, device, charades, VideoReader(videos, num_frames),
                                   batch_size, on_error, str(Path(annotations) / TEST_CSV))
    result = {"checkpoint": str(checkpoint), "num_frames": num_frames, **result}
    if is_main():
        print(f"Charades-Ego, zero-shot, one clip of {num_frames} frames per video")
        print(f"{'Charades-Ego':16s}{'mAP':>8s}{'videos':>8s}{'classes':>8s}")
        print(f"{'score (%)':16s}{result['mAP']:>8.1f}{result['videos']:>8d}{result['classes']:>8d}")
        print(f"{result['unlabelled']} videos without a label dropped"
              + (f"; {result['skipped_videos']} videos skipped (not comparable with published figures)"
                 if result["skipped_videos"] else ""))
        if output is not None:
            atomic_write_text(output, json.dumps(result, indent=2, allow_nan=False))
    return result
