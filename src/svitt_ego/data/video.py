"""Reading clip frames from the chunked video layout ``<root>/<video_uid>/<k>.mp4``
(docs/data-formats.md).

Chunk ``k`` holds times ``[k * chunk_seconds, (k + 1) * chunk_seconds)`` of the video, with its
own clock starting at 0. The frame shown at time ``t`` is frame
``floor((t - k * chunk_seconds) * fps)`` of chunk ``k = floor(t / chunk_seconds)``, with the
file's real frame rate, clamped to the chunk's last frame; a time more than
``END_TOLERANCE_SECONDS`` past the file's decoded length is a :class:`VideoReadError`, not a copy
of its last frame. A frame's index is read from its
presentation timestamp, so the exact frame is found after any seek; if a variable-rate file
has no frame with that index, the first one after it is used.

A decoder conceals damaged data (bit flips in a stream) instead of failing; a frame it reports
as corrupt anywhere between the keyframe and the frame asked for is a :class:`VideoReadError`.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from svitt_ego.data.errors import VIDEO_UID_RULE, is_video_uid
from svitt_ego.untrusted import one_line

# Decode forward rather than seek when the next frame is at most this far ahead. In the chunks
# written by ``prepare_videos`` (a keyframe every second) a seek lands on average half a second
# before its target, and costs about a tenth of a second of decoding by itself.
SEEK_AHEAD_SECONDS = 0.6

# How far past its decoded length a file may be read (its last frame is then shown); also how
# far short of its declared duration a source may decode in ``prepare_videos``.
END_TOLERANCE_SECONDS = 0.5

# Guards floor(t * fps) against float error for times that sit exactly on a frame boundary.
_EPS = 1e-6

# frame.to_ndarray(format="rgb24") builds a new swscale context, with a thread pool, for every
# frame (~2.5 ms at 456x256); a single-threaded reformatter kept per thread and process reuses
# its context (~0.1 ms). Per process, because a forked DataLoader worker must not use its
# parent's context.
_local = threading.local()

class VideoReadError(RuntimeError):
    """A video file is missing, truncated or cannot be decoded. The message names the path."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def sample_times(start: float, end: float, num_frames: int, sampling: str,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Split ``[start, end]`` into ``num_frames`` equal segments and take one time in each:
    a uniformly random one (``"rand"``, training) or the middle (``"uniform"``, evaluation)."""
    edges = np.linspace(start, end, num_frames + 1)
    if sampling == "uniform":
        offsets = np.full(num_frames, 0.5)
    elif sampling == "rand":
        if rng is None:
            raise ValueError("sampling='rand' needs an rng")
        offsets = rng.random(num_frames)
    else:
        raise ValueError(f"sampling must be 'rand' or 'uniform', got {sampling!r}")
    return edges[:-1] + offsets * (edges[1:] - edges[:-1])


def chunk_path(root: str | Path, video_uid: str, chunk: int) -> Path:
    """``<root>/<video_uid>/<chunk>.mp4``. An id that is not one plain folder name (``..``,
    ``a/b``, ``/etc``) is refused, so that reading never leaves ``root``."""
    if not is_video_uid(video_uid):
        raise ValueError(f"video_uid {video_uid!r} is not a video id ({VIDEO_UID_RULE}); "
                         f"refusing to read outside {root}")
    return Path(root) / video_uid / f"{chunk}.mp4"


def read_clip_frames(root: str | Path, video_uid: str, start: float, end: float, num_frames: int,
                     sampling: str = "uniform", chunk_seconds: float = 600.0,
                     rng: np.random.Generator | None = None) -> torch.Tensor:
    """``num_frames`` RGB frames of the clip ``[start, end]`` (seconds), uint8 ``[T, H, W, 3]``."""
    return read_frames(root, video_uid, sample_times(start, end, num_frames, sampling, rng), chunk_seconds)


def read_frames(root: str | Path, video_uid: str, times: np.ndarray, chunk_seconds: float = 600.0) -> torch.Tensor:
    """The frames shown at ``times`` (seconds from the video's start), uint8 ``[T, H, W, 3]``.

    Each chunk is opened once; a clip crossing a chunk boundary reads each frame from the chunk
    that holds its time.
    """
    times = np.asarray(times, dtype=np.float64)
    if (times < 0).any():
        raise ValueError(f"negative time in {times.tolist()} for video {video_uid}")
    chunks = np.floor(times / chunk_seconds).astype(np.int64)
    frames: list[np.ndarray | None] = [None] * len(times)
    for chunk in np.unique(chunks):
        which = np.flatnonzero(chunks == chunk)
        decoded = read_chunk_frames(chunk_path(root, video_uid, int(chunk)), times[which] - chunk * chunk_seconds)
        for i, frame in zip(which, decoded):
            frames[i] = frame
    if len({f.shape for f in frames}) > 1:
        raise VideoReadError(f"{Path(root) / video_uid}: chunks differ in frame size "
                             f"({sorted({f.shape for f in frames})})")
    return torch.from_numpy(np.stack(frames))


def read_chunk_frames(path: Path, times: np.ndarray) -> list[np.ndarray]:
    """The frames of one file shown at ``times`` (seconds from the file's start), as
    ``[H, W, 3]`` uint8 arrays in the order of ``times``."""
    import av  # PyAV only where a video is read: the model and the GPU tests run without it

    asked = ", ".join(f"{t:.3f}" for t in times)
    if not path.is_file():
        missing = "not a regular file" if path.exists() else "no such video file"
        raise VideoReadError(f"{path}: {missing} (asked for t={asked} s in it)")
    try:
        with av.open(str(path)) as container:
            return _decode_at(container, times)
    except VideoReadError as err:
        raise VideoReadError(f"{path}: {err} (asked for t={asked} s in it)") from None
    except (av.FFmpegError, OSError, ValueError, IndexError) as err:
        raise VideoReadError(f"{path}: cannot decode: {err} (asked for t={asked} s in it)") from err


def stream_header(stream) -> tuple[Fraction, int]:
    """A video stream's frame rate and frame count, as its container's header states them."""
    fps = stream.average_rate or stream.guessed_rate
    if not fps:
        raise VideoReadError("unknown frame rate")
    num_frames = stream.frames or (round(float(stream.duration * stream.time_base * fps)) if stream.duration else 0)
    if num_frames <= 0:
        raise VideoReadError("no frame count or duration in the file")
    return Fraction(fps), num_frames


def video_header(path: Path) -> tuple[Fraction, int]:
    """The frame rate and frame count of a video file (its first video stream), from its header."""
    import av  # PyAV only where a video is read

    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError("no video stream")
            return stream_header(container.streams.video[0])
    except VideoReadError as err:
        raise VideoReadError(f"{path}: {err}") from None
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoReadError(f"{path}: cannot open: {err}") from err


def frame_rate(path: Path) -> Fraction:
    """The frame rate of a video file, as :func:`read_chunk_frames` takes it."""
    return video_header(path)[0]


def read_frames_by_index(path: Path, frame_ids: Callable[[Fraction], np.ndarray]) -> torch.Tensor:
    """The frames numbered ``frame_ids(fps)`` of one video file, counted at the file's own frame rate
    from 0 (clamped to its last frame), uint8 ``[T, H, W, 3]``."""
    fps = frame_rate(path)
    times = (np.asarray(frame_ids(fps), dtype=np.float64) + 0.5) / float(fps)
    return torch.from_numpy(np.stack(read_chunk_frames(path, times)))


def _decode_at(container, times: np.ndarray) -> list[np.ndarray]:
    if not container.streams.video:
        raise VideoReadError("no video stream")
    stream = container.streams.video[0]
    # One thread: DataLoader workers already use every core, and frame threading would delay
    # the first frame after every seek.
    stream.thread_count = 1
    fps, num_frames = stream_header(stream)
    length = num_frames / float(fps)
    if times.max(initial=0.0) > length + END_TOLERANCE_SECONDS:
        raise VideoReadError(f"t={times.max():.3f} s is past the end of the file ({length:.3f} s of frames, "
                             f"read up to {END_TOLERANCE_SECONDS} s beyond)")
    clock = _FrameClock(stream, fps)

    wanted = np.minimum(np.floor(times * float(fps) + _EPS).astype(np.int64), num_frames - 1)
    seek_ahead = max(1, math.ceil(SEEK_AHEAD_SECONDS * fps))
    found: dict[int, np.ndarray] = {}
    decoder, current, last = None, None, None
    for target in np.unique(wanted):
        target = int(target)
        if decoder is None or target - current > seek_ahead:
            decoder, current, last = _seek(container, stream, clock, target), None, None
        # The frame the decoder stopped at may already serve this target (a variable-rate gap).
        frame = last if last is not None and current >= target else None
        while frame is None and (candidate := next(decoder, None)) is not None:
            last, current = candidate, clock.index(candidate)
            if candidate.is_corrupt:
                raise VideoReadError(f"the decoder reports frame {current} (t={float(current / fps):.3f} s) as corrupt")
            if current >= target:
                frame = candidate
        if frame is None:
            if last is None or current < num_frames - 2:
                reached = "no frame" if last is None else f"frame {current}"
                raise VideoReadError(f"decoding stopped at {reached} of {num_frames} before frame {target} "
                                     "(truncated or corrupt file?)")
            frame = last  # The container's count may overstate the frames by one.
        found[target] = _to_rgb(frame)
    return [found[int(t)] for t in wanted]


def _to_rgb(frame) -> np.ndarray:
    if getattr(_local, "pid", None) != os.getpid():
        from av.video.reformatter import VideoReformatter

        _local.pid, _local.reformatter = os.getpid(), VideoReformatter()
    return _local.reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


def _seek(container, stream, clock: _FrameClock, target: int):
    """A decoder positioned at the keyframe before frame ``target``. If the demuxer lands after
    the target (an imprecise index), decode from the start instead."""
    container.seek(clock.pts(target), stream=stream, backward=True, any_frame=False)
    decoder = container.decode(stream)
    first = next(decoder, None)
    if first is not None and clock.index(first) > target > 0:
        container.seek(clock.pts(0), stream=stream, backward=True, any_frame=False)
        decoder = container.decode(stream)
        first = next(decoder, None)
    return decoder if first is None else itertools.chain([first], decoder)


class _FrameClock:
    """Frame index <-> timestamp of one stream, from the stream's start."""

    def __init__(self, stream, fps: Fraction):
        self.time_base = stream.time_base
        self.start = stream.start_time or 0
        self.fps = fps

    def pts(self, index: int) -> int:
        return self.start + math.floor(index / self.fps / self.time_base)

    def index(self, frame) -> int:
        if frame.pts is None:
            raise VideoReadError("a frame without a timestamp")
        return round((frame.pts - self.start) * self.time_base * self.fps)
