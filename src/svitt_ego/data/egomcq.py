"""EgoMCQ: pick the clip, out of five, that a narration describes (docs/data-formats.md)."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from svitt_ego.config import Config
from svitt_ego.data.errors import MetadataError, checked_id, load_json
from svitt_ego.data.tokenizer import tokenize
from svitt_ego.data.transforms import eval_transform
from svitt_ego.data.video import read_clip_frames
from svitt_ego.untrusted import shown

INTER_VIDEO, INTRA_VIDEO = 1, 2


@dataclass
class Clip:
    """A span of a video in seconds, with its narration (optional for choices)."""

    video_uid: str
    start: float
    end: float
    text: str | None


@dataclass
class MCQQuestion:
    question_id: str
    query: Clip
    choices: list[Clip]
    answer: int
    type: int


def read_egomcq(path: str | Path) -> list[MCQQuestion]:
    """Read ``egomcq.json``. A missing or malformed file raises :class:`MetadataError` naming the
    file, the question and the field."""
    path = Path(path)
    data = load_json(path, what="EgoMCQ file (see data.egomcq)")
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: expected an object of questions keyed by id, got {type(data).__name__}")
    return [_question(qid, entry, f"{path}: question {shown(qid)}") for qid, entry in data.items()]


def _question(qid: str, entry, where: str) -> MCQQuestion:
    if not isinstance(entry, dict):
        raise MetadataError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("query", "choices", "answer", "types"):
        if key not in entry:
            raise MetadataError(f"{where}, field '{key}': missing")
    query = _clip(entry["query"], where, "query", need_text=True)
    choices = entry["choices"]
    if not isinstance(choices, dict) or not choices or set(choices) != {str(i) for i in range(len(choices))}:
        raise MetadataError(f"{where}, field 'choices': expected an object with keys '0'..'n-1', "
                            f"got {shown(choices)}")
    choices = [_clip(choices[str(i)], where, f"choices.{i}", need_text=False) for i in range(len(choices))]
    answer = _integer(entry["answer"], f"{where}, field 'answer'")
    if not 0 <= answer < len(choices):
        raise MetadataError(f"{where}, field 'answer': {shown(answer)} is not a choice (0..{len(choices) - 1})")
    kind = _integer(entry["types"], f"{where}, field 'types'")
    if kind not in (INTER_VIDEO, INTRA_VIDEO):
        raise MetadataError(f"{where}, field 'types': expected 1 (inter-video) or 2 (intra-video), got {shown(kind)}")
    return MCQQuestion(qid, query, choices, answer, kind)


def _clip(row, where: str, name: str, need_text: bool) -> Clip:
    if not isinstance(row, dict):
        raise MetadataError(f"{where}, field '{name}': expected an EgoClip row (an object), got {type(row).__name__}")
    uid = checked_id(row.get("video_uid"), f"{where}, field '{name}.video_uid'")
    start, end = (_number(row.get(key), f"{where}, field '{name}.{key}'") for key in ("clip_start", "clip_end"))
    if end < start:
        raise MetadataError(f"{where}, field '{name}.clip_end': {end} is before clip_start {start}")
    text = row.get("clip_text")
    if need_text and not isinstance(text, str):
        raise MetadataError(f"{where}, field '{name}.clip_text': expected a string, got {shown(text)}")
    return Clip(uid, start, end, text if isinstance(text, str) else None)


def _number(value, where: str) -> float:
    """A finite number, given as a JSON number or a string holding one."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise MetadataError(f"{where}: expected a number, got {shown(value)}")
    return number


def _integer(value, where: str) -> int:
    """A small non-negative integer, given as a JSON integer or a string of ASCII digits."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetadataError(f"{where}: expected an integer, got {shown(value)}")
    return value


def read_eval_clip(cfg: Config, clip: Clip) -> torch.Tensor:
    """A narrated clip's uint8 frames ``[T, H, W, 3]`` as evaluation samples them (the middle of each
    of ``T`` segments; times before the video's start read from 0)."""
    return read_clip_frames(cfg.data.video_root, clip.video_uid, max(clip.start, 0.0), max(clip.end, 0.0),
                            cfg.model.vision.num_frames, "uniform", cfg.data.chunk_seconds)


class EgoMCQDataset(Dataset):
    """One question per item: ``question_id``, ``text`` (the query's narration), ``frames``
    (float ``[num_choices, T, 3, S, S]``, middle-of-segment frames, evaluation transform),
    ``answer`` and ``type`` (1 inter-video, 2 intra-video).

    An unreadable video always raises :class:`VideoReadError`, whatever ``cfg.data.on_error``:
    dropping questions would bias the accuracy.
    """

    def __init__(self, cfg: Config, items: list[MCQQuestion]):
        self.cfg, self.items = cfg, items
        self.transform = eval_transform(cfg.model.vision)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        question = self.items[index]
        frames = torch.stack([self.transform(read_eval_clip(self.cfg, clip)) for clip in question.choices])
        return {"question_id": question.question_id, "text": question.query.text, "frames": frames,
                "answer": question.answer, "type": question.type}


def collate_egomcq(tokenizer, max_length: int):
    """The collate function for :class:`EgoMCQDataset`: ``frames`` ``[B, C, T, 3, S, S]``,
    ``input_ids``/``attention_mask`` ``[B, L]``, ``answer`` and ``type`` ``[B]``, ``question_id``
    (a list of str)."""
    return functools.partial(_collate_egomcq, tokenizer=tokenizer, max_length=max_length)


def _collate_egomcq(items: list[dict], tokenizer, max_length: int) -> dict:
    return {
        "question_id": [item["question_id"] for item in items],
        "frames": torch.stack([item["frames"] for item in items]),
        **tokenize(tokenizer, [item["text"] for item in items], max_length),
        "answer": torch.tensor([item["answer"] for item in items], dtype=torch.long),
        "type": torch.tensor([item["type"] for item in items], dtype=torch.long),
    }
