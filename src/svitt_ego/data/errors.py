"""The error the metadata readers raise for a missing or malformed file."""

from __future__ import annotations


class MetadataError(ValueError):
    """``egoclip.csv`` or ``egomcq.json`` is missing or malformed. The message is one line that
    names the file, the line (or question) and the field."""
