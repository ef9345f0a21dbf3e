"""EgoClip metadata: reading ``egoclip.csv``, EgoNCE's action positives, scene-aware negatives.

The file has 3.8M tab-separated rows (the format: docs/data-formats.md). It is parsed with pyarrow and checked with
vectorised compute kernels; a malformed row is reported with its 1-based line number and the
offending field. A clean file is cached as parquet next to it, so later reads take a second or
two. The cache is keyed on the file's size, mtime and a digest of its first and last MiB (a full
digest would read the whole file again on every cached read), and it is trusted no more than
the file: a cached table of another layout, or with a value the row checks refuse, is rebuilt
from the file (with a one-line warning).

The returned DataFrame keeps the big columns in Arrow memory: ``video_uid`` and
``narration_source`` are categoricals, ``clip_text`` an Arrow string column, ``tag_verb`` and
``tag_noun`` Arrow ``list<int32>`` columns (``df.tag_noun.iloc[i]`` is a list of ints). Arrow
buffers hold no Python objects, so forked DataLoader workers share them without copy-on-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch

from svitt_ego.atomic import atomic_write
from svitt_ego.data.errors import VIDEO_UID_REGEX, VIDEO_UID_RULE, MetadataError, not_an_id
from svitt_ego.untrusted import shown

COLUMNS = ("clip_idx", "video_uid", "video_dur", "narration_source", "narration_ind",
           "narration_time", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun")
INT_COLUMNS = ("clip_idx", "narration_ind")
FLOAT_COLUMNS = ("video_dur", "narration_time", "clip_start", "clip_end")
TAG_COLUMNS = ("tag_verb", "tag_noun")

# Bump when the cached table's layout changes.
CACHE_VERSION = 2
_CACHE_KEY = b"svitt_ego.egoclip"
_DIGEST_BYTES = 1 << 20  # the cache key hashes this much of the file's start and of its end
_CACHE_SCHEMA = pa.schema(
    [(name, pa.int64()) if name in INT_COLUMNS else (name, pa.float64()) if name in FLOAT_COLUMNS
     else (name, pa.list_(pa.int32())) if name in TAG_COLUMNS
     else (name, pa.dictionary(pa.int32(), pa.string())) if name in ("video_uid", "narration_source")
     else (name, pa.string()) for name in COLUMNS])

_INT_PATTERN = r"^-?\d{1,18}$"
_FLOAT_PATTERN = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_TAG_PATTERN = r"^\[\s*(\d{1,9}\s*(,\s*\d{1,9}\s*)*)?\]$"


@dataclass
class _Problem:
    """Where a malformed row is, and what is wrong with it."""

    line: int
    field: str
    message: str


def read_egoclip(path: str | Path, lax: bool = False, cache: bool = True) -> pd.DataFrame:
    """Read ``egoclip.csv`` into a DataFrame with one row per clip, in file order.

    A missing file or a malformed row (wrong number of fields, bytes that are not UTF-8, a
    ``video_uid`` that is not a plain folder name, a non-numeric number, a bad tag list,
    ``clip_end < clip_start``) raises :class:`MetadataError` naming the file, the line and the
    field. With ``lax=True`` malformed rows are dropped instead and one warning gives their count
    and the first of them. Only a file without malformed rows is cached.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path}: no such EgoClip metadata file (see data.egoclip)")
    cache_path = path.with_name(path.name + ".cache.parquet")
    key = _cache_key(path)
    if cache:
        table = _load_cache(cache_path, key)
        if table is not None:
            problem = _cache_problem(table)
            if problem is None:
                return _to_pandas(table)
            warnings.warn(f"{cache_path}: {problem}; rebuilding it from {path}", stacklevel=2)

    try:
        table, bad_rows, num_bad, first = _parse(path)
    except OSError as err:
        raise MetadataError(f"{path}: cannot read: {err}") from None
    if num_bad:
        where = f"{path}, line {first.line}, field '{first.field}': {first.message}"
        if not lax:
            raise MetadataError(f"malformed EgoClip row: {where}")
        warnings.warn(f"skipped {num_bad} malformed EgoClip rows; the first: {where}", stacklevel=2)
        table = table.filter(pa.array(~bad_rows))
    elif cache:
        _save_cache(cache_path, table, key)
    return _to_pandas(table)


def _parse(path: Path) -> tuple[pa.Table, np.ndarray, int, _Problem | None]:
    """Parse and check every row. Returns the typed table, the mask of its bad rows, the number
    of bad rows (including those with the wrong field count, which are not in the table) and
    the first problem in file order."""
    header, has_rows = _read_header(path)
    # Arrow cannot read a header with no line break after it; such a file has no rows.
    empty = pa.table({c: pa.array([], pa.string()) for c in COLUMNS})
    table, short_rows, utf8_checked = _read_strings(path, header, use_threads=True) if has_rows else (empty, [], True)
    if short_rows:
        # A threaded read does not know line numbers; a second, serial read does.
        table, short_rows, utf8_checked = _read_strings(path, header, use_threads=False, check_utf8=utf8_checked)
    lines = _table_lines(table.num_rows, [line for line, _ in short_rows])
    table, checks = (table, []) if utf8_checked else _find_bad_utf8(table)
    parsed, value_checks = _convert(table)
    checks += value_checks

    bad_rows = np.zeros(parsed.num_rows, dtype=bool)
    for _, bad, _ in checks:
        bad_rows |= bad
    candidates = []
    if short_rows:
        line, count = short_rows[0]
        field = _field_name(header, count)
        candidates.append(_Problem(line, field, f"the row has {count} tab-separated fields, expected {len(header)}"))
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        name, describe = next((name, describe) for name, bad, describe in checks if bad[row])
        candidates.append(_Problem(int(lines[row]), name, describe(row)))
    first = min(candidates, key=lambda p: p.line, default=None)
    return parsed, bad_rows, len(short_rows) + int(bad_rows.sum()), first


def _read_header(path: Path) -> tuple[list[str], bool]:
    """The column names, and whether anything follows them."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace").removeprefix("\ufeff")  # a byte-order mark
        header = [name.strip('"') for name in first.rstrip("\r\n").split("\t")]
        has_rows = f.read(1) != b""
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise MetadataError(f"{path}, line 1: missing column(s) {', '.join(missing)} in the header")
    doubled = sorted({c for c in COLUMNS if header.count(c) > 1})
    if doubled:
        raise MetadataError(f"{path}, line 1: column(s) {', '.join(doubled)} appear more than once in the header")
    return header, has_rows


def _convert(table: pa.Table) -> tuple[pa.Table, list]:
    """The typed table, and the checks of its rows: ``(field, mask of bad rows, message for a
    bad row)`` in column order."""
    def got(name: str, row: int) -> str:
        return shown(table.column(name)[row].as_py())

    columns, checks = {}, []
    for name in COLUMNS:
        raw = table.column(name)
        if name in INT_COLUMNS:
            columns[name], bad = _to_number(raw, pa.int64(), _INT_PATTERN)
            checks.append((name, bad, lambda row, name=name: f"expected an integer, got {got(name, row)}"))
        elif name in FLOAT_COLUMNS:
            columns[name], bad = _to_number(raw, pa.float64(), _FLOAT_PATTERN)
            checks.append((name, bad, lambda row, name=name: f"expected a finite number, got {got(name, row)}"))
        elif name in TAG_COLUMNS:
            columns[name], bad = _to_tags(raw)
            checks.append((name, bad, lambda row, name=name: f"expected a list of class ids like [12, 7] or [], "
                                                             f"got {got(name, row)}"))
        else:
            columns[name] = raw
        if name == "video_uid":
            checks.append((name, _bad_video_uids(raw),
                           lambda row: not_an_id(table.column("video_uid")[row].as_py())))
    reversed_times = pc.less(columns["clip_end"], columns["clip_start"]).to_numpy(zero_copy_only=False)
    checks.append(("clip_end", reversed_times,
                   lambda row: f"{got('clip_end', row)} is before clip_start {got('clip_start', row)}"))
    columns["video_uid"] = pc.dictionary_encode(columns["video_uid"])
    columns["narration_source"] = pc.dictionary_encode(columns["narration_source"])
    return pa.table(columns), checks


def _read_strings(path: Path, header: list[str], use_threads: bool,
                  check_utf8: bool = True) -> tuple[pa.Table, list[tuple[int, int]], bool]:
    """All columns as strings; rows with the wrong field count are skipped and returned as
    ``(line, number of fields)`` (line is only known when ``use_threads=False``); and whether
    the strings were checked to be UTF-8. pyarrow's check only says that some value is not, so
    a file with such a value is read again unchecked, for :func:`_find_bad_utf8`.

    pyarrow decodes a row with the wrong field count as UTF-8 before handing it over, so one
    that also holds other bytes stops the read, even in lax mode: it raises
    :class:`MetadataError` with its line."""
    short_rows = []

    def on_invalid(row) -> str:
        short_rows.append((row.number, row.actual_columns))
        return "skip"

    try:
        with _quiet_undecodable_rows(on_invalid):
            table = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(use_threads=use_threads, block_size=1 << 24),
                # Empty lines stay rows so that row i of the table is line i + 2 of the file.
                parse_options=pcsv.ParseOptions(delimiter="\t", invalid_row_handler=on_invalid,
                                                ignore_empty_lines=False),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS},
                                                    include_columns=list(COLUMNS), strings_can_be_null=False,
                                                    quoted_strings_can_be_null=False, check_utf8=check_utf8),
            )
    except pa.ArrowInvalid as err:
        if check_utf8 and "invalid UTF8" in str(err):
            return _read_strings(path, header, use_threads, check_utf8=False)
        if use_threads:  # only a serial read names the row
            return _read_strings(path, header, use_threads=False, check_utf8=check_utf8)
        raise MetadataError(_read_error(path, header, str(err))) from None
    return table, short_rows, check_utf8


@contextlib.contextmanager
def _quiet_undecodable_rows(handler):
    """pyarrow reports a row it cannot decode for ``handler`` on stderr, with a traceback, and
    then stops the read (which becomes a one-line :class:`MetadataError`): keep stderr clean."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not (unraisable.object is handler and isinstance(unraisable.exc_value, UnicodeDecodeError)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _field_name(header: list[str], index: int) -> str:
    """The header's name of field ``index``, escaped to stay on one line."""
    return repr(header[index])[1:-1] if index < len(header) else "(extra)"


def _read_error(path: Path, header: list[str], message: str) -> str:
    match = re.search(r"Row #(\d+): Expected (\d+) columns, got (\d+)", message)
    if match is None:
        return f"{path}: not a tab-separated EgoClip file: {message}"
    line, expected, count = map(int, match.groups())
    field = _field_name(header, count)
    return (f"malformed EgoClip row: {path}, line {line}, field '{field}': the row has {count} tab-separated "
            f"fields, expected {expected}, and bytes that are not UTF-8")


def _find_bad_utf8(table: pa.Table) -> tuple[pa.Table, list]:
    """Find the values that are not UTF-8 (empty them, so that the table is valid) and return
    their checks. A column is searched value by value only when it holds such bytes."""
    checks = []
    for i, name in enumerate(table.column_names):
        column = table.column(i)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        bad = np.array([not _is_utf8(value) for value in pc.cast(column, pa.binary()).to_pylist()], dtype=bool)
        table = table.set_column(i, name, pc.if_else(pa.array(bad), "", column))
        checks.append((name, bad, lambda row: "not valid UTF-8 text"))
    return table, checks


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bad_video_uids(raw: pa.ChunkedArray) -> np.ndarray:
    """The rows whose ``video_uid`` is not a plain folder name (checked once per distinct id)."""
    uids = pc.unique(raw)
    bad_uids = uids.filter(pc.invert(pc.match_substring_regex(uids, VIDEO_UID_REGEX)))
    if len(bad_uids) == 0:
        return np.zeros(len(raw), dtype=bool)
    return pc.is_in(raw, value_set=bad_uids).to_numpy(zero_copy_only=False)


def _table_lines(num_rows: int, skipped_lines: list[int]) -> np.ndarray:
    """The file line (1-based, the header is line 1) of each table row."""
    all_lines = np.arange(2, 2 + num_rows + len(skipped_lines))
    return np.delete(all_lines, np.asarray(skipped_lines, dtype=np.int64) - 2)


def _to_number(raw: pa.ChunkedArray, type_: pa.DataType, pattern: str) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Cast strings to numbers; entries that do not match ``pattern`` (or are not finite) are
    bad and read as 0. Arrow's float cast reads exactly the pattern plus inf and nan, so floats
    take the regex only when the cast fails; its integer cast also reads hex (``0x10``) and
    refuses ``+5``, so integers always take it."""
    floating = pa.types.is_floating(type_)
    if floating:
        try:
            values = pc.cast(raw, type_)
            return values, ~pc.is_finite(values).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    bad = ~pc.match_substring_regex(raw, pattern).to_numpy(zero_copy_only=False)
    values = pc.cast(pc.if_else(pa.array(bad), "0", raw), type_)
    if floating:
        bad |= ~pc.is_finite(values).to_numpy(zero_copy_only=False)
    return values, bad


def _to_tags(raw: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """``"[192, 115, 12]"`` -> [192, 115, 12] for the whole column at once; bad entries -> []."""
    raw = raw.combine_chunks()
    bad = ~pc.match_substring_regex(raw, _TAG_PATTERN).to_numpy(zero_copy_only=False)
    if bad.any():
        raw = pc.if_else(pa.array(bad), "[]", raw)
    inner = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(raw, 1, -1))
    pieces = pc.split_pattern(inner, ",")
    # "" (an empty list) splits into one empty piece: drop it.
    empty = pc.equal(inner, "").to_numpy(zero_copy_only=False)
    lengths = np.where(empty, 0, pc.list_value_length(pieces).to_numpy(zero_copy_only=False))
    flat = pc.list_flatten(pieces)
    keep = ~empty[pc.list_parent_indices(pieces).to_numpy()]
    values = pc.cast(pc.utf8_trim_whitespace(flat.filter(pa.array(keep))), pa.int32())
    offsets = np.zeros(len(raw) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values), bad


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    def dtype(type_: pa.DataType):
        if pa.types.is_string(type_):
            return pd.StringDtype("pyarrow")
        if pa.types.is_list(type_):
            return pd.ArrowDtype(type_)
        return None

    return table.to_pandas(types_mapper=dtype, split_blocks=True, self_destruct=True)


def _cache_key(path: Path) -> bytes:
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_DIGEST_BYTES))
        f.seek(max(_DIGEST_BYTES, stat.st_size - _DIGEST_BYTES))
        digest.update(f.read(_DIGEST_BYTES))
    return json.dumps({"version": CACHE_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "sha256_ends": digest.hexdigest()}).encode()


def _cache_problem(table: pa.Table) -> str | None:
    """What makes a cached table unfit to return, or None: the layout of a parsed file and the
    checks its rows passed (finite times, ``clip_end >= clip_start``, video ids, class ids)."""
    if table.schema.remove_metadata() != _CACHE_SCHEMA:
        return "not the layout of a cached EgoClip table"
    for name in COLUMNS:
        column = table.column(name)
        if column.null_count or (name in TAG_COLUMNS and pc.list_flatten(column).null_count):
            return f"missing values in column {name}"
    for name in FLOAT_COLUMNS:
        if not pc.all(pc.is_finite(table.column(name))).as_py():
            return f"a value of column {name} that is not a finite number"
    if pc.any(pc.less(table.column("clip_end"), table.column("clip_start"))).as_py():
        return "a clip_end before its clip_start"
    if any(_bad_video_uids(chunk.dictionary).any() for chunk in table.column("video_uid").chunks):
        return f"a video_uid that is not a video id ({VIDEO_UID_RULE})"
    for name in TAG_COLUMNS:
        if (pc.min(pc.list_flatten(table.column(name))).as_py() or 0) < 0:
            return f"a negative class id in column {name}"
    return None


def _load_cache(cache_path: Path, key: bytes) -> pa.Table | None:
    try:
        metadata = pq.read_schema(cache_path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    if metadata.get(_CACHE_KEY) != key:
        return None
    return pq.read_table(cache_path)


def _save_cache(cache_path: Path, table: pa.Table, key: bytes) -> None:
    """Write atomically (several ranks may build it at once); a read-only folder only warns."""
    try:
        atomic_write(cache_path, lambda tmp: pq.write_table(table.replace_schema_metadata({_CACHE_KEY: key}), tmp))
    except OSError as err:
        warnings.warn(f"could not cache EgoClip metadata at {cache_path}: {err}", stacklevel=3)


def pad_tags(tags: list) -> torch.Tensor:
    """Tag-id lists -> ``[N, K]`` long tensor, ``K`` the longest list (at least 1), padded with -1."""
    width = max([len(t) for t in tags] + [1])
    out = torch.full((len(tags), width), -1, dtype=torch.long)
    for i, t in enumerate(tags):
        out[i, :len(t)] = torch.as_tensor(np.asarray(t, dtype=np.int64))
    return out


def action_positive_mask(nouns: list | torch.Tensor, verbs: list | torch.Tensor) -> torch.Tensor:
    """EgoNCE positives: ``[N, N]`` bool, True where clips i and j share at least one noun class
    and at least one verb class, and on the diagonal. Empty tag lists share nothing.

    ``nouns`` and ``verbs`` are lists of tag-id lists, or their :func:`pad_tags` tensors.
    """
    nouns = nouns if torch.is_tensor(nouns) else pad_tags(nouns)
    verbs = verbs if torch.is_tensor(verbs) else pad_tags(verbs)
    eye = torch.eye(len(nouns), dtype=torch.bool, device=nouns.device)
    return (_shares_a_class(nouns) & _shares_a_class(verbs)) | eye


def _shares_a_class(tags: torch.Tensor) -> torch.Tensor:
    same = tags[:, None, :, None] == tags[None, :, None, :]
    return (same & (tags[:, None, :, None] >= 0)).flatten(2).any(dim=2)


class SceneNegatives:
    """Scene-aware hard negatives: for an anchor row, another clip of the same video
    whose narration falls in the same ``window``-second bin (``floor(narration_time / window)``)
    and whose ``[clip_start, clip_end]`` does not overlap the anchor's (closed intervals, so the
    anchor itself and a second narration of the same moment are never drawn).

    Fallbacks, counted in ``fallbacks``: when the window has no such clip, the nearest
    non-overlapping clip of the same video (``"nearest"``); when the video has none either, a
    random clip of another video (``"other_video"``).
    """

    def __init__(self, table: pd.DataFrame, window: float = 60.0):
        self.video = pd.factorize(table["video_uid"])[0].astype(np.int64)
        self.start = table["clip_start"].to_numpy(dtype=np.float64)
        self.end = table["clip_end"].to_numpy(dtype=np.float64)
        bin_ = np.floor(table["narration_time"].to_numpy(dtype=np.float64) / window).astype(np.int64)
        # Sorting by (video, bin) makes every group and every video a contiguous slice of `order`.
        self.order = np.lexsort((self.start, bin_, self.video))
        video_sorted, bin_sorted = self.video[self.order], bin_[self.order]
        new_group = np.ones(len(self.order), dtype=bool)
        new_group[1:] = (video_sorted[1:] != video_sorted[:-1]) | (bin_sorted[1:] != bin_sorted[:-1])
        bounds = np.append(np.flatnonzero(new_group), len(self.order))
        self.group_start, self.group_end = bounds[:-1], bounds[1:]
        self.group_of_row = np.empty(len(self.order), dtype=np.int64)
        self.group_of_row[self.order] = np.cumsum(new_group) - 1
        self.video_sorted = video_sorted
        self.num_videos = int(self.video.max()) + 1 if len(self.video) else 0
        self.fallbacks = {"nearest": 0, "other_video": 0}

    def __len__(self) -> int:
        return len(self.order)

    def sample(self, index: int, rng: np.random.Generator) -> tuple[int, str]:
        """A negative row for row ``index``, and how it was found: ``"window"``, ``"nearest"`` or
        ``"other_video"``."""
        group = self.group_of_row[index]
        members = self.order[self.group_start[group]:self.group_end[group]]
        candidates = members[self._apart(members, index)]
        if len(candidates):
            return int(rng.choice(candidates)), "window"

        video = self.video[index]
        lo, hi = np.searchsorted(self.video_sorted, [video, video + 1])
        same_video = self.order[lo:hi]
        gap = np.maximum(self.start[index] - self.end[same_video], self.start[same_video] - self.end[index])
        if (gap > 0).any():
            self.fallbacks["nearest"] += 1
            return int(same_video[np.argmin(np.where(gap > 0, gap, np.inf))]), "nearest"

        if self.num_videos < 2:
            raise ValueError(f"no negative for EgoClip row {index}: its video has no other "
                             "non-overlapping clip and there is no other video")
        self.fallbacks["other_video"] += 1
        while True:
            other = int(rng.integers(len(self.order)))
            if self.video[other] != video:
                return other, "other_video"

    def _apart(self, rows: np.ndarray, index: int) -> np.ndarray:
        return (self.end[rows] < self.start[index]) | (self.start[rows] > self.end[index])
