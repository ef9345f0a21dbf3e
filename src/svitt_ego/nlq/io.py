"""Atomic writes: a uniquely named temporary file in the target's folder, fsynced, then renamed.

A reader (or a resumed run) sees either the old file or the whole new one, never a part;
concurrent writers (ranks) never share a temporary file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
