"""Showing text that came from outside (file names, ids and values read from annotations) on a terminal
and in error messages.

:func:`printable` escapes what a terminal would act on (escape sequences, bells, line breaks, other
non-printable characters), so a name prints as one line of plain characters; :func:`shown` quotes a
value in a message, escaped and at most :data:`SHOWN_CHARACTERS` characters of it; :func:`one_line` is
what the project's error constructors (and the command line's error line) apply to a whole message.
"""

from __future__ import annotations

import re
import reprlib

# The most characters of one untrusted value an error message echoes.
SHOWN_CHARACTERS = 200

# A run without white space longer than that (an id, a path, a number) is shortened in a message.
_LONG_RUN = re.compile(r"\S{%d,}" % (SHOWN_CHARACTERS + 1))

# Bounds the repr of a value: a few items per level, a few levels (one a YAML alias or a pickle's
# shared reference makes exponentially large), long strings and numbers cut in the middle.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 120, 80, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def printable(text: str) -> str:
    """``text`` with every non-printable character (``\\x1b``, ``\\a``, ``\\n``, ...) written as its Python
    escape, so that printing it moves no cursor, sets no title and breaks no line."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shorten(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text`` if at most ``limit`` characters long; else its first and last ``limit / 2`` characters
    around a note of how many were left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...({len(text) - 2 * half} characters left out)...{text[-half:]}"


def shown(value) -> str:
    """An untrusted value quoted for a message: its ``repr`` (escaped), at most :data:`SHOWN_CHARACTERS`
    characters, however large the value (a 50 MB string, a deeply nested or self-repeating structure)."""
    return shorten(_REPR.repr(value))


def one_line(message: str) -> str:
    """An error message as one printable line in which no run of characters without white space (the
    usual shape of an id, a path or a number read from a file) is longer than :data:`SHOWN_CHARACTERS`."""
    return _LONG_RUN.sub(lambda m: shorten(m[0]), printable(message))
