"""The run-folder guard: one writer per folder, nothing written through a link, a killed writer's staging
files removed, a folder deleted only by the command that made it, resumes checked against saved settings.

Every command that writes a folder of its own (``pretrain``, ``train-nlq``, ``demo``, ``prepare-videos``,
feature extraction) enters it through :func:`run_folder`::

    with run_folder(out, "train-nlq"):            # refused if another process holds ``out``
        saved = ...                               # the settings the folder's state was made with
        refuse_changes(out / "last.pt", saved, current, allow_change)
        metrics = MetricsFile(out / "metrics.jsonl")
        ...

Under torchrun every rank enters; rank 0 does the work and every rank raises the same error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from svitt_ego.atomic import WriteError
from svitt_ego.config import ConfigError
from svitt_ego.distributed import decide_on_main, is_main

log = logging.getLogger(__name__)

LOCK = ".lock"
# What a killed writer leaves behind: atomic_write's ``.<name>.<random>.tmp``, prepare-videos' ``*.part``,
# and save_pretrained's staged and retired folders ``.<name>.<random>`` / ``.<name>.old.<random>``.
_STAGED_FILE = re.compile(r"^\..+\.tmp$|\.part$")
_STAGED_FOLDER = re.compile(r"^\.(?P<target>.+?)\.(?:old\.)?[a-z0-9_]{8}$")
# Folders this process holds: a command run inside another one's guard (the demo's pretraining) shares it.
_held: set[str] = set()


class RunFolderError(FileExistsError):
    """A run folder is in use by another run, holds a link, or holds files this command may not replace."""


def marker(command: str) -> str:
    """The file that says ``command`` made a folder, and so may delete it when it starts afresh."""
    return f".made-by-svitt-ego-{command}"


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (``O_NOFOLLOW``) with one line naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link; svitt-ego writes nothing through a link in a run "
                                 "folder: remove it") from None
        raise WriteError(path, err) from None


class RunLock:
    """An exclusive lock on a run folder (``.lock``, naming its holder) while a run writes into it.

    ``flock`` is released by the kernel when the holder dies, so a killed run leaves no stale lock.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take the lock; returns None, or why not (naming the holder)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return (f"{self.path.parent} is in use by another run ({holder}); wait for it to end or choose "
                    "another folder")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        error = self.try_acquire()
        if error:
            raise RunFolderError(error)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_folder(folder: str | Path, command: str, fresh: bool = False):
    """Hold ``folder`` for ``command`` for the block (made if missing; yields its path).

    On entering, in this order: take the lock (refused, naming the holder, if another process holds
    it); refuse any symbolic link directly inside the folder (the folder itself may be a link, to
    another disk say); with ``fresh``, empty the folder if ``command`` made it (its :func:`marker`)
    and refuse it if it holds anything else; remove the staging files a killed writer left.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    lock = RunLock(folder)
    nested = key in _held
    error = decide_on_main(lambda: _enter(folder, command, fresh, None if nested else lock))
    if error:
        raise RunFolderError(error)
    if not nested:
        _held.add(key)
    try:
        yield folder
    finally:
        if not nested:
            _held.discard(key)
            lock.release()


def _enter(folder: Path, command: str, fresh: bool, lock: RunLock | None) -> str | None:
    """:func:`run_folder`'s work on rank 0: None, or why the folder is refused (the lock then released)."""
    try:
        error = lock.try_acquire() if lock is not None else None
        if error is None:
            error = _refuse_links(folder) or (_start_afresh(folder, command) if fresh else None)
        if error is None:
            remove_staging(folder)
    except OSError as err:  # the one-line errors above, and a folder that cannot be made or read
        error = str(err) if isinstance(err, (RunFolderError, WriteError)) else f"{folder}: {err.strerror or err}"
    if error is not None and lock is not None:
        lock.release()
    return error


def _refuse_links(folder: Path) -> str | None:
    links = sorted(p.name for p in folder.iterdir() if p.is_symlink())
    if links:
        return (f"{folder} holds symbolic links ({', '.join(links[:5])}); svitt-ego writes nothing through a link "
                "in a run folder: remove them")
    return None


def _start_afresh(folder: Path, command: str) -> str | None:
    """Empty ``folder`` (all but the lock) if ``command`` made it, then mark it; refuse anyone else's."""
    entries = [p for p in folder.iterdir() if p.name != LOCK]
    if entries and not (folder / marker(command)).exists():
        return (f"{folder} exists and was not made by svitt-ego {command}; move it away or choose another "
                "folder")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    os.close(open_no_follow(folder / marker(command), os.O_WRONLY | os.O_CREAT))
    return None


def remove_staging(folder: Path) -> list[Path]:
    """Delete what killed writers left in ``folder``'s tree (links are not followed) and return it.

    Staged files are never the only copy of anything. A staged folder is deleted only when the folder
    it was staged for is in place; otherwise it may hold the only copy, and stays.
    """
    removed = []
    for root, dirs, files in os.walk(folder):
        root = Path(root)
        for name in files:
            if _STAGED_FILE.search(name):
                (root / name).unlink()
                removed.append(root / name)
        for name in list(dirs):
            staged = _STAGED_FOLDER.match(name)
            if staged and not (root / name).is_symlink() and (root / staged["target"]).is_dir():
                shutil.rmtree(root / name)
                removed.append(root / name)
                dirs.remove(name)
    if removed:
        log.info("removed %d staging files left by a killed run: %s", len(removed),
                 ", ".join(str(p.relative_to(folder)) for p in removed[:5]))
    return removed


# --------------------------------------------------------------------------- resume checks


def flatten(settings: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}`` (lists of plain values stay whole)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_changes(saved: dict, current: dict, may_change: tuple[str, ...] = ()) -> dict[str, tuple]:
    """``{key: (saved, current)}`` for every flattened setting that differs and does not start with one
    of ``may_change``."""
    old, new = flatten(saved), flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not key.startswith(may_change)}


def refuse_changes(path: Path, changes: dict[str, tuple], allow_change: bool) -> None:
    """Refuse to continue ``path`` (the saved state) with ``changes``, naming each key, unless allowed
    (then logged). ``changes`` is what :func:`settings_changes` returns."""
    if not changes:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if not allow_change:
        raise ConfigError(f"{path} was saved with other settings: {listed}; resume with the run's own settings "
                          "or pass --allow-config-change")
    if is_main():
        log.warning("resuming %s with changed settings (allowed): %s", path, listed)


# --------------------------------------------------------------------------- metrics.jsonl


class MetricsFile:
    """A run's ``metrics.jsonl``: one JSON record a line, appended and flushed, never through a link.

    A checkpoint stores :attr:`size`; a resumed run calls :meth:`rewind` with it (a fresh run with 0),
    so the records of steps that are run again are not logged twice.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = open_no_follow(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def rewind(self, size: int | None) -> None:
        """Cut the file back to ``size`` bytes (None: keep it whole, for checkpoints that did not say)."""
        if size is not None and size < self.size:
            os.ftruncate(self._fd, size)

    def write(self, record: dict) -> None:
        try:
            os.write(self._fd, (json.dumps(record) + "\n").encode())
        except OSError as err:
            raise WriteError(self.path, err) from None

    def close(self) -> None:
        os.close(self._fd)
