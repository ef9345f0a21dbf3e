"""``svitt-ego extract-nlq-features``: one video feature per window of frames, and query token states.

For every clip, its frames from start to end at the video's real frame rate; window ``i``
is frames ``[stride * i, stride * i + window)`` from the clip's first frame, the last windows
padded by repeating the clip's last frame, so ``T = ceil(frames / stride)`` and every row is a
real feature. Window ``i`` stands for the time of its centre (:func:`window_centre`), in
training and prediction alike.

Output folder: ``video/<clip_uid>.pt`` (float16 ``[T, D]``, the video encoder's pooled
output), ``text/<annotation_uid>_<query_idx>.pt`` (float16 ``[L, C]``, the text encoder's
token states without padding) and ``meta.json``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from svitt_ego.atomic import atomic_torch_save, atomic_write_json
from svitt_ego.data.transforms import eval_transform
from svitt_ego.data.video import VideoReadError, chunk_path, frame_rate, read_frames
from svitt_ego.nlq.annotations import NLQClip, NLQFormatError, NLQQuery, load_json, read_nlq

log = logging.getLogger(__name__)

TIME_CONVENTION = ("window i covers frames [stride*i, stride*i + window) from the clip's first frame "
                   "and stands for its centre, (stride*i + window/2) / fps seconds after the clip's start")


def num_windows(num_frames: int, stride: int) -> int:
    return math.ceil(num_frames / stride)


def window_frame_indices(num_frames: int, window: int, stride: int) -> torch.Tensor:
    """``[T, window]`` frame indices of every window, clamped to the last frame."""
    starts = torch.arange(num_windows(num_frames, stride)) * stride
    return (starts[:, None] + torch.arange(window)).clamp(max=num_frames - 1)


def window_centre(index, window: int, stride: int, fps: float):
    """Clip seconds that window ``index`` (a number or a tensor, fractional allowed) stands for."""
    return (index * stride + window / 2) / fps


def window_index(seconds, window: int, stride: int, fps: float):
    """The inverse of :func:`window_centre`: clip seconds -> (fractional) window index."""
    return (seconds * fps - window / 2) / stride


def video_file(out: Path, clip_uid: str) -> Path:
    return out / "video" / f"{clip_uid}.pt"


def text_file(out: Path, query: NLQQuery) -> Path:
    return out / "text" / f"{query.annotation_uid}_{query.query_idx}.pt"


def video_fps(root: str | Path, video_uid: str) -> float:
    return float(frame_rate(chunk_path(root, video_uid, 0)))


@dataclass
class ClipFrames:
    """Which frames of its video a clip is."""
    first: int  # the clip's first frame in the video
    count: int
    fps: float

    @classmethod
    def of(cls, clip: NLQClip, fps: float) -> "ClipFrames":
        first = math.floor(clip.video_start_sec * fps + 1e-6)
        return cls(first, max(1, round(clip.duration * fps)), fps)

    def times(self, indices: torch.Tensor):
        """Video seconds of clip frames ``indices`` (the middle of each frame's display time)."""
        return ((self.first + indices.double() + 0.5) / self.fps).numpy()


class WindowFeatureExtractor:
    """Batched window features and query token states from one SViTT-Ego model."""

    def __init__(self, model, window: int, stride: int, batch_size: int, device: torch.device,
                 chunk_seconds: float = 600.0):
        vision = model.config.vision
        if window != vision.num_frames:
            raise ValueError(f"--window {window} differs from the model's num_frames ({vision.num_frames})")
        self.model = model.to(device).eval()
        self.window, self.stride, self.batch_size = window, stride, batch_size
        self.device, self.chunk_seconds = device, chunk_seconds
        self.transform = eval_transform(vision)
        self.amp = device.type == "cuda"

    @torch.no_grad()
    def clip_features(self, root: str | Path, clip: NLQClip, frames: ClipFrames, progress=None) -> torch.Tensor:
        """float16 ``[T, D]``: the pooled video feature of every window of the clip."""
        indices = window_frame_indices(frames.count, self.window, self.stride)
        rows = []
        for block in indices.split(self.batch_size):
            needed, inverse = block.unique(return_inverse=True)
            pixels = self.transform(read_frames(root, clip.video_uid, frames.times(needed), self.chunk_seconds))
            batch = pixels[inverse].to(self.device)  # [B, window, 3, H, W]
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                rows.append(self.model.forward_video(batch).pooled.half().cpu())
            if progress is not None:
                progress.update(len(block))
        return torch.cat(rows)

    @torch.no_grad()
    def text_states(self, text: str) -> torch.Tensor:
        """float16 ``[L, C]``: the text encoder's token states of the query, padding removed."""
        enc = self.model.tokenize([text])
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            hidden = self.model.forward_text(enc["input_ids"], enc["attention_mask"])[0]
        return hidden[enc["attention_mask"][0].bool()].half().cpu()


def _clip_jobs(annotation_files: list) -> tuple[list[NLQClip], dict[str, list[NLQQuery]]]:
    clips, queries = {}, {}
    for path in annotation_files:
        parsed = read_nlq(path)
        clips.update(parsed.clips)
        for q in parsed.queries:
            queries.setdefault(q.clip_uid, []).append(q)
    return sorted(clips.values(), key=lambda c: c.clip_uid), queries


def _check_meta(out: Path, meta: dict) -> None:
    """A resumed extraction must use the same checkpoint and windows as the files already there."""
    path = out / "meta.json"
    if not path.exists():
        return
    old = load_json(path)
    for key in ("checkpoint", "window", "stride"):
        if old.get(key) != meta[key]:
            raise NLQFormatError(f"{path}: field '{key}' is {old.get(key)!r}, this run has {meta[key]!r}; "
                                 "use another --out folder")


def _plan(clips: list[NLQClip], videos, failed: dict) -> dict[str, ClipFrames]:
    """Each clip's frames (one header read per video); clips of unreadable videos go to ``failed``."""
    rates, plan = {}, {}
    for clip in clips:
        try:
            if clip.video_uid not in rates:
                rates[clip.video_uid] = video_fps(videos, clip.video_uid)
            plan[clip.clip_uid] = ClipFrames.of(clip, rates[clip.video_uid])
        except VideoReadError as err:
            failed[clip.clip_uid] = str(err)
    return plan


def _extract_clip(extractor, videos, out, clip, frames, queries, progress) -> None:
    if video_file(out, clip.clip_uid).exists() and all(text_file(out, q).exists() for q in queries):
        progress.update(num_windows(frames.count, extractor.stride))
        return
    atomic_torch_save(extractor.clip_features(videos, clip, frames, progress), video_file(out, clip.clip_uid))
    for q in queries:
        atomic_torch_save(extractor.text_states(q.text), text_file(out, q))


def extract_nlq_features(checkpoint: str | Path, annotation_files: list, videos: str | Path, out: str | Path,
                         window: int = 4, stride: int = 4, batch_size: int = 32,
                         chunk_seconds: float = 600.0) -> dict:
    """Write the features of every clip of ``annotation_files``; returns ``meta.json``'s content.

    Under torchrun each rank takes every ``world_size``-th clip. Clips whose files exist are
    skipped (files are written atomically), so an interrupted run resumes where it stopped.
    A clip whose video cannot be read gets no files and is listed under ``failed``.
    """
    from svitt_ego.evaluate import load_for_eval
    from svitt_ego.train import setup_distributed

    rank, world_size, device = setup_distributed()
    out = Path(out)
    meta = {"checkpoint": str(checkpoint), "window": window, "stride": stride, "time_convention": TIME_CONVENTION}
    _check_meta(out, meta)
    clips, queries = _clip_jobs(annotation_files)
    if not Path(checkpoint).exists():
        raise NLQFormatError(f"{checkpoint}: no such checkpoint (a .pt file or a save_pretrained folder)")
    model, _ = load_for_eval(checkpoint)
    extractor = WindowFeatureExtractor(model, window, stride, batch_size, device, chunk_seconds)
    failed = {}
    plan = _plan(clips[rank::world_size], videos, failed)
    total = sum(num_windows(f.count, stride) for f in plan.values())
    with tqdm(total=total, unit="window", disable=rank != 0, dynamic_ncols=True, desc="NLQ features") as progress:
        for clip in clips[rank::world_size]:
            if clip.clip_uid not in plan:
                continue
            try:
                _extract_clip(extractor, videos, out, clip, plan[clip.clip_uid], queries.get(clip.clip_uid, []),
                              progress)
            except VideoReadError as err:
                failed[clip.clip_uid] = str(err)
                del plan[clip.clip_uid]
    for uid, err in failed.items():
        log.error("clip %s: %s", uid, err)
    infos = {uid: {"fps": f.fps, "frames": f.count, "windows": num_windows(f.count, stride)}
             for uid, f in plan.items()}
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (infos, failed))
        infos = {k: v for part in parts for k, v in part[0].items()}
        failed = {k: v for part in parts for k, v in part[1].items()}
    meta.update(dimension=model.config.vision.width, text_dimension=model.config.text.width,
                clips=dict(sorted(infos.items())), failed=failed)
    if rank == 0:
        atomic_write_json(out / "meta.json", meta)
        print(f"{len(infos)} clips written to {out}, {len(failed)} unreadable"
              + "".join(f"\n  {uid}: {msg}" for uid, msg in failed.items()))
    return meta


class NLQFeatures:
    """Reads a folder written by :func:`extract_nlq_features`; video features stay cached in memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = load_json(self.folder / "meta.json")
        for key in ("window", "stride", "dimension", "text_dimension", "clips"):
            if key not in self.meta:
                raise NLQFormatError(f"{self.folder / 'meta.json'}: field '{key}' is missing")
        self.window, self.stride = int(self.meta["window"]), int(self.meta["stride"])
        self._video: dict[str, torch.Tensor] = {}

    def clip(self, clip_uid: str) -> dict:
        """``{"fps", "frames", "windows"}`` of an extracted clip."""
        info = self.meta["clips"].get(clip_uid)
        if info is None:
            why = self.meta.get("failed", {}).get(clip_uid, "not extracted")
            raise NLQFormatError(f"{self.folder / 'meta.json'}: clip {clip_uid} has no features ({why})")
        return info

    def video(self, clip_uid: str) -> torch.Tensor:
        if clip_uid not in self._video:
            self.clip(clip_uid)
            path = video_file(self.folder, clip_uid)
            self._video[clip_uid] = torch.load(path, map_location="cpu", weights_only=True)
        return self._video[clip_uid]

    def text(self, query: NLQQuery) -> torch.Tensor:
        path = text_file(self.folder, query)
        if not path.exists():
            raise NLQFormatError(f"{path}: no text features for clip {query.clip_uid} annotation "
                                 f"{query.annotation_uid} query {query.query_idx}; extract them first")
        return torch.load(path, map_location="cpu", weights_only=True)

    def to_index(self, clip_uid: str, seconds):
        return window_index(seconds, self.window, self.stride, self.clip(clip_uid)["fps"])

    def to_seconds(self, clip_uid: str, index):
        return window_centre(index, self.window, self.stride, self.clip(clip_uid)["fps"])
