"""Helpers shared by several test files: small generated videos whose frames carry their index."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT, BITS = 64, 48, 8


def draw_code(index: int, chunk: int) -> np.ndarray:
    """A frame whose top half shows ``index`` and bottom half ``chunk`` as 8 black/white bars."""
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    bar = WIDTH // BITS
    for row, value in ((0, index), (1, chunk)):
        for bit in range(BITS):
            if value >> bit & 1:
                image[row * HEIGHT // 2:(row + 1) * HEIGHT // 2, bit * bar:(bit + 1) * bar] = 255
    return image


def read_code(image: np.ndarray) -> tuple[int, int]:
    """Inverse of :func:`draw_code`, robust to compression (looks at the bars' centres)."""
    bar, half = WIDTH // BITS, HEIGHT // 2
    values = []
    for row in range(2):
        centres = image[row * half + 4:(row + 1) * half - 4].astype(float).mean(axis=(0, 2))
        bits = [centres[bit * bar + 2:(bit + 1) * bar - 2].mean() > 128 for bit in range(BITS)]
        values.append(sum(1 << bit for bit, on in enumerate(bits) if on))
    return values[0], values[1]


def write_video(path: Path, frames: list[np.ndarray], fps: Fraction, gop: int = 15, faststart: bool = False) -> Path:
    """An h264 mp4 of ``frames``; with ``faststart`` its index comes before the frames, so that
    a cut copy still opens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.gop_size = gop
        stream.options = {"crf": "12", "preset": "veryfast"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / fps
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_chunked_video(root: Path, video_uid: str, seconds: float, fps: Fraction, chunk_seconds: float) -> list[int]:
    """A video cut into chunks like ``prepare_videos`` does; frame j of chunk k shows (j, k).
    Returns the number of frames of each chunk."""
    counts = []
    for chunk in range(math.ceil(seconds / chunk_seconds)):
        length = min(chunk_seconds, seconds - chunk * chunk_seconds)
        count = math.ceil(length * fps)
        write_video(root / video_uid / f"{chunk}.mp4", [draw_code(j, chunk) for j in range(count)], fps)
        counts.append(count)
    return counts


def corrupt_concealed(path: Path) -> int:
    """Flip bytes spread over the frame data of the mp4 at ``path`` until FFmpeg decodes every
    frame without an error but reports some as corrupt (it conceals the damage). Returns the
    number of frames it reports as corrupt."""
    data = path.read_bytes()
    start, end = data.find(b"mdat") + 8, data.find(b"moov")
    end = end if end > start else len(data)
    num_frames = len(_decode_all(path))
    for step in range(301, 401, 2):
        damaged = bytearray(data)
        for position in range(start + 200, end - 8, step):
            damaged[position] ^= 0x55
        path.write_bytes(damaged)
        try:
            frames = _decode_all(path)
        except av.FFmpegError:
            continue
        corrupt = sum(frame.is_corrupt for frame in frames)
        if corrupt and len(frames) == num_frames:
            return corrupt
    raise AssertionError(f"found no damage to {path} that FFmpeg conceals")


def _decode_all(path: Path) -> list:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))
