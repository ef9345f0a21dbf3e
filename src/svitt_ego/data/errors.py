"""The error the metadata readers raise for a missing or malformed file, and the JSON loading they share."""

from __future__ import annotations

import json
from pathlib import Path


class MetadataError(ValueError):
    """``egoclip.csv``, ``egomcq.json`` or a tokenizer's ``vocab.txt`` is missing or malformed.
    The message is one line that names the file, the line (or question) and the field."""


def regular_file(path: str | Path, error: type[Exception], what: str) -> Path:
    """``path``, if it is a regular file (or a link to one); else ``error`` naming it. Checked
    before opening, since opening a FIFO blocks until someone writes to it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not a regular file ({what})" if path.exists() else f"{path}: no such {what}")
    return path


def load_json(path: str | Path, error: type[Exception] = MetadataError, what: str = "JSON file"):
    """The parsed contents of a JSON file; a missing, unreadable, non-UTF-8, malformed or too deeply
    nested file, or one with an object that repeats a key, raises ``error`` naming the file (and
    the key)."""
    path = regular_file(path, error, what)
    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_refuse_repeated_keys)
    except OSError as err:
        raise error(f"{path}: cannot read: {err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from None
    except ValueError as err:  # also an integer too long to convert
        raise error(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON: nested too deeply") from None


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; a key that appears twice would silently drop a value."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key[:100]!r} appears more than once in an object")
        seen.add(key)
    return dict(pairs)
