"""Atomic, durable writes: a uniquely named temporary file in the target's folder, fsynced, renamed
onto the target, then the folder fsynced.

A reader (or a resumed run) sees the old file or the whole new one, never a part of one, also
after a crash; writers in several processes never share a temporary file. A write that fails (a full
disk: ``OSError`` from the file system, ``RuntimeError`` from ``torch.save``, ``SafetensorError``,
``lmdb.Error``, Arrow's errors: whatever the writer raises) is a :class:`WriteError` naming the file,
which the CLI reports in one line.

Every staged name (this module's temporary files, prepare-videos' ``.part`` chunks, save_pretrained's
staged folders) comes from :func:`staging_path`, which lists it in the staging journal of the run folder
holding it (:mod:`svitt_ego.run_folder`) before it is created, so a killed writer's leftovers are known
as ours by more than their name.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from svitt_ego.untrusted import one_line


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...)."""

    def __init__(self, path: str | Path, cause: BaseException):
        self.path = Path(path)
        lines = str(cause).strip().splitlines()
        self.reason = (getattr(cause, "reason", None) or getattr(cause, "strerror", None)  # a WriteError: its reason
                       or (lines[0] if lines else type(cause).__name__))
        super().__init__(one_line(f"{path}: could not write ({self.reason})"))


def fsync_folder(folder: str | Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InputAsOutputError(FileExistsError):
    """An output path names one of the command's inputs."""


def refuse_input_as_output(output: str | Path | None, inputs) -> None:
    """Refuse ``output`` when it is the same file or folder as one of ``inputs`` (followed through links
    and hard links): svitt-ego never writes over what it reads."""
    if output is None or not os.path.exists(output):
        return
    for source in inputs:
        if source is not None and os.path.exists(source) and os.path.samefile(output, source):
            raise InputAsOutputError(f"{output} is also an input of this command ({source}); svitt-ego never "
                                     "writes over its inputs: choose another output")


# Folders held by a run (svitt_ego.run_folder): their realpath -> the function that lists a staged path
# in the folder's journal.
_journals: dict[str, Callable[[Path], None]] = {}


def hold_journal(folder: str | Path, record: Callable[[Path], None] | None) -> None:
    """Have :func:`staging_path` list the staged names under ``folder`` through ``record`` (None: stop)."""
    key = os.path.realpath(folder)
    if record is None:
        _journals.pop(key, None)
    else:
        _journals[key] = record


def staging_path(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new name beside ``path`` for what will become it, ``.<name>.<16 hex digits><suffix>``, first listed
    (fsynced) in the journal of the held run folder it is in, if any. The caller creates it."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}{suffix}")
    folder = os.path.realpath(staged.parent)
    while True:
        if folder in _journals:
            _journals[folder](staged)
            break
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return staged


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
        tmp = staging_path(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        write(Path(tmp))
        # It is made private (and some writers replace it with a private file of their own):
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
