"""The run-folder guard: one writer per folder, nothing written through a link, nothing deleted that a
run of ours did not stage, a folder emptied only by the command that made it, resumes checked against
saved settings.

Every command that writes a folder of its own enters it through :func:`run_folder`, and writes
through :mod:`svitt_ego.atomic` (a staged name of its own comes from
:func:`svitt_ego.atomic.staging_path`)::

    with run_folder(out, "train-nlq"):            # refused if another process holds ``out``
        saved = ...                               # the settings the folder's state was made with
        refuse_changes(out / "last.pt", saved, current, allow_change)
        metrics = MetricsFile(out / "metrics.jsonl")
        atomic_torch_save(state, out / "last.pt") # its temporary file is journaled before it exists
        ...

    with run_folder(out, "export-nlq-features", fresh=True):   # new, empty, or this command's: emptied
        ...
    with run_folder(entry, "search", wait=show):  # waits (after ``show(holder)``) instead of refusing

The rules every writer gets from it:

- **One writer**: ``.lock`` (flock, naming its holder); the kernel releases it when the holder dies.
- **No links** directly inside the folder (the folder itself may be one).
- **Only its maker empties it** (``fresh``): a folder holding anything else without the command's
  :func:`marker` is refused.
- **Only journaled staging files are removed**: each staged name is appended to the folder's
  ``.staging-journal`` and fsynced before it is created (:class:`StagingJournal`); at the next entry,
  after the checks above, exactly what it lists is removed (inside the folder, through no link). A
  folder without a journal (new, or an earlier version's) holds no staging files of ours.
- **A refused folder is left as it was**: the lock file this entry created is removed again.

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
import stat
import time
from pathlib import Path
from typing import Callable

from svitt_ego.atomic import WriteError, fsync_folder, hold_journal
from svitt_ego.config import ConfigError
from svitt_ego.distributed import decide_on_main, is_main

log = logging.getLogger(__name__)

LOCK = ".lock"
JOURNAL = ".staging-journal"
# The names :func:`svitt_ego.atomic.staging_path` gives: ``.<name>.<16 hex digits>`` (a staged folder)
# with ``.tmp`` (atomic writes) or ``.part`` (prepare-videos' chunks). A journal line naming anything else
# is ignored.
_STAGED = re.compile(r"^\..+\.[0-9a-f]{16}(?:\.tmp|\.part)?$")
# Folders this process holds: a command run inside another one's guard (the demo's pretraining) shares it.
_held: set[str] = set()


class RunFolderError(FileExistsError):
    """A run folder is in use by another run, holds a link, or holds files this command may not replace."""


def marker(command: str) -> str:
    """The file that says ``command`` made a folder, and so may delete it when it starts afresh."""
    return f".made-by-svitt-ego-{command}"


def is_bookkeeping(name: str) -> bool:
    """Whether a file of a run folder is the guard's own: its lock, staging journal or a marker."""
    return name in (LOCK, JOURNAL) or name.startswith(marker(""))


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

    ``flock`` is released by the kernel when the holder dies, so a killed run leaves no stale lock. A
    lock file this run created is removed again by :meth:`release` with ``discard``, when the folder
    was refused; a run that then takes it checks it still has the file the folder holds.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self._fd: int | None = None
        self.created = False

    def try_acquire(self, wait: Callable[[str], None] | None = None) -> str | None:
        """Take the lock; returns None, or why not (naming the holder). With ``wait``, a lock held by
        another run is waited for instead, after ``wait(holder)``."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd, self.created = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
                if wait is None:
                    os.close(fd)
                    return (f"{self.path.parent} is in use by another run ({holder}); wait for it to end or choose "
                            "another folder")
                wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it meanwhile: take the one the folder holds now
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd
        return None

    def _open(self) -> tuple[int, bool]:
        """The lock file's descriptor, and whether this call created it."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), True
        except FileExistsError:
            return open_no_follow(self.path, os.O_RDWR), False
        except OSError as err:
            raise WriteError(self.path, err) from None

    def release(self, discard: bool = False) -> None:
        if self._fd is not None:
            if discard and self.created:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        error = self.try_acquire()
        if error:
            raise RunFolderError(error)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def run_folder(folder: str | Path, command: str, fresh: bool = False, wait: Callable[[str], None] | None = None):
    """Hold ``folder`` for ``command`` for the block (made if missing; yields its path).

    On entering, in this order: take the lock (refused, naming the holder, if another process holds
    it; with ``wait``, ``wait(holder)`` is called and the lock waited for); refuse any symbolic link
    directly inside the folder (the folder itself may be a link, to another disk say); with
    ``fresh``, empty the folder if ``command`` made it (its :func:`marker`) and refuse it if it holds
    anything else; then remove the staging files a killed run listed in the folder's journal.
    While the block runs, every staged name under the folder is journaled first
    (:func:`svitt_ego.atomic.staging_path`). A refusal, or a block that raises, removes the lock file
    if this entry made it (and the folder if it made it and it is empty).
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:  # a command inside another one's guard: the outer one holds the folder
        error = decide_on_main(lambda: _enter(folder, command, fresh, None, None))
        if error:
            raise RunFolderError(error)
        yield folder
        return
    made = not os.path.lexists(folder)
    lock = RunLock(folder)
    error = decide_on_main(lambda: _enter(folder, command, fresh, lock, wait))
    if error:
        _leave(folder, lock, made, failed=True)
        raise RunFolderError(error)
    _held.add(key)
    journal = StagingJournal(folder)
    hold_journal(folder, journal.record)
    failed = True
    try:
        yield folder
        failed = False
    finally:
        hold_journal(folder, None)
        journal.close()
        _held.discard(key)
        _leave(folder, lock, made, failed)


def _leave(folder: Path, lock: RunLock, made: bool, failed: bool) -> None:
    """Release the lock; after a refusal or a failure, remove the lock file if this entry made it, and the
    folder if this entry made it and it is empty."""
    lock.release(discard=failed)
    if failed and made:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _enter(folder: Path, command: str, fresh: bool, lock: RunLock | None, wait) -> str | None:
    """:func:`run_folder`'s work on rank 0: None, or why the folder is refused. A nested entry (no
    ``lock``) checks links and ``fresh`` only."""
    try:
        error = lock.try_acquire(wait) if lock is not None else None
        if error is None:
            error = _refuse_links(folder) or (_start_afresh(folder, command) if fresh else None)
        if error is None and lock is not None:
            StagingJournal(folder).clean()
    except OSError as err:  # the one-line errors above, and a folder that cannot be made or read
        error = str(err) if isinstance(err, (RunFolderError, WriteError)) else f"{folder}: {err.strerror or err}"
    return error


def _refuse_links(folder: Path) -> str | None:
    links = sorted(p.name for p in folder.iterdir() if p.is_symlink())
    if links:
        return (f"{folder} holds symbolic links ({', '.join(links[:5])}); svitt-ego writes nothing through a link "
                "in a run folder: remove them")
    return None


def start_afresh(folder: Path, command: str) -> None:
    """Empty a held ``folder`` (all but the guard's lock and journal) if ``command`` made it, then mark it;
    refuse anyone else's."""
    error = _refuse_links(folder) or _start_afresh(folder, command)
    if error:
        raise RunFolderError(error)


def _start_afresh(folder: Path, command: str) -> str | None:
    entries = [p for p in folder.iterdir() if p.name not in (LOCK, JOURNAL)]
    if entries and not (folder / marker(command)).exists():
        return (f"{folder} exists and was not made by svitt-ego {command}; move it away or choose another "
                "folder")
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    os.close(open_no_follow(folder / marker(command), os.O_WRONLY | os.O_CREAT))
    return None


class StagingJournal:
    """A run folder's ``.staging-journal``: the staged names under it, one JSON string (a path relative to
    the folder) a line, each appended and fsynced before it is created.

    Only what a journal lists is ever removed as a killed run's leftover, and only once the folder is
    held (:func:`run_folder`): an entry inside the folder, reached through no link, named as
    :func:`svitt_ego.atomic.staging_path` names. A folder without a journal (new, or written by an
    earlier version) holds no staging files of ours. Every process of a run appends to it (``O_APPEND``).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL
        self._fd: int | None = None

    def record(self, staged: Path) -> None:
        """List ``staged`` (a path under the folder), durably."""
        relative = os.path.relpath(os.path.join(os.path.realpath(staged.parent), staged.name),
                                   os.path.realpath(self.folder))
        if self._fd is None:
            self._fd = open_no_follow(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(self._fd, (json.dumps(relative) + "\n").encode())
            os.fsync(self._fd)
        except OSError as err:
            raise WriteError(self.path, err) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def clean(self) -> list[Path]:
        """Remove what the journal lists that is still there, then the journal; returns what was removed."""
        if not os.path.lexists(self.path):
            return []
        with os.fdopen(open_no_follow(self.path, os.O_RDONLY), "rb") as f:  # line by line: it may be long
            listed = (self._listed(line.decode(errors="replace")) for line in f)
            removed = [path for path in listed if path is not None and _remove(path)]
        self.path.unlink()
        fsync_folder(self.folder)
        if removed:
            log.info("removed %d staging files left by a killed run: %s", len(removed),
                     ", ".join(str(p.relative_to(self.folder)) for p in removed[:5]))
        return removed

    def _listed(self, line: str) -> Path | None:
        """The path a journal line names, if it is one of ours inside the folder reached through no link."""
        try:
            relative = json.loads(line)
        except ValueError:
            return None
        if not isinstance(relative, str) or os.path.isabs(relative):
            return None
        parts = Path(relative).parts
        if not parts or any(part in ("", ".", "..") for part in parts) or not _STAGED.match(parts[-1]):
            return None
        path = self.folder
        for part in parts[:-1]:
            path = path / part
            if path.is_symlink() or not path.is_dir():
                return None
        return path / parts[-1]


def _remove(path: Path) -> bool:
    """Remove a staged file or folder (never a link's target); whether there was one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    elif stat.S_ISREG(mode):
        path.unlink()
    else:
        return False
    return True


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
