"""EgoClip pretraining data: clips with their narration, tags and scene-aware hard negative."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from svitt_ego.config import Config
from svitt_ego.data.egoclip import SceneNegatives, pad_tags, read_egoclip
from svitt_ego.data.tokenizer import tokenize
from svitt_ego.data.transforms import ClipTransform
from svitt_ego.data.video import VideoReadError, read_clip_frames
from svitt_ego.data.video_uids import exclude_videos

log = logging.getLogger(__name__)

# With on_error="skip", give up after this many unreadable clips in a row (a wrong video_root).
MAX_CONSECUTIVE_SKIPS = 50


class EgoClipDataset(Dataset):
    """One EgoClip row per item: a dict with ``frames`` (float ``[T, 3, S, S]``), ``text`` (the
    narration as is), ``nouns``, ``verbs`` (tag ids), ``clip_idx`` and ``skipped``; with
    ``cfg.data.hard_negatives`` also ``negative``, the same kind of dict for a scene-aware
    negative plus ``fallback`` (True when it did not come from the anchor's time window).

    Randomness (frame times, crop, flip, negative, replacement clips) comes from a generator
    seeded with ``(cfg.train.seed, epoch, index)``: call :meth:`set_epoch` before each epoch's
    DataLoader iterator is created (i.e. without persistent workers) to vary it by epoch.

    An unreadable video raises :class:`VideoReadError` with ``cfg.data.on_error="raise"``. With
    ``"skip"`` it is logged with its path and another row is drawn from the generator; the item's
    ``skipped`` counts the rows given up on, because a counter in a DataLoader worker process
    (``num_skipped`` here) is invisible to the training loop.
    """

    def __init__(self, cfg: Config, train: bool = True, table: pd.DataFrame | None = None):
        data, vision = cfg.data, cfg.model.vision
        table = table if table is not None else read_egoclip(data.egoclip, lax=data.lax_metadata)
        self.table = exclude_videos(table, data.exclude_videos)
        self.video_root, self.chunk_seconds = data.video_root, data.chunk_seconds
        self.num_frames = vision.num_frames
        self.sampling = "rand" if train else "uniform"
        self.transform = ClipTransform(vision.image_size, train, vision.mean, vision.std, scale=data.crop_scale)
        self.on_error = data.on_error
        self.negatives = SceneNegatives(self.table, data.negative_window) if data.hard_negatives else None
        self.seed, self.epoch = cfg.train.seed, 0
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        skipped = 0
        while True:
            try:
                item = self._clip(index, rng)
                if self.negatives is not None:
                    negative, how = self.negatives.sample(index, rng)
                    item["negative"] = self._clip(negative, rng) | {"fallback": how != "window"}
                item["skipped"] = skipped
                return item
            except VideoReadError as err:
                if self.on_error == "raise":
                    raise
                skipped += 1
                self.num_skipped += 1
                log.warning("skipping EgoClip row %d: %s", index, err)
                if skipped >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"{skipped} EgoClip clips in a row could not be read "
                                       f"(is data.video_root={self.video_root!r} right?); last: {err}") from err
                index = int(rng.integers(len(self)))

    def _clip(self, index: int, rng: np.random.Generator) -> dict:
        row = self.table.iloc[index]
        # Clips at a video's start may begin before 0.
        frames = read_clip_frames(self.video_root, row.video_uid, max(row.clip_start, 0.0), max(row.clip_end, 0.0),
                                  self.num_frames, self.sampling, self.chunk_seconds, rng)
        return {"frames": self.transform(frames, rng), "text": row.clip_text, "nouns": list(row.tag_noun),
                "verbs": list(row.tag_verb), "clip_idx": int(row.clip_idx)}


def epoch_indices(num_rows: int, fraction: float, epoch: int, seed: int) -> np.ndarray:
    """The rows of one epoch in the order to visit them: a random ``fraction`` of all rows
    (at least one), drawn afresh for every epoch, the same for the same arguments."""
    rng = np.random.default_rng([seed, epoch])
    return rng.choice(num_rows, size=max(1, round(fraction * num_rows)), replace=False)


class EpochSampler(Sampler):
    """This process's share of an epoch (:func:`epoch_indices`), from batch ``start_batch`` on.

    Every process gets the same number of rows (the remainder is dropped), and
    the order depends only on (seed, epoch), so a resumed run continues exactly.
    """

    def __init__(self, num_rows: int, fraction: float, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.num_rows, self.fraction, self.seed = num_rows, fraction, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        per_rank = len(epoch_indices(num_rows, fraction, 0, seed)) // world_size
        self.batches_per_epoch = per_rank // batch_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        rows = epoch_indices(self.num_rows, self.fraction, epoch, self.seed)
        mine = rows[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
        self._indices = mine[start_batch * self.batch_size:]

    def __iter__(self):
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)


def collate_egoclip(tokenizer, max_length: int):
    """The collate function for :class:`EgoClipDataset`. Its batch holds the B anchors, then
    their B negatives (when present): ``frames`` ``[2B, T, 3, S, S]``, ``input_ids`` and
    ``attention_mask`` ``[2B, L]``, ``nouns`` and ``verbs`` (:func:`pad_tags`, for the EgoNCE
    positives over anchors and negatives), ``clip_idx`` ``[2B]``, ``skipped`` and ``negative_fallbacks`` (ints)."""
    return functools.partial(_collate_egoclip, tokenizer=tokenizer, max_length=max_length)


def _collate_egoclip(items: list[dict], tokenizer, max_length: int) -> dict:
    clips = items + [item["negative"] for item in items if "negative" in item]
    if len(clips) not in (len(items), 2 * len(items)):
        raise ValueError("either every item of a batch has a negative or none has")
    return {
        "frames": torch.stack([clip["frames"] for clip in clips]),
        **tokenize(tokenizer, [clip["text"] for clip in clips], max_length),
        "nouns": pad_tags([clip["nouns"] for clip in clips]),
        "verbs": pad_tags([clip["verbs"] for clip in clips]),
        "clip_idx": torch.tensor([clip["clip_idx"] for clip in clips], dtype=torch.long),
        "skipped": sum(item["skipped"] for item in items),
        "negative_fallbacks": sum(item["negative"]["fallback"] for item in items if "negative" in item),
    }
