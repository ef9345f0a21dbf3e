"""``svitt-ego prepare-videos``: raw Ego4D videos -> the chunked layout the loader reads.

``SRC/<video_uid>.mp4`` becomes ``DST/<video_uid>/<k>.mp4``: h264, short side ``short_side``
(aspect kept, even sizes), the source's frame rate, frame ``j`` of chunk ``k`` being the
source's ``j``-th frame in ``[k * chunk_seconds, (k + 1) * chunk_seconds)``. Only PyAV is used.

Resumable: every chunk is written under a temporary name and renamed when complete, and
``DST/<video_uid>/chunks.json`` is written last, listing the settings and each chunk with its
size in bytes; a video whose manifest matches the settings and whose chunks all exist with those
sizes is skipped. The manifest is deleted before the first chunk of a video is replaced, so a
run killed midway leaves a video that is redone, never old and new chunks counted as done;
chunks of an earlier preparation that the new one does not write are deleted.

Nothing is written outside ``DST``: a source whose name is not a video id (``...mp4`` would
name ``DST/..``) is reported as failed. So is a source that decodes short of its declared
duration or with corrupt frames; see :func:`prepare_video`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import stat
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter
from tqdm import tqdm

from svitt_ego.atomic import atomic_write_bytes, fsync_folder, staging_path
from svitt_ego.data.errors import VIDEO_UID_RULE, is_video_uid
from svitt_ego.data.video import END_TOLERANCE_SECONDS

MANIFEST = "chunks.json"
# A keyframe every second: a clip's frames are then at most a second of decoding away.
KEYFRAME_SECONDS = 1.0
ENCODER_OPTIONS = {"crf": "23", "preset": "veryfast"}


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def prepare_videos(src: str | Path, dst: str | Path, short_side: int = 256, chunk_seconds: float = 600.0,
                   workers: int = 4, uids: list[str] | None = None) -> Summary:
    """Convert every ``SRC/*.mp4`` (only ``SRC/<uid>.mp4`` of ``uids`` when given; a missing one fails)
    with ``workers`` processes. A video that fails is reported (and listed in ``Summary.failed``) without
    stopping the others."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    summary = Summary()
    if uids is None:
        sources = sorted(src.glob("*.mp4"))
    else:
        sources = [src / f"{uid}.mp4" for uid in dict.fromkeys(uids)]
        summary.failed = [(str(s), "no such file (listed in --uids)") for s in sources if not s.is_file()]
        sources = [s for s in sources if s.is_file()]
    missing = len(summary.failed)
    jobs = [(source, dst / source.stem, short_side, chunk_seconds) for source in sources]
    progress = tqdm(total=len(jobs), unit="video", desc="prepare-videos")
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.Pool(min(workers, len(jobs))) as pool:
            for result in pool.imap_unordered(_run_job, jobs):
                _record(summary, result, progress)
    else:
        for job in jobs:
            _record(summary, _run_job(job), progress)
    progress.close()
    print(f"prepare-videos: {summary.done} converted, {summary.skipped} already done, "
          f"{len(summary.failed)} failed, of {len(sources) + missing} videos in {src}")
    for path, error in summary.failed:
        print(f"  failed: {path}: {error}")
    return summary


def _record(summary: Summary, result: tuple[str, str, str | None], progress: tqdm) -> None:
    status, path, error = result
    if status == "done":
        summary.done += 1
    elif status == "skipped":
        summary.skipped += 1
    else:
        summary.failed.append((path, error))
        progress.write(f"prepare-videos: {path}: {error}")
    progress.update()


def _run_job(job: tuple[Path, Path, int, float]) -> tuple[str, str, str | None]:
    source, out_dir, short_side, chunk_seconds = job
    if not is_video_uid(source.stem):
        return "failed", str(source), f"{source.stem!r} is not a video id ({VIDEO_UID_RULE})"
    if not source.is_file():  # a FIFO would block the open
        return "failed", str(source), "not a regular file"
    if is_prepared(out_dir, short_side, chunk_seconds):
        return "skipped", str(source), None
    try:
        prepare_video(source, out_dir, short_side, chunk_seconds)
    except Exception as err:  # noqa: BLE001 - one bad input must not stop the others
        return "failed", str(source), f"{type(err).__name__}: {err}"
    return "done", str(source), None


def is_prepared(out_dir: Path, short_side: int, chunk_seconds: float) -> bool:
    """Whether ``out_dir`` holds a complete preparation at these settings: its manifest says so
    and lists each chunk with the size the file has."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    chunks, sizes = manifest.get("chunks"), manifest.get("sizes")
    if not (isinstance(chunks, list) and chunks and isinstance(sizes, dict) and list(sizes) == list(map(str, chunks))):
        return False
    return (manifest.get("short_side") == short_side and manifest.get("chunk_seconds") == chunk_seconds
            and all(_size(out_dir / f"{k}.mp4") == size for k, size in sizes.items()))


def _size(path: Path) -> int | None:
    """The size of a regular file (not a link), or None."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is ``short_side``, keep the aspect, round both sides to even
    numbers (yuv420p needs them)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def prepare_video(source: Path, out_dir: Path, short_side: int = 256, chunk_seconds: float = 600.0) -> list[int]:
    """Write the chunks of one video and then its manifest; return the chunk numbers.

    A source that decodes short of the duration its container declares (a truncated download),
    or with frames the decoder reports as corrupt (it conceals damaged data instead of failing),
    raises ``ValueError``; the chunks written for it are then removed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here on the folder is not counted as done
    fsync_folder(out_dir)
    written: list[Path] = []
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = Fraction(stream.average_rate or stream.guessed_rate or 0)
            if not rate:
                raise ValueError("unknown frame rate")
            size = output_size(stream.codec_context.width, stream.codec_context.height, short_side)
            chunks, decoded, corrupt = _write_chunks(container, stream, out_dir, size, rate, chunk_seconds, written)
            _check_decoded(container, stream, decoded, corrupt)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for stale in out_dir.glob("*.mp4"):
        if stale not in written:
            stale.unlink()
    manifest = {"chunks": chunks, "sizes": {str(k): (out_dir / f"{k}.mp4").stat().st_size for k in chunks},
                "fps": str(rate), "width": size[0], "height": size[1], "short_side": short_side,
                "chunk_seconds": chunk_seconds}
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest).encode())
    return chunks


def _write_chunks(container, stream, out_dir: Path, size: tuple[int, int], rate: Fraction, chunk_seconds: float,
                  written: list[Path]) -> tuple[list[int], Fraction, list[Fraction]]:
    """Decode, resize and write every frame; ``written`` collects the finished chunk files.
    Returns the chunk numbers, the decoded duration and the times of corrupt frames."""
    chunks: list[int] = []
    corrupt: list[Fraction] = []
    writer, end = None, Fraction(0)
    start = stream.start_time or 0
    resize = VideoReformatter()
    try:
        for index, frame in enumerate(container.decode(stream)):
            # Without timestamps, assume a constant rate.
            time = (frame.pts - start) * stream.time_base if frame.pts is not None else index / rate
            if frame.is_corrupt:
                corrupt.append(time)
            chunk = math.floor(time / Fraction(chunk_seconds))
            if writer is None or chunk != writer.chunk:
                if writer is not None:
                    written.append(writer.close())
                writer = _ChunkWriter(out_dir, chunk, *size, rate, first_time=time)
                chunks.append(chunk)
            writer.write(resize.reformat(frame, *size, "yuv420p", interpolation="AREA", threads=1), time)
            end = max(end, time + 1 / rate)
        if writer is None:
            raise ValueError("no frames decoded")
        written.append(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return chunks, end, corrupt


def _check_decoded(container, stream, decoded: Fraction, corrupt: list[Fraction]) -> None:
    if corrupt:
        raise ValueError(f"the decoder reports {len(corrupt)} corrupt frame(s), the first at "
                         f"{float(corrupt[0]):.2f} s (damaged file?)")
    if stream.duration is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / av.time_base
    else:
        return
    # A cut download still opens when its index is at the front: it decodes short of its duration.
    if float(decoded) < declared - END_TOLERANCE_SECONDS:
        raise ValueError(f"decoded {float(decoded):.2f} s of the {declared:.2f} s the container declares "
                         "(truncated file?)")


class _ChunkWriter:
    """One output chunk, written to a temporary name and renamed by :meth:`close`.

    A frame's timestamp is its time after the chunk's first frame, in frames, so a constant-rate
    source gives frame j the timestamp j and a variable-rate one keeps its timing (to a frame)."""

    def __init__(self, out_dir: Path, chunk: int, width: int, height: int, rate: Fraction, first_time: Fraction):
        self.chunk, self.rate, self.first_time = chunk, rate, first_time
        self.path = out_dir / f"{chunk}.mp4"
        self.tmp = staging_path(self.path, ".part")
        self.container = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.gop_size = max(1, round(rate * Fraction(KEYFRAME_SECONDS)))
        self.stream.options = dict(ENCODER_OPTIONS)
        self.last_pts = -1

    def write(self, frame: av.VideoFrame, time: Fraction) -> None:
        self.last_pts = max(round((time - self.first_time) * self.rate), self.last_pts + 1)
        frame.pts, frame.time_base = self.last_pts, 1 / self.rate
        self.container.mux(self.stream.encode(frame))

    def close(self) -> Path:
        """Finish the file, flush it to disk and rename it; returns its final path."""
        self.container.mux(self.stream.encode())
        self.container.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        fsync_folder(self.path.parent)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)
