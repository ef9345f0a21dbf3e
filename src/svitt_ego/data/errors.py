"""The error the metadata readers raise for a missing or malformed file, and the JSON loading they share."""

from __future__ import annotations

import json
from pathlib import Path


class MetadataError(ValueError):
    """``egoclip.csv`` or ``egomcq.json`` is missing or malformed. The message is one line that
    names the file, the line (or question) and the field."""


def load_json(path: str | Path, error: type[MetadataError] = MetadataError, what: str = "JSON file"):
    """The parsed contents of a JSON file; a missing, unreadable, non-UTF-8, malformed or too deeply
    nested file raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read: {err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from None
    except ValueError as err:  # also an integer too long to convert
        raise error(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON: nested too deeply") from None
