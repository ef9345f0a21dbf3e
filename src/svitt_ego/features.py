"""Window features of any video: the window loop, the extractor and the one feature-folder format.

A video (a file PyAV reads, a prepared chunk folder ``ROOT/<video_uid>/<k>.mp4`` or frames in
memory) is a run of ``count`` frames at ``fps``; frame ``i`` is the one shown at
``(first + i + 0.5) / fps`` seconds of its file (``first`` is 0 except for NLQ clips). With
``--fps`` the frames are resampled: ``floor(count * new_fps / fps)`` frames at ``new_fps``.

Window ``i`` covers frames ``[stride * i, stride * i + window)``; there are
``ceil(count / stride)`` windows, and frames past the last one repeat it, so the last partial
window is a full row of real frames. The model sees ``frames`` of each window's frames, the
middle one of each of ``frames`` equal parts (all of them when ``frames == window``). Row ``i``
stands for its window's centre, ``(stride * i + window / 2) / fps`` seconds from the start.

A feature folder holds ``manifest.json``, written before the first feature, and one
``videos/<key>.safetensors`` per video. The manifest names the checkpoint (absolute path and
:func:`~svitt_ego.models.digest.weights_digest`), every setting, the row shape and dtype, the
time convention and each video's fps, first frame, frame count and window count. Every file is
checked against it (tensor names, rows = windows, row shape, dtype, finite values) when an
extraction resumes and when it is read (:class:`FeatureFolder`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from svitt_ego.data.errors import MetadataError
from svitt_ego.data.errors import load_json as _load_json
from svitt_ego.data.transforms import eval_transform
from svitt_ego.models.pruning import num_kept
from svitt_ego.untrusted import printable

log = logging.getLogger(__name__)

FORMAT = "svitt-ego window features 1"
MANIFEST = "manifest.json"
WHAT = ("pooled", "projected", "tokens")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_DIMENSION = 1 << 16  # a row size read from a manifest is refused above this before anything is allocated
TIME_CONVENTION = ("window i covers frames [stride*i, stride*i + window) from the first frame and stands for "
                   "its centre, (stride*i + window/2) / fps seconds after the start")
# What a video's file is named by: a plain file name, never a path.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class FeatureFolderError(MetadataError):
    """A feature folder, its manifest or one of its files is malformed or does not fit the run.
    The message is one line naming the file and the field."""


def is_whole(value, low: int = 1, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def is_positive(value) -> bool:
    """A finite number > 0 (a whole number of any size, or a float)."""
    if isinstance(value, float):
        return math.isfinite(value) and value > 0
    return is_whole(value)


# --------------------------------------------------------------------------- the window loop


def num_windows(num_frames: int, stride: int) -> int:
    return -(-num_frames // stride)  # ceil, exact for any whole numbers


def frame_offsets(window: int, frames: int) -> torch.Tensor:
    """Which ``frames`` of a window's ``window`` frames the model sees: the middle of each of
    ``frames`` equal parts."""
    return torch.div((2 * torch.arange(frames) + 1) * window, 2 * frames, rounding_mode="floor")


def window_frame_indices(num_frames: int, window: int, stride: int, frames: int | None = None) -> torch.Tensor:
    """``[T, frames]`` frame indices of every window (``frames`` defaults to ``window``), clamped to
    the last frame."""
    starts = torch.arange(num_windows(num_frames, stride)) * stride
    return (starts[:, None] + frame_offsets(window, frames or window)).clamp(max=num_frames - 1)


def window_centre(index, window: int, stride: int, fps: float):
    """Seconds from the start that window ``index`` (a number or a tensor, fractional allowed) stands for."""
    return (index * stride + window / 2) / fps


def window_index(seconds, window: int, stride: int, fps: float):
    """The inverse of :func:`window_centre`: seconds -> (fractional) window index."""
    return (seconds * fps - window / 2) / stride


# --------------------------------------------------------------------------- videos


@dataclass
class VideoSource:
    """``count`` frames at ``fps`` from frame ``first`` of a video; ``read`` maps seconds of the
    video to the frames shown then (uint8 ``[N, H, W, 3]``)."""
    name: str
    fps: float
    count: int
    read: Callable[[np.ndarray], torch.Tensor]
    first: int = 0
    path: Path | None = None  # the file or chunk folder read, if any

    def times(self, indices: torch.Tensor) -> np.ndarray:
        """Video seconds of frames ``indices`` (the middle of each frame's display time)."""
        return ((self.first + indices.double() + 0.5) / self.fps).numpy()

    def resampled(self, fps: float) -> "VideoSource":
        count = max(1, math.floor(self.count * fps / self.fps + 1e-6))
        first = math.floor(self.first * fps / self.fps + 1e-6)
        return dataclasses.replace(self, fps=fps, count=count, first=first)

    def info(self) -> dict:
        """What a feature manifest says of the video (and its :func:`video_identity`, when read from a path)."""
        identity = {"identity": video_identity(self.path)} if self.path is not None else {}
        return {"source": self.name, "fps": self.fps, "first_frame": self.first, "frames": self.count, **identity}


def video_identity(path: Path) -> dict:
    """What a video's features depend on in the file system: its resolved path, total size and
    latest modification (a chunk folder: over its chunks)."""
    files = sorted(path.glob("*.mp4")) if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return {"video": str(path.resolve()), "size": sum(s.st_size for s in stats),
            "mtime_ns": max(s.st_mtime_ns for s in stats)}


def probe(path: str | Path) -> tuple[float, int]:
    """A video file's frame rate and frame count, from its header."""
    from svitt_ego.data.video import video_header

    fps, count = video_header(Path(path))
    return float(fps), count


def file_source(path: str | Path) -> VideoSource:
    """Every frame of one video file."""
    from svitt_ego.data.video import VideoReadError, read_chunk_frames

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    fps, count = probe(path)
    return VideoSource(str(path), fps, count, lambda times: torch.from_numpy(np.stack(read_chunk_frames(path, times))),
                       path=path)


def chunk_folder_source(folder: str | Path, chunk_seconds: float = 600.0,
                        span: Callable[[float], tuple[int, int]] | None = None) -> VideoSource:
    """A prepared video ``ROOT/<video_uid>/<k>.mp4``: all its frames, or ``span(fps) = (first, count)``."""
    from svitt_ego.data.errors import VIDEO_UID_RULE, is_video_uid
    from svitt_ego.data.video import VideoReadError, chunk_path, read_frames

    folder = Path(folder)
    root, uid = folder.parent, folder.name
    if not is_video_uid(uid):
        raise VideoReadError(f"{folder}: a chunk folder is named by its video id ({VIDEO_UID_RULE})")
    fps, count = probe(chunk_path(root, uid, 0))
    first = 0
    if span is not None:
        first, count = span(fps)
    else:
        chunk = 1
        while chunk_path(root, uid, chunk).is_file():
            count += probe(chunk_path(root, uid, chunk))[1]
            chunk += 1
    if count <= 0:
        raise VideoReadError(f"{folder}: no frames")
    return VideoSource(str(folder), fps, count, lambda times: read_frames(root, uid, times, chunk_seconds), first,
                       folder)


def tensor_source(frames: torch.Tensor, fps: float, name: str = "frames") -> VideoSource:
    """Frames in memory, uint8 ``[N, H, W, 3]`` at ``fps``."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if not is_positive(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")

    def read(times: np.ndarray) -> torch.Tensor:
        return frames[torch.from_numpy(np.floor(times * fps + 1e-6).astype(np.int64)).clamp(max=len(frames) - 1)]

    return VideoSource(name, float(fps), len(frames), read)


def open_video(video, chunk_seconds: float = 600.0) -> VideoSource:
    """A video file or a prepared chunk folder (one holding ``0.mp4``)."""
    path = Path(video)
    return chunk_folder_source(path, chunk_seconds) if path.is_dir() else file_source(path)


# --------------------------------------------------------------------------- the extractor


def check_whole(name: str, value) -> int:
    if not is_whole(value):
        raise FeatureFolderError(f"--{name} must be a whole number >= 1, got {value!r}")
    return value


def check_numbers(**values) -> None:
    """Each given (not None) value a whole number >= 1, named as its option (``batch_size``: ``--batch-size``)."""
    for name, value in values.items():
        if value is not None:
            check_whole(name.replace("_", "-"), value)


@dataclass(frozen=True)
class Settings:
    """What an extraction computes; all of it is fixed in the manifest."""
    what: str = "pooled"
    window: int = 4
    stride: int = 4
    frames: int = 4
    fps: float | None = None  # resample to this rate; None: each video's own
    dtype: str = "float16"

    def check(self) -> "Settings":
        for name in ("window", "stride", "frames"):
            check_whole(name, getattr(self, name))
        if self.frames > self.window:
            raise FeatureFolderError(f"--frames {self.frames} is more than the window's {self.window} frames")
        if self.fps is not None and not is_positive(self.fps):
            raise FeatureFolderError(f"--fps must be a positive number, got {self.fps!r}")
        if self.what not in WHAT:
            raise FeatureFolderError(f"--what must be one of {', '.join(WHAT)}, got {self.what!r}")
        if self.dtype not in DTYPES:
            raise FeatureFolderError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return self


def row_shape(model, what: str) -> list[int]:
    """The shape of one window's ``features`` (``tokens``: kept tokens x width)."""
    vision = model.config.vision
    if what == "projected":
        return [model.config.embed_dim]
    if what == "pooled":
        return [vision.width]
    kept = vision.num_frames * vision.grid_size ** 2
    for layer in range(vision.depth):
        if layer in vision.prune_layers and vision.keep_rate < 1.0:
            kept = num_kept(vision.keep_rate, kept)
    return [kept, vision.width]


class WindowExtractor:
    """Batched window features of videos from one SViTT-Ego model (fp16 autocast on CUDA)."""

    def __init__(self, model, settings: Settings, batch_size: int = 32, device: torch.device | str = "cpu"):
        self.settings = settings.check()
        if settings.frames != model.config.vision.num_frames:
            raise FeatureFolderError(f"{settings.frames} frames per window differ from the model's num_frames "
                                     f"({model.config.vision.num_frames})")
        check_whole("batch-size", batch_size)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.transform = eval_transform(model.config.vision)
        self.amp = self.device.type == "cuda"
        self.shape = row_shape(model, settings.what)

    def prepare(self, source: VideoSource) -> VideoSource:
        """``source`` at the extraction's frame rate."""
        return source.resampled(self.settings.fps) if self.settings.fps else source

    @torch.no_grad()
    def rows(self, source: VideoSource, progress=None) -> dict[str, torch.Tensor]:
        """``{"features": [T, *row_shape]}`` (and ``"positions"``, int16 ``[T, K, 3]`` (t, h, w) of the
        kept tokens, for ``tokens``) of every window of ``source`` (already :meth:`prepare` d); a
        non-finite row is refused."""
        s = self.settings
        indices = window_frame_indices(source.count, s.window, s.stride, s.frames)
        parts: dict[str, list[torch.Tensor]] = {}
        for i, block in enumerate(indices.split(self.batch_size)):
            needed, inverse = block.unique(return_inverse=True)  # each frame decoded once per batch
            pixels = self.transform(source.read(source.times(needed)))
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                out = self._forward(pixels[inverse].to(self.device))
            _check_finite(out["features"], source.name, i * self.batch_size)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.cpu())
            if progress is not None:
                progress.update(len(block))
        return {key: torch.cat(values) for key, values in parts.items()}

    def _forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        video = self.model.forward_video(batch)
        dtype = DTYPES[self.settings.dtype]
        if self.settings.what == "pooled":
            return {"features": video.pooled.to(dtype)}
        if self.settings.what == "projected":
            return {"features": self.model.video_embedding(video).to(dtype)}
        grid = self.model.config.vision.grid_size
        if video.kept_positions:
            positions = video.kept_positions[-1]
        else:
            positions = torch.arange(video.tokens.shape[1] - 1, device=batch.device).expand(len(batch), -1)
        thw = torch.stack([positions // grid ** 2, positions // grid % grid, positions % grid], -1)
        return {"features": video.tokens[:, 1:].to(dtype), "positions": thw.to(torch.int16)}


def _check_finite(rows: torch.Tensor, name: str, first: int) -> None:
    bad = (~torch.isfinite(rows.float()).flatten(1).all(1)).nonzero()
    if len(bad):
        raise FeatureFolderError(f"{name}: window {first + int(bad[0])} has a non-finite feature (NaN or inf); "
                                 "the checkpoint's weights or fp16 overflow produce it, nothing was written for it")


@dataclass
class WindowFeatures:
    """A video's rows, the seconds each row stands for, and (``tokens``) the kept tokens' (t, h, w)."""
    features: torch.Tensor
    times: np.ndarray
    positions: torch.Tensor | None = None


def extract_video_features(model, video, fps: float | None = None, window: int | None = None,
                           stride: int | None = None, frames: int | None = None, what: str = "pooled",
                           dtype: str = "float16", batch_size: int = 32, device: torch.device | str = "cpu",
                           chunk_seconds: float = 600.0, resample_fps: float | None = None) -> WindowFeatures:
    """Window features of one video: a file path, a prepared chunk folder, or uint8 frames
    ``[N, H, W, 3]`` (then ``fps`` is their rate). ``frames`` defaults to the model's ``num_frames``,
    ``window`` to ``frames`` and ``stride`` to ``window``; ``resample_fps`` resamples first.
    PyAV is imported only when a path is read."""
    frames = frames or model.config.vision.num_frames
    window = window or frames
    settings = Settings(what, window, stride or window, frames, resample_fps, dtype)
    extractor = WindowExtractor(model, settings, batch_size, device)
    if isinstance(video, torch.Tensor):
        if fps is None:
            raise ValueError("frames in memory need their fps")
        source = tensor_source(video, fps)
    else:
        source = open_video(video, chunk_seconds)
    source = extractor.prepare(source)
    rows = extractor.rows(source)
    times = window_centre(np.arange(len(rows["features"])), settings.window, settings.stride, source.fps)
    return WindowFeatures(rows["features"], times, rows.get("positions"))


# --------------------------------------------------------------------------- the feature folder


def feature_file(folder: str | Path, key: str) -> Path:
    return Path(folder) / "videos" / f"{key}.safetensors"


def check_key(key, where: str) -> str:
    if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
        raise FeatureFolderError(f"{where}: {key!r} does not name a feature file (letters, digits, '_', '-' "
                                 "and '.', not starting with '.' or '-', at most 128 characters)")
    return key


def check_field(data: dict, key: str, ok: Callable, rule: str, where: str):
    value = data.get(key)
    if not ok(value):
        text = repr(value)
        raise FeatureFolderError(f"{where}: field '{key}' must be {rule}, got "
                                 f"{text if len(text) <= 60 else text[:60] + '...'}")
    return value


def check_manifest(data, where: str) -> dict:
    """``data`` if it is a well-formed manifest (types, ranges, window counts); else one line naming the field."""
    if not isinstance(data, dict):
        raise FeatureFolderError(f"{where}: expected a JSON object, got {type(data).__name__}")
    check_field(data, "format", lambda v: v == FORMAT, repr(FORMAT), where)
    check_field(data, "checkpoint", lambda v: isinstance(v, str) and v, "a path", where)
    check_field(data, "weights_digest", lambda v: isinstance(v, str) and _DIGEST.fullmatch(v),
                "'sha256:<64 hex>'", where)
    check_field(data, "what", lambda v: isinstance(v, str) and v in WHAT, f"one of {', '.join(WHAT)}", where)
    check_field(data, "dtype", lambda v: isinstance(v, str) and v in DTYPES, f"one of {', '.join(DTYPES)}", where)
    for key in ("window", "stride", "frames"):
        check_field(data, key, is_whole, "a whole number >= 1", where)
    check_field(data, "frames", lambda v: v <= data["window"], "at most 'window'", where)
    check_field(data, "fps", lambda v: v is None or is_positive(v), "null or a positive number", where)
    check_field(data, "time_convention", lambda v: isinstance(v, str), "a string", where)
    shape = check_field(data, "row_shape", lambda v: isinstance(v, list) and len(v) in (1, 2)
                        and all(is_whole(n, 1, MAX_DIMENSION) for n in v),
                        f"a list of 1 or 2 sizes <= {MAX_DIMENSION}", where)
    check_field(data, "dimension", lambda v: is_whole(v) and v == shape[-1], "the last size of 'row_shape'", where)
    check_field(data, "row_shape", lambda v: (len(v) == 2) == (data["what"] == "tokens"),
                "[tokens, width] for 'tokens', [width] otherwise", where)
    videos = check_field(data, "videos", lambda v: isinstance(v, dict), "an object", where)
    for key, info in videos.items():
        at = f"{where} video {check_key(key, where)}"
        if not isinstance(info, dict):
            raise FeatureFolderError(f"{at}: expected an object, got {type(info).__name__}")
        check_field(info, "source", lambda v: isinstance(v, str), "a string", at)
        check_field(info, "fps", is_positive, "a positive number", at)
        check_field(info, "first_frame", lambda v: is_whole(v, 0), "a whole number >= 0", at)
        frames = check_field(info, "frames", is_whole, "a whole number >= 1", at)
        check_field(info, "windows", lambda v: is_whole(v) and v == num_windows(frames, data["stride"]),
                    f"ceil(frames / stride) = {num_windows(frames, data['stride'])}", at)
        if "identity" in info:  # written since the folders of earlier versions
            check_field(info, "identity", _is_identity, "{'video': path, 'size': bytes, 'mtime_ns': time}", at)
    failed = check_field(data, "failed", lambda v: isinstance(v, dict) and all(isinstance(m, str)
                                                                               for m in v.values()),
                         "an object of messages", where)
    for key in failed:
        check_key(key, where)
    return data


def _is_identity(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"video", "size", "mtime_ns"} and isinstance(value["video"], str)
            and is_whole(value["size"], 0) and is_whole(value["mtime_ns"], 0))


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists() and (Path(folder) / "meta.json").exists():
        raise FeatureFolderError(f"{folder}: features in the older format (meta.json, no {MANIFEST}), whose "
                                 "settings were never checked against its files; extract them again")
    return check_manifest(_load_json(path, FeatureFolderError, "feature manifest"), str(path))


def expected_tensors(manifest: dict, windows: int) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Name -> (dtype, shape) of the tensors of a video's file."""
    shape = [windows, *manifest["row_shape"]]
    tensors = {"features": (DTYPES[manifest["dtype"]], shape)}
    if manifest["what"] == "tokens":
        tensors["positions"] = (torch.int16, [*shape[:2], 3])
    return tensors


def read_checked(path: Path, expected: dict[str, tuple[torch.dtype, list]]) -> dict[str, torch.Tensor]:
    """A safetensors file holding exactly ``expected`` (name -> dtype, shape; a size None is any), all
    finite; else one line naming the file and the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FeatureFolderError(f"{path}: no such feature file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise FeatureFolderError(f"{path}: not a readable safetensors file ({err})") from None
    if set(tensors) != set(expected):
        raise FeatureFolderError(f"{path}: holds tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        tensor = tensors[name]
        if tensor.dtype != dtype or tensor.ndim != len(shape) or any(
                n is not None and n != m for n, m in zip(shape, tensor.shape)):
            raise FeatureFolderError(f"{path}: tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')} "
                                     f"{list(tensor.shape)}, the manifest says {str(dtype).removeprefix('torch.')} "
                                     f"{shape}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            row = int((~torch.isfinite(tensor.float()).reshape(len(tensor), -1).all(1)).nonzero()[0])
            raise FeatureFolderError(f"{path}: tensor '{name}' row {row} is not finite (NaN or inf)")
    return tensors


class FeatureFolder:
    """Reads a feature folder; the manifest is checked on opening, each file when it is read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.window, self.stride = self.manifest["window"], self.manifest["stride"]

    def keys(self) -> list[str]:
        """The videos that have features."""
        return [key for key in self.manifest["videos"] if key not in self.manifest["failed"]]

    def info(self, key: str) -> dict:
        """``{"source", "fps", "first_frame", "frames", "windows"}`` of an extracted video."""
        if key not in self.manifest["videos"] or key in self.manifest["failed"]:
            why = self.manifest["failed"].get(key, "not extracted")
            raise FeatureFolderError(f"{self.folder / MANIFEST}: {key} has no features ({why})")
        return self.manifest["videos"][key]

    def rows(self, key: str) -> dict[str, torch.Tensor]:
        """The video's tensors, checked against the manifest."""
        expected = expected_tensors(self.manifest, self.info(key)["windows"])
        return read_checked(feature_file(self.folder, key), expected)

    def features(self, key: str) -> torch.Tensor:
        return self.rows(key)["features"]

    def to_seconds(self, key: str, index):
        return window_centre(index, self.window, self.stride, self.info(key)["fps"])

    def to_index(self, key: str, seconds):
        return window_index(seconds, self.window, self.stride, self.info(key)["fps"])

    def times(self, key: str) -> np.ndarray:
        """The seconds (from the video's first frame) each row stands for."""
        return self.to_seconds(key, np.arange(self.info(key)["windows"]))


def load_features(folder: str | Path) -> FeatureFolder:
    return FeatureFolder(folder)


# --------------------------------------------------------------------------- writing a feature folder

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
COMPARED = ("fps", "first_frame", "frames", "windows")  # what may not change for a video already in a folder


def manifest_header(checkpoint: str | Path, digest: str, settings: Settings, shape: list[int]) -> dict:
    """Everything a feature folder's files depend on, as its manifest states it."""
    return {"format": FORMAT, "checkpoint": str(Path(checkpoint).resolve()), "weights_digest": digest,
            **dataclasses.asdict(settings), "row_shape": list(shape), "dimension": shape[-1],
            "time_convention": TIME_CONVENTION}


def _foreign_files(folder: Path) -> list[str]:
    from svitt_ego.run_folder import is_bookkeeping

    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not is_bookkeeping(p.name))


def begin_folder(out: Path, header: dict, entries: dict[str, dict]) -> dict:
    """Write the run's manifest before any feature: a new folder's, or a resumed folder's with
    ``entries`` added. A folder of other settings or weights is refused naming the keys that
    differ, and so is a video whose frames differ from those its features were made of."""
    path = out / MANIFEST
    if path.exists():
        manifest = read_manifest(out)
        changed = [key for key in header if key != "checkpoint" and manifest.get(key) != header[key]]
        if changed:
            listed = "; ".join(f"{key} {manifest.get(key)!r} -> {header[key]!r}" for key in changed)
            raise FeatureFolderError(f"{path}: the folder holds features of other settings or weights ({listed}); "
                                     "resume with the same ones or use another --output folder")
        for key, info in entries.items():
            old = manifest["videos"].get(key)
            if old is not None:
                _refuse_another_source(path, key, old, info)
    else:
        others = _foreign_files(out)
        if others:
            raise FeatureFolderError(f"{out}: holds {', '.join(others[:5])} but no {MANIFEST}; extract into a new "
                                     "or empty folder")
        manifest = {**header, "videos": {}, "failed": {}}
    manifest["videos"] = dict(sorted({**manifest["videos"], **entries}.items()))
    manifest["failed"] = {k: v for k, v in manifest["failed"].items() if k not in entries}
    _write_manifest(out, manifest)
    return manifest


def _refuse_another_source(path: Path, key: str, old: dict, new: dict) -> None:
    """Refuse ``new`` as video ``key`` of a folder whose features of ``key`` came from ``old``: another source
    (by resolved path), the same file changed since (size or modification time), or other frames."""
    was = old.get("identity", {"video": str(Path(old["source"]).resolve())})
    now = new.get("identity", {"video": str(Path(new["source"]).resolve())})
    if was["video"] != now["video"]:
        raise FeatureFolderError(f"{path}: {key} holds the features of {was['video']}, and {now['video']} has the "
                                 "same name; extract it into another --output folder to keep both")
    changed = [f"{k} {was[k]!r} -> {now[k]!r}" for k in ("size", "mtime_ns") if k in was and was[k] != now.get(k)]
    changed += [f"{k} {old[k]!r} -> {new[k]!r}" for k in COMPARED if old[k] != new[k]]
    if changed:
        raise FeatureFolderError(f"{path}: video {key} differs from the one its features were made of "
                                 f"({'; '.join(changed)}); use another --output folder")


def _write_manifest(out: Path, manifest: dict) -> None:
    from svitt_ego.atomic import atomic_write_json

    try:
        atomic_write_json(out / MANIFEST, check_manifest(manifest, str(out / MANIFEST)))
    except OSError as err:
        raise FeatureFolderError(f"{out / MANIFEST}: could not write ({err})") from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from svitt_ego.atomic import atomic_write

    try:
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    except OSError as err:
        raise FeatureFolderError(f"{path}: could not write ({err})") from None


def is_complete(path: Path, expected: dict) -> bool:
    """Whether ``path`` holds what ``expected`` says; a file that does not is logged and made again."""
    if not path.exists():
        return False
    try:
        read_checked(path, expected)
    except FeatureFolderError as err:
        log.warning("%s; extracting it again", err)
        return False
    return True


def extract_into(out: str | Path, header: dict, jobs: dict[str, Callable[[], VideoSource]],
                 extractor: WindowExtractor, after: Callable[[str], None] | None = None,
                 noun: str = "videos", command: str = "extract-features", summary: bool = True) -> dict:
    """Extract every video of ``jobs`` (key -> a function opening it) into ``out``; returns the manifest.

    The folder is held for ``command`` (:func:`svitt_ego.run_folder.run_folder`: one writer, no links,
    staging files of a killed run removed); every video is opened (headers only) and the manifest written before
    the first feature. A video whose file is complete is skipped, so a killed run resumes where
    it stopped. Under torchrun rank ``r`` takes every ``world_size``-th video and rank 0 writes the
    manifest. ``after(key)`` runs after each video's features (NLQ: the query files). A video that
    cannot be read gets no file: it is logged, listed in the manifest's ``failed`` and counted (in a
    printed summary, unless ``summary`` is false).
    """
    from tqdm import tqdm

    from svitt_ego.data.video import VideoReadError
    from svitt_ego.distributed import decide_on_main, gather_objects, is_main, rank, world_size
    from svitt_ego.run_folder import run_folder

    out = Path(out)
    with run_folder(out, command):
        sources, failed = {}, {}
        for key in sorted(jobs)[rank()::world_size()]:
            try:
                sources[key] = extractor.prepare(jobs[key]())
            except VideoReadError as err:
                failed[key] = str(err)
        entries = {key: {**s.info(), "windows": num_windows(s.count, header["stride"])} for key, s in sources.items()}
        every = {key: info for part in gather_objects(entries) for key, info in part.items()}
        error = decide_on_main(lambda: _why_not(lambda: begin_folder(out, header, every)))
        if error:
            raise FeatureFolderError(error)
        manifest = {**header, "videos": every}
        total = sum(info["windows"] for info in entries.values())
        with tqdm(total=total, unit="window", disable=not is_main(), dynamic_ncols=True,
                  desc=f"features of {len(sources)} {noun}") as progress:
            for key, source in sources.items():
                try:
                    _extract_video(out, key, source, entries[key]["windows"], extractor, manifest, progress)
                except VideoReadError as err:
                    failed[key] = str(err)
                    continue
                if after is not None:
                    after(key)
        failed = {key: why for part in gather_objects(failed) for key, why in part.items()}
        for key, why in failed.items():
            log.error("%s: %s", key, why)
        manifest = decide_on_main(lambda: _finish(out, failed))
    if is_main() and summary:
        print(f"{len(manifest['videos'])} {noun} have features in {out}, "
              f"{len(failed)} unreadable" + "".join(f"\n  {printable(key)}: {why}" for key, why in failed.items()))
    return manifest


def _why_not(action: Callable[[], object]) -> str | None:
    try:
        action()
    except FeatureFolderError as err:
        return str(err)
    return None


def _extract_video(out: Path, key: str, source: VideoSource, windows: int, extractor: WindowExtractor,
                   manifest: dict, progress) -> None:
    path = feature_file(out, key)
    if is_complete(path, expected_tensors(manifest, windows)):
        progress.update(windows)
        return
    write_tensors(path, extractor.rows(source, progress))


def _finish(out: Path, failed: dict[str, str]) -> dict:
    manifest = read_manifest(out)
    manifest["failed"] = dict(sorted({**manifest["failed"], **failed}.items()))
    manifest["videos"] = {k: v for k, v in manifest["videos"].items() if k not in failed}
    _write_manifest(out, manifest)
    return manifest


# --------------------------------------------------------------------------- the models, and svitt-ego extract-features


def load_model(checkpoint: str | Path, frames: int | None = None):
    """The SViTT-Ego model of ``checkpoint`` (re-inflated to ``frames`` when given) and the
    :func:`~svitt_ego.models.digest.weights_digest` of the checkpoint's own weights."""
    from svitt_ego.models.loading import load_for_eval
    from svitt_ego.models import SViTTEgo
    from svitt_ego.models.digest import weights_digest

    model, _ = load_for_eval(checkpoint)
    digest = weights_digest(model.state_dict())
    if frames is not None and frames != model.config.vision.num_frames:
        model = SViTTEgo.from_state_dict(model.config, model.state_dict(), str(checkpoint),
                                         {"vision": {"num_frames": frames}})
    return model.eval(), digest


def model_of(manifest: dict, where: str, checkpoint: str | Path | None = None):
    """The model a feature folder was extracted with (its manifest's checkpoint unless given),
    refused unless its weights have the manifest's digest."""
    model, digest = load_model(checkpoint or manifest["checkpoint"])
    if digest != manifest["weights_digest"]:
        raise FeatureFolderError(f"{where}: the features were extracted with weights {manifest['weights_digest']}, "
                                 f"{checkpoint or manifest['checkpoint']} holds {digest}; give the checkpoint "
                                 "they came from or extract again")
    return model


def video_key(path: Path) -> str:
    """The file name of a video's features: its file's stem (or its chunk folder's name), with
    characters other than letters, digits, '_', '-' and '.' replaced by '_'."""
    name = path.name if path.is_dir() else path.stem
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:128]
    return key if KEY_PATTERN.fullmatch(key) else f"_{key}"[:128]


def is_chunk_folder(path: Path) -> bool:
    return path.is_dir() and (path / "0.mp4").is_file()


def list_videos(inputs: list, root: str | Path | None = None) -> dict[str, Path]:
    """Key -> path of every video named by ``inputs``: video files, prepared chunk folders,
    folders of either (not recursive), ``.txt`` files of such paths (one a line, relative to the
    list's folder; ``#`` starts a comment) and, with ``root``, video uids of chunk folders under it."""
    found: dict[str, Path] = {}

    def add(path: Path) -> None:
        path = path.absolute()
        key = video_key(path)
        if found.get(key, path) != path:
            raise FeatureFolderError(f"{path} and {found[key]} would both be written as {key}; rename one or "
                                     "extract them into separate folders")
        found[key] = path

    def expand(path: Path, listed: bool) -> None:
        if is_chunk_folder(path) or (listed and not path.exists()):
            add(path)  # a listed path that does not exist is counted as unreadable
        elif path.is_dir():
            for child in sorted(path.iterdir()):
                if is_chunk_folder(child) or (child.is_file() and child.suffix.lower() in VIDEO_SUFFIXES):
                    add(child)
        elif path.is_file():
            add(path)
        else:
            raise FeatureFolderError(f"{path}: no such video file or folder")

    for item in inputs:
        path = Path(item)
        if root is not None and not path.exists() and is_chunk_folder(Path(root) / str(item)):
            add(Path(root) / str(item))
        elif path.suffix == ".txt" and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    expand(path.parent / line.strip(), listed=True)
        else:
            expand(path, listed=False)
    if not found:
        raise FeatureFolderError(f"no videos in {', '.join(map(str, inputs))}")
    return found


def model_settings(model, what: str = "pooled", window: int | None = None, stride: int | None = None,
                   fps: float | None = None, dtype: str = "float16") -> Settings:
    """The checked settings of an extraction with ``model``: its ``num_frames`` per window, ``window``
    defaulting to them and ``stride`` to ``window``."""
    frames = model.config.vision.num_frames
    return Settings(what, window or frames, stride or window or frames, frames, fps, dtype).check()


def extract_features(checkpoint: str | Path, videos: list, out: str | Path, what: str = "pooled",
                     window: int | None = None, stride: int | None = None, frames: int | None = None,
                     fps: float | None = None, dtype: str = "float16", batch_size: int = 32,
                     chunk_seconds: float = 600.0, root: str | Path | None = None, device: str | None = None) -> dict:
    """``svitt-ego extract-features``: window features of every video into ``out``; returns the manifest.

    ``frames`` defaults to the model's ``num_frames`` (another value re-inflates the model),
    ``window`` to ``frames`` and ``stride`` to ``window``; ``device``: :func:`~svitt_ego.device.pick_device`."""
    from svitt_ego.device import pick_device
    from svitt_ego.distributed import setup_distributed

    check_numbers(window=window, stride=stride, frames=frames, batch_size=batch_size)
    jobs = {key: (lambda path=path: open_video(path, chunk_seconds)) for key, path in list_videos(videos, root).items()}
    _, _, device = setup_distributed(pick_device(device))
    model, digest = load_model(checkpoint, frames)
    settings = model_settings(model, what, window, stride, fps, dtype)
    extractor = WindowExtractor(model, settings, batch_size, device)
    return extract_into(out, manifest_header(checkpoint, digest, settings, extractor.shape), jobs, extractor)
