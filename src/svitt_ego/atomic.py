"""Atomic, durable writes: a uniquely named temporary file in the target's folder, fsynced, renamed
onto the target, then the folder fsynced.

A reader (or a resumed run) sees the old file or the whole new one, never a part of one, also
after a crash; writers in several processes never share a temporary file. A write that fails (a full
disk: ``OSError`` from the file system, ``RuntimeError`` from ``torch.save``, ``SafetensorError``,
``lmdb.Error``, Arrow's errors: whatever the writer raises) is a :class:`WriteError` naming the file,
which the CLI reports in one line.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from svitt_ego.untrusted import one_line


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...)."""

    def __init__(self, path: str | Path, cause: BaseException):
        self.path = Path(path)
        lines = str(cause).strip().splitlines()
        self.reason = getattr(cause, "strerror", None) or (lines[0] if lines else type(cause).__name__)
        super().__init__(one_line(f"{path}: could not write ({self.reason})"))


def fsync_folder(folder: str | Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a temporary file next to ``path`` (its folder is made if missing), then
    fsync it, rename it onto ``path`` and fsync the folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise WriteError(path, err) from None
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes it private (and some writers replace it with a private file of their own):
        # the file gets the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, WriteError):  # not an interrupt
            raise WriteError(path, err) from err
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data) -> Path:
    """``data`` as indented JSON; NaN and infinity are refused (they are not JSON)."""
    return atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch  # here, so that the writers that need no torch load none

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_copy(source: str | Path, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_save_png(image, path: str | Path) -> Path:
    """Write a PIL image to ``path`` as a PNG, atomically."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append ``row`` to ``path`` as one JSON line, flushed and fsynced: a crash loses at most the line
    being written, never an earlier one. NaN and infinity are refused, as by :func:`atomic_write_json`."""
    line = json.dumps(row, allow_nan=False) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
