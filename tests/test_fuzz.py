"""Property-based tests of the readers of user input: ``read_egoclip``, ``read_egomcq``,
``read_nlq``, the config (overrides and YAML files), and any bytes as the other readers' files (the
EK-100 and Charades-Ego CSVs, NLQ submissions, relevancy pickles and ``.npy`` files, frame images).
Any input either parses or raises the project's own error (:class:`MetadataError`, :class:`ConfigError`,
:class:`VideoReadError`) naming the file, the line (or the question, or the key) and the field, in one
line; never another exception.

The default run is bounded (the ``bounded`` profile in conftest.py); for a long one:

    SVITT_EGO_HYPOTHESIS=long python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from svitt_ego.eval import charades_ego, epic_mir
from svitt_ego.config import Config, ConfigError, load_config
from svitt_ego.data.egoclip import COLUMNS, read_egoclip
from svitt_ego.data.egomcq import read_egomcq
from svitt_ego.data.errors import VIDEO_UID_REGEX, MetadataError
from svitt_ego.data.video import VideoReadError
from svitt_ego.nlq import evaluate_nlq
from svitt_ego.nlq.annotations import NLQFormatError, read_nlq


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- egoclip.csv

# Text that stays inside one tab-separated field: no tab, line break or quote.
field_text = st.text(st.characters(exclude_characters="\t\r\n\"", exclude_categories=("Cs",)), max_size=12)
uids = st.from_regex(VIDEO_UID_REGEX, fullmatch=True)
ints = st.integers(-10**18 + 1, 10**18 - 1)
times = st.floats(-1e6, 1e6, allow_nan=False)
tags = st.lists(st.integers(0, 10**9 - 1), max_size=4)


@st.composite
def egoclip_rows(draw) -> dict:
    start = draw(times)
    return {"clip_idx": draw(ints), "video_uid": draw(uids), "video_dur": draw(times),
            "narration_source": draw(field_text), "narration_ind": draw(ints), "narration_time": draw(times),
            "clip_start": start, "clip_end": start + draw(st.floats(0, 1e3)), "clip_text": draw(field_text),
            "tag_verb": draw(tags), "tag_noun": draw(tags)}


def csv_field(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def write_rows(path, rows: list[dict]) -> None:
    lines = ["\t".join(COLUMNS)] + ["\t".join(csv_field(row[c]) for c in COLUMNS) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@given(st.lists(egoclip_rows(), max_size=6))
def test_egoclip_valid_rows_round_trip(folder, rows):
    path = folder / "valid.csv"
    write_rows(path, rows)
    df = read_egoclip(path, cache=False)
    assert len(df) == len(rows)
    for i, row in enumerate(rows):
        for name in COLUMNS:
            got = df[name].iloc[i]
            if isinstance(row[name], list):
                got = list(got)
            assert got == row[name], (name, got, row[name])


@given(st.lists(egoclip_rows(), min_size=1, max_size=4), st.data())
def test_egoclip_one_bad_field_names_its_line_and_field(folder, rows, data):
    row = data.draw(st.integers(0, len(rows) - 1))
    name = data.draw(st.sampled_from(COLUMNS))
    value = data.draw(field_text | st.sampled_from(["+5", "0x10", "1e999", "nan", "..", "/etc", "[1,", "[-1]",
                                                    "9" * 19, "١", "²", " 1", "1 "]))
    path = folder / "one_bad.csv"
    write_rows(path, rows[:row] + [rows[row] | {name: value}] + rows[row + 1:])
    try:
        df = read_egoclip(path, cache=False)
    except MetadataError as err:
        fields = {name, "clip_end"} if name in ("clip_start", "clip_end") else {name}
        assert re.fullmatch(rf"malformed EgoClip row: {re.escape(str(path))}, line {row + 2}, "
                            rf"field '({'|'.join(fields)})': .+", str(err)), str(err)
    else:
        assert len(df) == len(rows)


# Whole lines of anything, bytes that are not UTF-8 included.
raw_lines = st.lists(st.binary(max_size=40) | st.lists(st.sampled_from(
    [b"\t", b"\"", b"\r", b"[", b"]", b",", b"1", b"-", b".", b"e", b"x", b"\xff", b" "]), max_size=30).map(b"".join),
    max_size=5)


@given(st.booleans(), raw_lines)
def test_egoclip_any_bytes_parse_or_name_file_and_line(folder, with_header, lines):
    path = folder / "bytes.csv"
    header = ["\t".join(COLUMNS).encode()] if with_header else []
    path.write_bytes(b"\n".join(header + lines))
    _parses_or_names_the_line(path)


@given(st.lists(egoclip_rows(), min_size=1, max_size=3), st.integers(0, 10**6), st.binary(min_size=1, max_size=8))
def test_egoclip_bytes_spliced_into_a_valid_file(folder, rows, where, junk):
    path = folder / "spliced.csv"
    write_rows(path, rows)
    data = path.read_bytes()
    where = len("\t".join(COLUMNS)) + 1 + where % (len(data) - len("\t".join(COLUMNS)))
    path.write_bytes(data[:where] + junk + data[where:])
    _parses_or_names_the_line(path)


def _parses_or_names_the_line(path) -> None:
    where = rf"{re.escape(str(path))}, line \d+(, field '[^']+': |: missing column|: column)"
    for lax in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # lax mode's count of skipped rows
                read_egoclip(path, lax=lax, cache=False)
        except MetadataError as err:
            assert "\n" not in str(err) and re.search(where, str(err)), str(err)


# ---------------------------------------------------------------- egomcq.json

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3),
                           max_leaves=12)
clip_keys = st.sampled_from(["video_uid", "clip_start", "clip_end", "clip_text"])


@st.composite
def mcq_files(draw) -> dict:
    """Questions close to valid ones, with some fields replaced by anything."""
    def clip():
        row = {"video_uid": draw(uids | json_values), "clip_start": draw(st.floats(0, 100) | json_values),
               "clip_end": draw(st.floats(100, 200) | json_values),
               "clip_text": draw(st.text(max_size=8) | json_values)}
        return {k: v for k, v in row.items() if draw(st.integers(0, 9)) > 0}

    def question():
        count = draw(st.integers(0, 6))
        entry = {"query": clip(), "choices": {str(i): clip() for i in range(count)},
                 "answer": draw(st.integers(-1, 6) | st.text("0123456789 ²١", max_size=3) | json_values),
                 "types": draw(st.sampled_from([1, 2, "1", "2"]) | json_values)}
        return {k: v for k, v in entry.items() if draw(st.integers(0, 9)) > 0}

    entries = draw(st.lists(st.tuples(st.text(max_size=4), st.booleans()), max_size=3))
    return {qid: question() if near_valid else draw(json_values) for qid, near_valid in entries}


@given(mcq_files() | json_values)
@example(data={"'": {"query": {}, "choices": {}, "answer": 0, "types": 1}})  # an id that repr() double-quotes
def test_egomcq_any_json_parses_or_names_question_and_field(folder, data):
    path = folder / "egomcq.json"
    path.write_text(json.dumps(data))
    try:
        questions = read_egomcq(path)
    except MetadataError as err:
        message = str(err)
        assert message.startswith(f"{path}: ") and "\n" not in message
        if isinstance(data, dict) and data:
            assert re.match(rf"{re.escape(str(path))}: question ('.*'|\".*\")(, field '[\w.]+')?: ", message), message
    else:
        assert len(questions) == len(data)
        for q in questions:
            assert 0 <= q.answer < len(q.choices) and q.type in (1, 2) and isinstance(q.query.text, str)
            assert all(math.isfinite(c.start) and c.start <= c.end for c in [q.query, *q.choices])


@given(st.binary(max_size=60))
def test_egomcq_any_bytes_parse_or_name_the_file(folder, data):
    path = folder / "bytes.json"
    path.write_bytes(data)
    try:
        read_egomcq(path)
    except MetadataError as err:
        assert str(err).startswith(f"{path}: ")


# ---------------------------------------------------------------- nlq_*.json


@st.composite
def nlq_files(draw) -> dict:
    """NLQ annotations close to valid ones, with some fields replaced by anything."""
    def maybe(value):
        return draw(st.just(value) | json_values) if draw(st.integers(0, 5)) == 0 else value

    def query():
        start = draw(st.floats(-1e-6, 50))
        return {k: maybe(v) for k, v in {"query": draw(st.text(max_size=8) | st.none()), "clip_start_sec": start,
                                         "clip_end_sec": start + draw(st.floats(0, 20))}.items()}

    def clip():
        annotations = [{"annotation_uid": maybe(draw(uids | st.text(max_size=6))),
                        "language_queries": maybe([query() for _ in range(draw(st.integers(0, 3)))])}
                       for _ in range(draw(st.integers(0, 2)))]
        return {"clip_uid": maybe(draw(uids | st.sampled_from(["../x", "/etc", "..", ""]))),
                "video_start_sec": maybe(0.0), "video_end_sec": maybe(60.0), "annotations": maybe(annotations)}

    videos = [{"video_uid": maybe(draw(uids)), "clips": maybe([clip() for _ in range(draw(st.integers(0, 2)))])}
              for _ in range(draw(st.integers(0, 2)))]
    return {"videos": maybe(videos)}


@given(nlq_files() | json_values)
def test_nlq_any_json_parses_or_names_the_file(folder, data):
    path = folder / "nlq.json"
    path.write_text(json.dumps(data))
    try:
        annotations = read_nlq(path)
    except NLQFormatError as err:
        message = str(err)
        assert message.startswith(f"{path}") and "\n" not in message
    else:
        for q in annotations.queries:
            clip = annotations.clips[q.clip_uid]
            assert re.fullmatch(VIDEO_UID_REGEX, q.clip_uid) and re.fullmatch(VIDEO_UID_REGEX, q.annotation_uid)
            if q.start is not None:
                assert 0 <= q.start <= q.end <= clip.duration


# ---------------------------------------------------------------- config

def _keys(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
        return [key for name, sub in value.items() for key in _keys(f"{prefix}{name}.", sub)]
    return [prefix[:-1]]


CONFIG_KEYS = _keys("", Config().to_dict())
yaml_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20) | st.sampled_from(
    ["[a, b]", "[x,1,1]", "[1,", "{a: 1}", "0", "-1", "1e999", "9" * 5000, ".inf", "null", "true", "[0.5, 2]",
     "'", "&a [*a]", "!!python/object:os.system", "2024-01-01"])


@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS) | st.text(max_size=12), yaml_text), max_size=3))
@example(overrides=[("0\n0", "")])  # a key with a line break
def test_overrides_parse_or_name_the_key(overrides):
    texts = [f"{key}={value}" for key, value in overrides]
    try:
        load_config(None, texts)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        # The first part of some override's key, as written or escaped (repr) to stay on one line.
        firsts = [text.split("=", 1)[0].strip().split(".")[0] for text in texts]
        assert any(first in message or repr(first)[1:-1] in message for first in firsts) or \
            message.startswith("override "), message


@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=80) | st.builds(
    lambda key, value: "\n".join(f"{'  ' * i}{part}:" for i, part in enumerate(key.split("."))) + f" {value}\n",
    st.sampled_from(CONFIG_KEYS), yaml_text))
def test_yaml_files_parse_or_name_the_file(folder, text):
    path = folder / "run.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(str(path))
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        assert message.startswith(str(path)) or re.match(r"[\w.]+(\[\d+\])?: ", message), message


# ---------------------------------------------------------------- any bytes as the other readers' files

def _one_line(error: Exception, path) -> None:
    message = str(error)
    assert str(path) in message and "\n" not in message and len(message) < 2000, message


def _bytes_after(*prefixes: bytes):
    """A known beginning (a header, a magic number) followed by anything, or anything at all."""
    return st.builds(lambda prefix, tail: prefix + tail, st.sampled_from([b"", *prefixes]), st.binary(max_size=80))


MIR_HEADER = ",".join(epic_mir.TEST_COLUMNS).encode() + b"\n"
CHARADES_HEADER = b"id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"


# Each annotation reader of CSV files and the files it reads, as any bytes after a plausible start.
CSV_READERS = {
    "EK-100": (epic_mir.read_mir_annotations, {
        epic_mir.TEST_CSV: _bytes_after(MIR_HEADER, MIR_HEADER + b"P01_01_0,P01,P01_01,00:00:01.00,00:00:01.00,"),
        epic_mir.SENTENCE_CSV: _bytes_after(b"narration_id,narration\n")}),
    "Charades-Ego": (charades_ego.read_charades_annotations, {
        charades_ego.TEST_CSV: _bytes_after(CHARADES_HEADER, CHARADES_HEADER + b"AB12EGO,S,K,7,7,Yes,s,o,d,"),
        charades_ego.CLASSES_TXT: _bytes_after(b"c000 ")}),
}


@pytest.mark.parametrize("reader", CSV_READERS)
@given(data=st.data())
def test_annotation_csvs_of_any_bytes_parse_or_are_one_line(folder, reader, data):
    read, files = CSV_READERS[reader]
    for name, contents in files.items():
        (folder / name).write_bytes(data.draw(contents, label=name))
    try:
        read(folder)
    except MetadataError as err:
        _one_line(err, folder)


NLQ = {"videos": [{"video_uid": "v1", "clips": [{"clip_uid": "c1", "video_start_sec": 0.0, "video_end_sec": 9.0,
                                                 "annotations": [{"annotation_uid": "a1", "language_queries": [
                                                     {"query": "where?", "clip_start_sec": 1, "clip_end_sec": 2}]}]}]}]}


@given(json_values | st.fixed_dictionaries({"results": st.lists(st.fixed_dictionaries({
    "clip_uid": st.just("c1") | json_values, "annotation_uid": st.just("a1") | json_values,
    "query_idx": st.just(0) | json_values,
    "predicted_times": st.lists(st.lists(st.integers() | st.floats() | json_values, max_size=3), max_size=3)}),
    max_size=2)}))
@example(data={"results": [{"clip_uid": "c1", "annotation_uid": "a1", "query_idx": 0,
                            "predicted_times": [[0, 10**400]]}]})
def test_nlq_submissions_of_any_json_score_or_are_one_line(data):
    try:
        evaluate_nlq(NLQ, data, submission_name="sub.json")
    except NLQFormatError as err:
        _one_line(err, "sub.json")


PICKLE_STARTS = [pickle.dumps(np.zeros((2, 2)), protocol=p)[:n] for p in (2, 4, 5) for n in (2, 40, 120)]


@given(_bytes_after(*PICKLE_STARTS, b"\x80\x02c_codecs\nencode\n", b"\x80\x04cnumpy\ndtype\n"))
def test_relevancy_pickles_of_any_bytes_load_or_are_one_line(folder, data):
    path = folder / "relevancy.pkl"
    path.write_bytes(data)
    try:
        matrix = epic_mir.load_relevancy(path)
    except MetadataError as err:
        _one_line(err, path)
    else:
        assert matrix.ndim == 2 and matrix.dtype == np.float64


def _npy_header(shape) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@given(_bytes_after(b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", _npy_header((2, 3)), _npy_header((23170, 23170)),
                    _npy_header((2,)), _npy_header((1 << 62, 1 << 62))))
def test_relevancy_npy_files_of_any_bytes_load_or_are_one_line(folder, data):
    path = folder / "relevancy.npy"
    path.write_bytes(data)
    try:
        epic_mir.load_relevancy(path, (2, 3))
    except MetadataError as err:
        _one_line(err, path)


IMAGE_STARTS = [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF89a", b"BM",
                b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@given(_bytes_after(*IMAGE_STARTS))
def test_frame_images_of_any_bytes_read_or_are_one_line(folder, data):
    (folder / "P01_01").mkdir(exist_ok=True)
    path = folder / "P01_01" / "frame_0000000001.jpg"
    path.write_bytes(data)
    clip = epic_mir.MIRClip("P01_01_0", "P01", "P01_01", 0.0, 1.0, 1, 2, "x", 0, (0,))
    try:
        frames = epic_mir.ClipReader(folder, "frames", 1)(clip)
    except VideoReadError as err:
        _one_line(err, path)
    else:
        assert frames.dtype == torch.uint8 and frames.shape[-1] == 3
