"""EPIC-Kitchens-100 multi-instance retrieval, zero-shot: the annotation readers, the relevancy
matrix (read safely from the distributed pickle, or built from the CSVs), the official metric
and the evaluation (docs/zero-shot.md).

The similarity matrix has one row per clip of ``EPIC_100_retrieval_test.csv`` and one column per
row of ``EPIC_100_retrieval_test_sentence.csv``, whose text is the test CSV's narration of the
clip with that ``narration_id`` (the sentence file's own last rows are shifted by one).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from svitt_ego.atomic import atomic_write, atomic_write_text
from svitt_ego.config import Config, ConfigError
from svitt_ego.data.errors import MetadataError, checked_id
from svitt_ego.data.video import VideoReadError, read_frames_by_index
from svitt_ego.device import pick_device
from svitt_ego.distributed import is_main, setup_distributed
from svitt_ego.models.loading import load_for_eval
from svitt_ego.models import SViTTEgo
from svitt_ego.untrusted import shown
from svitt_ego.eval.embed import embed_clips, embed_texts, expected_random_ap, read_csv_rows, segment_frame_ids

TEST_CSV = "EPIC_100_retrieval_test.csv"
SENTENCE_CSV = "EPIC_100_retrieval_test_sentence.csv"
RELEVANCY_PKL = "caption_relevancy_EPIC_100_retrieval_test.pkl"
TEST_COLUMNS = ("narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                "noun_class", "all_nouns", "all_noun_classes")
# The float64 [clips, columns] matrices build_relevancy holds at its peak.
RELEVANCY_BUILD_MATRICES = 4
SCORE_KEYS = ("mAP V->T", "mAP T->V", "mAP avg", "nDCG V->T", "nDCG T->V", "nDCG avg")
# EgoVLP's rgb_frames layout: <frames_root>/<video_id>/frame_0000000001.jpg
FRAME_NAME = "frame_{:010d}.jpg"
PROTOCOLS = {"videos": "the video files, by timestamps at each file's own frame rate (LaViLa's protocol)",
             "frames": "the JPEG frames, by the CSV's frame numbers (EgoVLP's protocol)"}
_TIMESTAMP = re.compile(r"(\d{1,2}):(\d{2}):(\d{2}(?:\.\d+)?)")
_CLASS_LIST = re.compile(r"\[\s*\d{1,6}(?:\s*,\s*\d{1,6})*\s*\]")


# ---------------------------------------------------------------- the metric

def _checked(similarity, relevancy) -> tuple[np.ndarray, np.ndarray]:
    similarity, relevancy = np.asarray(similarity, dtype=np.float64), np.asarray(relevancy, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape != relevancy.shape:
        raise ValueError(f"expected similarity and relevancy of the same shape [videos, texts], got "
                         f"{similarity.shape} and {relevancy.shape}")
    if not np.isfinite(similarity).all():
        raise ValueError("similarity holds NaN or infinite values")
    if not ((relevancy >= 0) & (relevancy <= 1)).all():
        raise ValueError("relevancy must lie in [0, 1]")
    return similarity, relevancy


def _queries_without(mask: np.ndarray, what: str, direction: str) -> None:
    missing = np.flatnonzero(~mask.any(axis=1))
    if missing.size:
        listed = ", ".join(map(str, missing[:10])) + (", ..." if missing.size > 10 else "")
        raise ValueError(f"{direction}: {missing.size} queries have no {what} (indices {listed})")


def mean_average_precision(similarity: np.ndarray, relevancy: np.ndarray, direction: str = "V->T") -> float:
    """The official EK-100 MIR mAP of the rows as queries (JPoSE ``calculate_mAP``).

    Items are ranked by descending similarity, ties in index order. Only cells exactly 1 are
    positives, but the precision at a positive's rank sums the graded relevancy above it:
    ``AP_i = sum over positives at rank r of (sum_{s <= r} rel_s / r) / #positives``.
    """
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranked = np.take_along_axis(relevancy, order, axis=1)
    positive = ranked == 1
    _queries_without(positive, "item of relevancy 1", direction)
    precision = np.cumsum(ranked, axis=1) / np.arange(1, ranked.shape[1] + 1)
    return float(np.mean(np.sum(np.where(positive, precision, 0.0), axis=1) / positive.sum(axis=1)))


def normalised_dcg(similarity: np.ndarray, relevancy: np.ndarray, direction: str = "V->T") -> float:
    """The official EK-100 MIR nDCG of the rows as queries (JPoSE ``calculate_nDCG``).

    Items are ranked by descending similarity, ties in reverse index order (the official code
    reverses an ascending sort); each query counts its first ``k_i`` ranks, ``k_i`` = its number of
    items with relevancy > 0, discounted by ``log2(r + 1)``, over the same sum for the ideal order.
    """
    order = np.argsort(similarity, axis=1, kind="stable")[:, ::-1]
    ideal = np.sort(relevancy, axis=1)[:, ::-1]
    counted = ideal > 0
    _queries_without(counted, "item of relevancy > 0", direction)
    discount = np.log2(np.arange(relevancy.shape[1]) + 2)
    dcg = np.sum(np.take_along_axis(relevancy, order, axis=1) * counted / discount, axis=1)
    return float(np.mean(dcg / np.sum(ideal * counted / discount, axis=1)))


def epic_mir_scores(similarity, relevancy) -> dict[str, float]:
    """mAP and nDCG in percent, video -> text (rows as queries), text -> video (columns) and their mean.

    Args:
        similarity: [videos, texts] scores, e.g. the cosine of the embeddings.
        relevancy: [videos, texts] relevancy in [0, 1]; every row and column needs a cell of 1.
    """
    similarity, relevancy = _checked(similarity, relevancy)
    map_vt = mean_average_precision(similarity, relevancy, "V->T")
    map_tv = mean_average_precision(similarity.T, relevancy.T, "T->V")
    ndcg_vt = normalised_dcg(similarity, relevancy, "V->T")
    ndcg_tv = normalised_dcg(similarity.T, relevancy.T, "T->V")
    return {"mAP V->T": 100 * map_vt, "mAP T->V": 100 * map_tv, "mAP avg": 100 * (map_vt + map_tv) / 2,
            "nDCG V->T": 100 * ndcg_vt, "nDCG T->V": 100 * ndcg_tv, "nDCG avg": 100 * (ndcg_vt + ndcg_tv) / 2}


def chance_scores(relevancy) -> dict[str, float]:
    """The expected :func:`epic_mir_scores` of a uniformly random similarity (exact, not sampled)."""
    relevancy = np.asarray(relevancy, dtype=np.float64)

    def expected_map(rel: np.ndarray) -> float:
        return float(np.mean(expected_random_ap(rel.shape[1], rel.sum(axis=1))))

    def expected_ndcg(rel: np.ndarray) -> float:
        # Any rank holds each item with the same probability: E[DCG] = mean relevance x the discounts.
        ideal = np.sort(rel, axis=1)[:, ::-1]
        counted = ideal > 0
        discount = np.log2(np.arange(rel.shape[1]) + 2)
        dcg = rel.mean(axis=1) * np.sum(counted / discount, axis=1)
        return float(np.mean(dcg / np.sum(ideal * counted / discount, axis=1)))

    map_vt, map_tv = expected_map(relevancy), expected_map(relevancy.T)
    ndcg_vt, ndcg_tv = expected_ndcg(relevancy), expected_ndcg(relevancy.T)
    return {"mAP V->T": 100 * map_vt, "mAP T->V": 100 * map_tv, "mAP avg": 100 * (map_vt + map_tv) / 2,
            "nDCG V->T": 100 * ndcg_vt, "nDCG T->V": 100 * ndcg_tv, "nDCG avg": 100 * (ndcg_vt + ndcg_tv) / 2}


# ---------------------------------------------------------------- the annotations

@dataclass(frozen=True)
class MIRClip:
    """One row of ``EPIC_100_retrieval_test.csv``."""

    narration_id: str
    participant_id: str
    video_id: str
    start: float  # seconds
    stop: float
    start_frame: int
    stop_frame: int
    narration: str
    verb_class: int
    noun_classes: tuple[int, ...]


@dataclass(frozen=True)
class MIRAnnotations:
    """The test clips (the rows) and, for each column, the index of the clip whose narration it is."""

    clips: list[MIRClip]
    columns: list[int]

    @property
    def texts(self) -> list[str]:
        return [self.clips[j].narration for j in self.columns]


def _field(where: str, name: str, value: str, parse, rule: str):
    try:
        return parse(value)
    except (ValueError, OverflowError):
        raise MetadataError(f"{where}, field '{name}': expected {rule}, got {shown(value)}") from None


def _seconds(value: str) -> float:
    match = _TIMESTAMP.fullmatch(value.strip())
    if match is None:
        raise ValueError(value)
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _class_list(value: str) -> tuple[int, ...]:
    if _CLASS_LIST.fullmatch(value.strip()) is None:
        raise ValueError(value)
    return tuple(int(v) for v in value.strip()[1:-1].split(","))


def _natural(value: str) -> int:
    if not value.strip().isdigit() or len(value.strip()) > 9:
        raise ValueError(value)
    return int(value)


def mir_clip(path: Path, line: int, row: dict) -> MIRClip:
    """One row of an EK-100 MIR CSV (``path``, ``line``) as a clip, every field checked."""
    where = f"{path}, line {line}"
    for name in ("participant_id", "video_id"):
        checked_id(row[name], f"{where}, field '{name}'")
    if not row["narration_id"] or not row["narration"].strip():
        raise MetadataError(f"{where}, field '{'narration_id' if not row['narration_id'] else 'narration'}': empty")
    start, stop = (_field(where, name, row[name], _seconds, "a time HH:MM:SS.ss")
                   for name in ("start_timestamp", "stop_timestamp"))
    start_frame, stop_frame = (_field(where, name, row[name], _natural, "a frame number")
                               for name in ("start_frame", "stop_frame"))
    if stop <= start:
        raise MetadataError(f"{where}, field 'stop_timestamp': {row['stop_timestamp']} is not after "
                            f"start_timestamp {row['start_timestamp']}")
    if stop_frame <= start_frame:
        raise MetadataError(f"{where}, field 'stop_frame': {stop_frame} is not after start_frame {start_frame}")
    return MIRClip(row["narration_id"], row["participant_id"], row["video_id"], start, stop, start_frame,
                   stop_frame, row["narration"], _field(where, "verb_class", row["verb_class"], _natural, "a class id"),
                   _field(where, "all_noun_classes", row["all_noun_classes"], _class_list,
                          "a list of class ids such as [3, 13]"))


def read_mir_annotations(folder: str | Path) -> MIRAnnotations:
    """Read ``EPIC_100_retrieval_test.csv`` and ``EPIC_100_retrieval_test_sentence.csv`` from ``folder``.
    A missing file or a malformed row raises :class:`MetadataError` naming the file, line and field."""
    folder = Path(folder)
    test, sentences = folder / TEST_CSV, folder / SENTENCE_CSV
    clips, row_of = [], {}
    for line, row in read_csv_rows(test, TEST_COLUMNS):
        clip = mir_clip(test, line, row)
        if clip.narration_id in row_of:
            raise MetadataError(f"{test}, line {line}, field 'narration_id': {shown(clip.narration_id)} repeats "
                                f"the clip of row {row_of[clip.narration_id] + 1}")
        row_of[clip.narration_id] = len(clips)
        clips.append(clip)
    if not clips:
        raise MetadataError(f"{test}: holds no clips")
    columns = []
    for line, row in read_csv_rows(sentences, ("narration_id",)):
        if row["narration_id"] not in row_of:
            raise MetadataError(f"{sentences}, line {line}, field 'narration_id': {shown(row['narration_id'])} "
                                f"is not a clip of {test.name}")
        columns.append(row_of[row["narration_id"]])
    if not columns:
        raise MetadataError(f"{sentences}: holds no sentences")
    return MIRAnnotations(clips, columns)


# ---------------------------------------------------------------- the relevancy matrix

def physical_memory() -> int:
    """This machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_relevancy_fits(clips: int, columns: int) -> None:
    """Refuse, in one line saying what it would need, a relevancy matrix larger than this machine's memory
    can build (:func:`build_relevancy` holds about ``RELEVANCY_BUILD_MATRICES`` float64 matrices at once)."""
    need, have = RELEVANCY_BUILD_MATRICES * 8 * clips * columns, physical_memory()
    if need > have:
        raise MetadataError(f"the relevancy matrix of {clips} clips x {columns} sentences needs about "
                            f"{need / 2**30:.1f} GiB of memory to build, more than this machine's "
                            f"{have / 2**30:.1f} GiB")


def build_relevancy(annotations: MIRAnnotations) -> np.ndarray:
    """The JPoSE relevancy [clips, columns] (float64): (verb match + IoU of the noun-class sets) / 2,
    column j taking the classes of its own clip."""
    check_relevancy_fits(len(annotations.clips), len(annotations.columns))
    clips = annotations.clips
    nouns = sorted({n for clip in clips for n in clip.noun_classes})
    position = {n: i for i, n in enumerate(nouns)}
    multi_hot = np.zeros((len(clips), len(nouns)), dtype=np.float32)
    for i, clip in enumerate(clips):
        multi_hot[i, [position[n] for n in clip.noun_classes]] = 1
    columns = np.asarray(annotations.columns)
    intersection = (multi_hot @ multi_hot[columns].T).astype(np.float64)  # small counts: exact in float32
    sizes = multi_hot.sum(axis=1).astype(np.float64)
    noun_iou = intersection / (sizes[:, None] + sizes[columns][None, :] - intersection)
    verbs = np.asarray([clip.verb_class for clip in clips])
    return ((verbs[:, None] == verbs[columns][None, :]).astype(np.float64) + noun_iou) / 2


def _array_globals() -> dict[tuple[str, str], object]:
    """What a pickled numpy array names (numpy 1 and numpy 2 module paths), and nothing else."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    from_buffer = np.zeros(1).__reduce_ex__(5)[0]

    def empty_array(subtype, shape, dtype):
        """NumPy pickles an array as an empty one that its state then fills: a shape here would be
        allocated before anything is checked (40 bytes of pickle can ask for 10^12 elements)."""
        if shape != (0,):
            raise pickle.UnpicklingError(f"an array pickle starts from an empty array, not one of shape {shown(shape)}")
        return reconstruct(subtype, shape, dtype)

    def latin1(text, encoding="latin1"):
        """``_codecs.encode`` as NumPy's pickles use it (an array's bytes as latin-1 text), and no other codec."""
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise pickle.UnpicklingError(f"refusing the codec {shown(encoding)} (an array pickle uses latin1)")
        return codecs.encode(text, "latin1")

    allowed = {("_codecs", "encode"): latin1, ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = empty_array
        allowed[(f"{package}.numeric", "_frombuffer")] = from_buffer
    return allowed


_ARRAY_GLOBALS = _array_globals()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles a numpy array and nothing else: any other global is refused before it is called."""

    def find_class(self, module: str, name: str):
        allowed = _ARRAY_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only a numpy array is allowed)")
        return allowed


def load_relevancy(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The relevancy matrix from the distributed ``.pkl`` (unpickled allowing only a numpy array) or
    an ``.npy`` file (no pickles; mapped, so that its shape is checked before it is read); ``shape``,
    when given, is the [clips, columns] of the CSVs."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such relevancy file")
    try:
        if path.suffix == ".npy":
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with path.open("rb") as file:
                matrix = _ArrayUnpickler(file).load()
    except Exception as err:  # whatever a crafted file makes the unpickler or NumPy raise
        raise MetadataError(f"{path}: not a relevancy matrix: {type(err).__name__}: {err}") from None
    if not isinstance(matrix, np.ndarray) or matrix.ndim != 2 or matrix.dtype.kind not in "fiu":
        raise MetadataError(f"{path}: expected a 2-D numeric numpy array, got "
                            f"{getattr(matrix, 'shape', type(matrix).__name__)}")
    if shape is not None and matrix.shape != tuple(shape):
        raise MetadataError(f"{path}: the relevancy matrix is {matrix.shape[0]} x {matrix.shape[1]} but the "
                            f"annotations have {shape[0]} clips x {shape[1]} sentences")
    return np.array(matrix, dtype=np.float64)  # read (from a mapped .npy) only now


def write_relevancy(annotations_folder: str | Path, out: str | Path, compare: str | Path | None = None) -> dict:
    """``svitt-ego epic-mir-relevancy``: build the matrix from the CSVs, write it as ``.npy``; with
    ``compare``, report its largest difference from a distributed matrix."""
    if Path(out).suffix != ".npy":
        raise ConfigError(f"--output {out}: the relevancy matrix is written as .npy (no pickle)", "--output")
    matrix = build_relevancy(read_mir_annotations(annotations_folder))

    def save(tmp: Path) -> None:
        with tmp.open("wb") as file:
            np.save(file, matrix, allow_pickle=False)

    atomic_write(out, save)
    summary = {"shape": list(matrix.shape), "out": str(out)}
    print(f"wrote the {matrix.shape[0]} x {matrix.shape[1]} relevancy matrix to {out}")
    if compare is not None:
        difference = float(np.abs(load_relevancy(compare, matrix.shape) - matrix).max())
        summary["max_difference"] = difference
        print(f"largest difference from {compare}: {difference:.3g}")
    return summary


# ---------------------------------------------------------------- the evaluation

def video_path(videos: Path, clip: MIRClip) -> Path:
    """``<videos>/<participant_id>/<video_id>.MP4`` (or ``.mp4``), as EPIC-Kitchens distributes them."""
    upper, lower = (videos / clip.participant_id / f"{clip.video_id}.{ext}" for ext in ("MP4", "mp4"))
    return lower if lower.is_file() and not upper.is_file() else upper


class ClipReader:
    """A clip's uint8 frames ``[T, H, W, 3]`` in one of :data:`PROTOCOLS`:

    - ``videos``: frames ``round(start x fps)`` to ``ceil(stop x fps)`` of the video file at its own
      frame rate, the middle of each of ``num_frames`` segments (LaViLa's rounding);
    - ``frames``: the JPEGs ``<root>/<video_id>/frame_%010d.jpg`` numbered by the CSV's frames, the
      middle of each segment as EgoVLP takes it.
    """

    def __init__(self, root: str | Path, protocol: str, num_frames: int):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.root, self.protocol, self.num_frames = Path(root), protocol, num_frames

    def __call__(self, clip: MIRClip) -> torch.Tensor:
        if self.protocol == "videos":
            return read_frames_by_index(video_path(self.root, clip), lambda fps: segment_frame_ids(
                round(clip.start * fps), math.ceil(clip.stop * fps), self.num_frames))
        edges = np.linspace(clip.start_frame, clip.stop_frame, self.num_frames + 1).astype(np.int64)
        frames = [self._jpeg(clip, int(i)) for i in (edges[:-1] + edges[1:] - 1) // 2]
        if len({frame.shape for frame in frames}) > 1:
            raise VideoReadError(f"{self.root / clip.video_id}: the frames of clip {clip.narration_id} differ in size "
                                 f"({sorted({frame.shape for frame in frames})})")
        return torch.from_numpy(np.stack(frames))

    def _jpeg(self, clip: MIRClip, index: int) -> np.ndarray:
        path = self.root / clip.video_id / FRAME_NAME.format(index)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except FileNotFoundError:
            raise VideoReadError(f"{path}: no such frame (clip {clip.narration_id})") from None
        except (OSError, Image.DecompressionBombError, ValueError) as err:  # a bomb: a 14000 x 14000 frame
            raise VideoReadError(f"{path}: cannot decode: {err} (clip {clip.narration_id})") from None


def evaluate_epic_mir(model: SViTTEgo, cfg: Config, device: torch.device, annotations: MIRAnnotations,
                      relevancy: np.ndarray, reader: ClipReader, batch_size: int = 32,
                      on_error: str = "fail") -> dict:
    """:func:`epic_mir_scores` of ``model``'s cosine similarities; every process returns the result.

    Clips left out by ``on_error="skip"`` lose their rows; texts left without a clip of relevancy 1
    lose their columns (both counted in the result, which is then not comparable with published figures).
    """
    videos, skipped = embed_clips(model, annotations.clips, reader, cfg, device, batch_size, on_error, "EK-100 MIR")
    texts = embed_texts(model, annotations.texts, cfg, device)
    rows = np.asarray([i not in skipped for i in range(len(annotations.clips))])
    kept_relevancy = relevancy[rows]
    columns = (kept_relevancy == 1).any(axis=0)
    similarity = (videos[torch.from_numpy(rows)] @ texts[torch.from_numpy(columns)].T).double().numpy()
    scores = epic_mir_scores(similarity, kept_relevancy[:, columns])
    return {**scores, "clips": int(rows.sum()), "texts": int(columns.sum()), "skipped_clips": len(skipped),
            "dropped_texts": int((~columns).sum()), "skipped": list(skipped.values())}


def format_epic_mir(rows: dict[str, dict]) -> str:
    """A table of mAP and nDCG (V->T, T->V, avg), one row per named result."""
    lines = [f"{'EK-100 MIR':16s}" + "".join(f"{key:>11s}" for key in SCORE_KEYS)]
    lines += [f"{name:16s}" + "".join(f"{r[key]:>11.1f}" for key in SCORE_KEYS) for name, r in rows.items()]
    return "\n".join(lines)


def run_epic_mir(checkpoint: str | Path, annotations: str | Path, videos: str | Path | None = None,
                 frames_root: str | Path | None = None, relevancy: str | Path | None = None, num_frames: int = 4,
                 batch_size: int = 32, on_error: str = "fail", workers: int = 4,
                 output: str | Path | None = None, device: str | None = None) -> dict:
    """``svitt-ego eval-epic-mir``: evaluate, print the table, optionally write JSON."""
    if (videos is None) == (frames_root is None):
        raise ValueError("give exactly one of videos and frames_root")
    protocol = "videos" if videos is not None else "frames"
    _, _, device = setup_distributed(pick_device(device))
    mir = read_mir_annotations(annotations)
    shape = (len(mir.clips), len(mir.columns))
    matrix = build_relevancy(mir) if relevancy is None else load_relevancy(relevancy, shape)
    model, cfg = load_for_eval(checkpoint, overrides=[f"model.vision.num_frames={num_frames}",
                                                                   f"data.num_workers={workers}"])
    reader = ClipReader(videos if videos is not None else frames_root, protocol, num_frames)
    result = evaluate_epic_mir(model.to(device), cfg, device, mir, matrix, reader, batch_size, on_error)
    result = {"checkpoint": str(checkpoint), "protocol": protocol, "num_frames": num_frames,
              "relevancy": str(relevancy) if relevancy is not None else "built from the CSVs", **result}
    if is_main():
        print(f"EK-100 MIR, zero-shot, {num_frames} frames from {PROTOCOLS[protocol]}; relevancy "
              f"{result['relevancy']}")
        print(format_epic_mir({"score (%)": result}))
        print(f"{result['clips']} clips x {result['texts']} texts"
              + (f"; {result['skipped_clips']} clips skipped and {result['dropped_texts']} texts dropped "
                 "(not comparable with published figures)" if result["skipped_clips"] else ""))
        if output is not None:
            atomic_write_text(output, json.dumps(result, indent=2, allow_nan=False))
    return result
