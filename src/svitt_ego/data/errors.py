"""The error the metadata readers raise for a missing or malformed file, and what they share: the JSON
loading, the one check of ids read from annotations (:func:`checked_id`) and of JSON numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from svitt_ego.untrusted import one_line, shown

# A video id is one plain folder name under the video root: ASCII letters, digits, '_', '-' and
# '.', not starting with '.' or '-' (so never '', '.', '..', a hidden name or a path), at most 128
# characters. The same rule, as an RE2 pattern, checks whole metadata columns.
VIDEO_UID_REGEX = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
VIDEO_UID_RULE = "letters, digits, '_', '-' and '.', not starting with '.' or '-', at most 128 characters"


class MetadataError(ValueError):
    """``egoclip.csv``, ``egomcq.json`` or a tokenizer's ``vocab.txt`` is missing or malformed.
    The message is one line that names the file, the line (or question) and the field (see
    :func:`svitt_ego.untrusted.one_line`)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def is_video_uid(value) -> bool:
    """Whether ``value`` may name a video folder under the video root (see ``VIDEO_UID_REGEX``)."""
    return isinstance(value, str) and re.fullmatch(VIDEO_UID_REGEX, value) is not None


def checked_id(value, where: str, error: type[Exception] | None = None) -> str:
    """``value`` if it is an id by ``VIDEO_UID_REGEX``; else ``error`` (:class:`MetadataError`) in one
    line, ``where`` naming the file, the line (or the entry) and the field. Every reader of ids from
    annotations (video ids, which name folders or files inside ``--videos``; clip and annotation ids,
    which name output files) checks them with it, so that none names a path outside its folder."""
    if not is_video_uid(value):
        raise (error or MetadataError)(f"{where}: {not_an_id(value)}")
    return value


def not_an_id(value) -> str:
    """Why ``value`` is refused as an id (the readers that check whole columns at once say it too)."""
    return (f"{shown(value)} is not an id ({VIDEO_UID_RULE}): an id names a plain folder or file inside its "
            "folder, never a path")


def json_number(value) -> float | None:
    """A JSON number (an int or a float, not a bool) as a finite float; None for anything else, an
    integer too large for a float (400 digits) included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


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
