"""What the zero-shot benchmarks (EK-100 MIR, Charades-Ego) share: CSV rows, frame numbers, clip
embeddings under torchrun, text embeddings, and the expected score of a random ranking.

Every process embeds every ``world_size``-th clip and the embeddings are gathered back into the
benchmark's order, so each clip is counted once, as EgoMCQ's questions are (``egomcq.py``).
A clip whose video cannot be read stops the run (``on_error="fail"``) or is left out and named
(``on_error="skip"``); the benchmark then says how many it left out.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from svitt_ego.config import Config, ConfigError
from svitt_ego.data.errors import MetadataError
from svitt_ego.data.transforms import eval_transform
from svitt_ego.data.video import VideoReadError
from svitt_ego.device import autocast
from svitt_ego.distributed import gather_objects, is_main, rank, world_size
from svitt_ego.models import SViTTEgo

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
TEXT_BATCH = 256


def segment_frame_ids(start_frame: float, end_frame: float, num_frames: int) -> np.ndarray:
    """The middle frame of each of ``num_frames`` equal segments of frames ``[start_frame, end_frame)``,
    rounded as LaViLa's evaluation rounds them (its ``get_frame_ids`` without jitter)."""
    size = (end_frame - start_frame - 1) / num_frames
    edges = np.round(size * np.arange(num_frames + 1)) + start_frame
    starts, ends = edges[:-1].astype(np.int64), np.minimum(edges[1:].astype(np.int64), end_frame)
    return ((starts + ends) // 2).astype(np.int64)


def expected_random_ap(num_items: int, total_relevance: np.ndarray) -> np.ndarray:
    """The expected average precision of a uniformly random ranking of ``num_items`` items, for
    queries whose relevancies sum to ``total_relevance`` (the positives count 1 each).

    A positive at rank ``r`` has precision ``(1 + the relevance of the r - 1 items above it) / r``;
    averaged over the ranks and the items above it, ``(H_n + (S - 1) (n - H_n) / (n - 1)) / n``
    with ``H_n`` the n-th harmonic number, the same for every positive of the query. With binary
    relevance it is the chance level of ordinary AP.
    """
    n = num_items
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    others = (np.asarray(total_relevance, dtype=np.float64) - 1) / (n - 1) if n > 1 else 0.0
    return (harmonic + others * (n - harmonic)) / n


def read_csv_rows(path: Path, columns: tuple[str, ...]):
    """``(line, row)`` of a CSV file with a header holding ``columns``."""
    if not path.is_file():
        raise MetadataError(f"{path}: no such annotation file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise MetadataError(f"{path}: cannot read: {err}") from None
    except UnicodeDecodeError as err:
        raise MetadataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        missing = [name for name in columns if name not in (reader.fieldnames or [])]  # reads the header
        if missing:
            raise MetadataError(f"{path}, line 1: missing column(s) {', '.join(missing)}")
        for row in reader:
            if None in row or None in row.values():
                raise MetadataError(f"{path}, line {reader.line_num}: expected the {len(reader.fieldnames)} "
                                    "fields of the header")
            yield reader.line_num, row
    except csv.Error as err:
        raise MetadataError(f"{path}, line {max(reader.line_num, 1)}: not valid CSV: {err}") from None


class ClipFrames(Dataset):
    """Item ``i``: ``{"index": i, "frames": [T, 3, S, S]}`` (evaluation transform) of ``read(items[i])``,
    or ``{"index": i, "error": message}`` when its video cannot be read."""

    def __init__(self, items: Sequence, read: Callable, cfg: Config):
        self.items, self.read = items, read
        self.transform = eval_transform(cfg.model.vision)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        try:
            return {"index": index, "frames": self.transform(self.read(self.items[index]))}
        except VideoReadError as err:
            return {"index": index, "error": str(err)}


def _collate(items: list[dict]) -> dict:
    read = [item for item in items if "frames" in item]
    return {"index": [item["index"] for item in read],
            "frames": torch.stack([item["frames"] for item in read]) if read else None,
            "errors": {item["index"]: item["error"] for item in items if "error" in item}}


@torch.no_grad()
def embed_clips(model: SViTTEgo, items: Sequence, read: Callable, cfg: Config, device: torch.device,
                batch_size: int, on_error: str, desc: str) -> tuple[torch.Tensor, dict[int, str]]:
    """The L2-normalised video embeddings ``[len(items), D]`` (float32, CPU) of ``read(item)``'s frames,
    batched, with ``train.precision``'s autocast on CUDA, split over the torchrun processes.

    Returns the embeddings (rows of unreadable clips are NaN) and ``{index: message}`` of those clips;
    with ``on_error="fail"`` the first one raises :class:`VideoReadError` (on every process, after the
    gather, under torchrun). Every process returns the whole result.
    """
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}", "--on-error")
    mine = list(range(rank(), len(items), world_size()))
    loader = DataLoader(torch.utils.data.Subset(ClipFrames(items, read, cfg), mine), batch_size=batch_size,
                        collate_fn=_collate, num_workers=cfg.data.num_workers)
    was_training = model.training
    model.eval()
    indices, embeddings, errors = [], [], {}
    for batch in tqdm(loader, desc=desc, disable=not is_main(), dynamic_ncols=True):
        errors.update(batch["errors"])
        if on_error == "fail" and errors and world_size() == 1:  # under torchrun every rank stops after the gather
            raise VideoReadError(next(iter(errors.values())))
        if batch["frames"] is not None:
            with autocast(cfg, device):
                embeddings.append(model.encode_video(batch["frames"].to(device, non_blocking=True)).float().cpu())
            indices += batch["index"]
    model.train(was_training)
    width = model.config.embed_dim
    parts = gather_objects((indices, torch.cat(embeddings) if embeddings else torch.empty(0, width), errors))
    result = torch.full((len(items), width), float("nan"))
    for part_indices, part_embeddings, part_errors in parts:
        result[part_indices] = part_embeddings
        errors.update(part_errors)
    if on_error == "fail" and errors:
        raise VideoReadError(next(iter(errors.values())))
    for message in errors.values():
        log.warning("skipped: %s", message)
    return result, dict(sorted(errors.items()))


@torch.no_grad()
def embed_texts(model: SViTTEgo, texts: Sequence[str], cfg: Config, device: torch.device) -> torch.Tensor:
    """The L2-normalised text embeddings ``[len(texts), D]`` (float32, CPU)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(texts), TEXT_BATCH):
        with autocast(cfg, device):
            parts.append(model.encode_text(list(texts[start:start + TEXT_BATCH])).float().cpu())
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)
