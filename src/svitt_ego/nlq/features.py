"""``svitt-ego extract-nlq-features``: the window features of NLQ clips, and their queries' token states.

A clip at its video's frame rate ``fps`` (the file's own) is ``round(duration * fps)`` frames
from frame ``floor(video_start_sec * fps)`` of its video; its windows, rows and their times are
those of :mod:`svitt_ego.features` (one window loop), times counted from the clip's start.

The output is a feature folder (:mod:`svitt_ego.features`: ``manifest.json`` written first,
``videos/<clip_uid>.safetensors``, pooled float16 ``[T, D]``) whose manifest also states
``text_dimension`` and ``text_encoder`` (:mod:`svitt_ego.nlq.text`), plus
``text/<clip_uid>/<annotation_uid>_<query_idx>.safetensors``: tensor ``states``, ``[L, C]``, the
text encoder's token states of the query without padding (float16 from SViTT-Ego's encoder,
float32 from CLIP's). Query files are keyed by the whole ``(clip_uid, annotation_uid, query_idx)``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import torch

from svitt_ego.features import (MAX_DIMENSION, FeatureFolder, FeatureFolderError, Settings, VideoSource,
                                WindowExtractor, check_field, check_numbers, chunk_folder_source, extract_into,
                                is_complete, is_whole, load_model, manifest_header, read_checked, write_tensors)
from svitt_ego.nlq.annotations import NLQClip, NLQQuery, read_nlq
from svitt_ego.nlq.text import SVITT, is_text_record, text_dtype, text_encoder


def clip_frames(clip: NLQClip, fps: float) -> tuple[int, int]:
    """``(first, count)``: the clip's first frame in its video and its number of frames."""
    return math.floor(clip.video_start_sec * fps + 1e-6), max(1, round(clip.duration * fps))


def clip_source(videos: str | Path, clip: NLQClip, chunk_seconds: float = 600.0) -> VideoSource:
    source = chunk_folder_source(Path(videos) / clip.video_uid, chunk_seconds, partial(clip_frames, clip))
    return dataclasses.replace(source, name=f"{source.name} (clip {clip.clip_uid})")


def text_file(out: str | Path, query: NLQQuery) -> Path:
    return Path(out) / "text" / query.clip_uid / f"{query.annotation_uid}_{query.query_idx}.safetensors"


def text_tensors(dimension: int, dtype: torch.dtype = torch.float16) -> dict:
    return {"states": (dtype, [None, dimension])}


def _clip_jobs(annotation_files: list) -> tuple[dict[str, NLQClip], dict[str, list[NLQQuery]]]:
    clips, queries = {}, {}
    for path in annotation_files:
        parsed = read_nlq(path)
        clips.update(parsed.clips)
        for q in parsed.queries:
            queries.setdefault(q.clip_uid, []).append(q)
    return clips, queries


def extract_nlq_features(checkpoint: str | Path, annotation_files: list, videos: str | Path, out: str | Path,
                         window: int = 4, stride: int = 4, batch_size: int = 32,
                         chunk_seconds: float = 600.0, text: list[str] | None = None,
                         device: str | None = None) -> dict:
    """Write the features of every clip of ``annotation_files`` and of its queries; returns the manifest.

    ``text`` names the queries' encoder (:func:`svitt_ego.nlq.text.text_encoder`: ``["svitt-ego"]``,
    the default, or ``["clip", FOLDER]``). The settings, the checkpoint's digest and the text
    encoder are fixed in the manifest before the first feature, and a resumed run checks every file
    against them (see :func:`svitt_ego.features.extract_into`).
    """
    from svitt_ego.device import pick_device
    from svitt_ego.distributed import setup_distributed

    check_numbers(window=window, stride=stride, batch_size=batch_size)
    clips, queries = _clip_jobs(annotation_files)
    _, _, device = setup_distributed(pick_device(device))
    model, digest = load_model(checkpoint)
    settings = Settings("pooled", window, stride, window)
    extractor = WindowExtractor(model, settings, batch_size, device)
    encoder, out = text_encoder(text or [SVITT], model, extractor.device), Path(out)
    header = {**manifest_header(checkpoint, digest, settings, extractor.shape), "text_dimension": encoder.dimension,
              "text_encoder": encoder.record}

    def write_queries(clip_uid: str) -> None:
        for q in queries.get(clip_uid, []):
            path = text_file(out, q)
            if not is_complete(path, text_tensors(encoder.dimension, encoder.dtype)):
                write_tensors(path, {"states": encoder.states(q.text)})

    jobs = {uid: partial(clip_source, videos, clip, chunk_seconds) for uid, clip in clips.items()}
    return extract_into(out, header, jobs, extractor, after=write_queries, noun="clips", command="extract-nlq-features")


class NLQFeatures(FeatureFolder):
    """Reads a folder written by :func:`extract_nlq_features`; video features stay cached in memory."""

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        where = str(self.folder / "manifest.json")
        check_field(self.manifest, "text_dimension", lambda v: is_whole(v, 1, MAX_DIMENSION),
                    f"a whole number in [1, {MAX_DIMENSION}]", where)
        self.manifest.setdefault("text_encoder", SVITT)  # folders from before it was recorded
        check_field(self.manifest, "text_encoder", is_text_record, "'svitt-ego' or 'clip sha256:<64 hex>'", where)
        if self.manifest["what"] != "pooled" or len(self.manifest["row_shape"]) != 1:
            raise FeatureFolderError(f"{where}: NLQ features are the pooled window vectors, this folder holds "
                                     f"{self.manifest['what']!r}")
        self._video: dict[str, torch.Tensor] = {}

    def clip(self, clip_uid: str) -> dict:
        """``{"source", "fps", "first_frame", "frames", "windows"}`` of an extracted clip."""
        return self.info(clip_uid)

    def video(self, clip_uid: str) -> torch.Tensor:
        if clip_uid not in self._video:
            self._video[clip_uid] = self.features(clip_uid)
        return self._video[clip_uid]

    def text(self, query: NLQQuery) -> torch.Tensor:
        path = text_file(self.folder, query)
        if not path.exists():
            raise FeatureFolderError(f"{path}: no text features for clip {query.clip_uid} annotation "
                                     f"{query.annotation_uid} query {query.query_idx}; extract them first")
        expected = text_tensors(self.manifest["text_dimension"], text_dtype(self.manifest["text_encoder"]))
        return read_checked(path, expected)["states"]
