"""Untrusted input stays where it belongs: ids read from annotations never name a path outside their
folder (one check, :func:`svitt_ego.data.errors.checked_id`, for every reader), and names and values
from files reach the terminal escaped and shortened (:mod:`svitt_ego.untrusted`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svitt_ego.eval import charades_ego, epic_mir
from svitt_ego.cli import main
from svitt_ego.data.egoclip import COLUMNS, read_egoclip
from svitt_ego.data.egomcq import read_egomcq
from svitt_ego.data.errors import MetadataError, not_an_id
from svitt_ego.data.video_uids import read_videos
from svitt_ego.nlq.annotations import read_nlq
from svitt_ego.untrusted import SHOWN_CHARACTERS, one_line, printable, shown

# Two ways out of a video folder ``<tmp>/a/b/videos`` to ``<tmp>/t/outside/abcd``.
OUTSIDE = ("{tmp}/t/outside/abcd", "../../../t/outside/abcd")


def _outside(tmp_path: Path, form: str) -> str:
    """An id naming a real folder outside ``<tmp>/a/b/videos``, holding a video chunk to be read."""
    (tmp_path / "t" / "outside" / "abcd").mkdir(parents=True, exist_ok=True)
    (tmp_path / "t" / "outside" / "abcd" / "0.mp4").write_bytes(b"not ours to read")
    (tmp_path / "a" / "b" / "videos").mkdir(parents=True, exist_ok=True)
    return form.format(tmp=tmp_path)


def _nlq(uid: str) -> dict:
    return {"videos": [{"video_uid": uid, "clips": [{"clip_uid": "c1", "video_start_sec": 0.0, "video_end_sec": 2.0,
                                                     "annotations": [{"annotation_uid": "a1", "language_queries": [
                                                         {"query": "where is the cup?"}]}]}]}]}


@pytest.mark.parametrize("form", OUTSIDE)
def test_extract_nlq_features_refuses_a_video_id_outside_videos(tmp_path, capsys, form):
    uid = _outside(tmp_path, form)
    (tmp_path / "nlq.json").write_text(json.dumps(_nlq(uid)))
    status = main(["extract-nlq-features", str(tmp_path / "model"), "--annotations", str(tmp_path / "nlq.json"),
                   "--videos", str(tmp_path / "a" / "b" / "videos"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert f"videos[0]: field 'video_uid': {not_an_id(uid)}" in err
    assert not (tmp_path / "out").exists()


def _egoclip(folder: Path, uid: str) -> Path:
    row = ["0", uid, "10.0", "narration_pass_1", "0", "1.0", "0.5", "1.5", "#C C opens a drawer", "[1]", "[2]"]
    path = folder / "egoclip.csv"
    path.write_text("\t".join(COLUMNS) + "\n" + "\t".join(row) + "\n")
    return path


def _egomcq(folder: Path, uid: str) -> Path:
    clip = {"video_uid": "v1", "clip_start": 0.0, "clip_end": 1.0, "clip_text": "#C C opens a drawer"}
    path = folder / "egomcq.json"
    path.write_text(json.dumps({"0": {"query": clip, "choices": {"0": clip | {"video_uid": uid}, "1": clip},
                                      "answer": 0, "types": 1}}))
    return path


def _nlq_file(folder: Path, uid: str) -> Path:
    path = folder / "nlq_val.json"
    path.write_text(json.dumps(_nlq(uid)))
    return path


def _ek100(folder: Path, uid: str) -> Path:
    row = f'P01_01_0,P01,{uid},00:00:01.00,00:00:01.00,00:00:02.50,60,150,open drawer,open,3,drawer,8,"[\'d\']","[8]"'
    (folder / epic_mir.TEST_CSV).write_text(",".join(epic_mir.TEST_COLUMNS) + "\n" + row + "\n")
    (folder / epic_mir.SENTENCE_CSV).write_text("narration_id,narration\nP01_01_0,open drawer\n")
    return folder


def _charades(folder: Path, uid: str) -> Path:
    (folder / charades_ego.TEST_CSV).write_text(
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
        f"{uid},S,K,7,7,Yes,s,o,d,c000 0.0 1.0,20.5\n")
    (folder / charades_ego.CLASSES_TXT).write_text("c000 Holding a bag\n")
    return folder


# Each reader of video ids, the annotation file it takes (written by the function) and the field named.
READERS = {
    "EgoClip": (read_egoclip, _egoclip, "field 'video_uid'"),
    "EgoMCQ": (read_egomcq, _egomcq, "field 'choices.0.video_uid'"),
    "NLQ": (read_nlq, _nlq_file, "field 'video_uid'"),
    "EK-100": (epic_mir.read_mir_annotations, _ek100, "field 'video_id'"),
    "Charades-Ego": (charades_ego.read_charades_annotations, _charades, "field 'id'"),
    "video-uids": (lambda path: read_videos(path), _nlq_file, "field 'video_uid'"),
}


@pytest.mark.parametrize("form", OUTSIDE)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_of_video_ids_refuses_one_outside_the_video_folder(tmp_path, reader, form):
    read, write, field = READERS[reader]
    uid = _outside(tmp_path, form)
    path = write(tmp_path, uid)
    with pytest.raises(MetadataError) as err:
        read(path)
    assert f"{field}: {not_an_id(uid)}" in str(err.value), str(err.value)


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_a_plain_video_id(tmp_path, reader):
    read, write, _ = READERS[reader]
    assert read(write(tmp_path, "P01_01")) is not None


# --------------------------------------------------------------------------- names and values on a terminal

ESCAPES = "\x1b]0;x\x07\x1b[2J"


def test_printable_escapes_what_a_terminal_acts_on():
    assert printable(f"{ESCAPES}v.mp4") == r"\x1b]0;x\x07\x1b[2Jv.mp4"
    assert printable("GX010001 é.mp4") == "GX010001 é.mp4"
    assert printable("a\nb\u202ec") == r"a\nb\u202ec"


def test_shown_echoes_at_most_200_characters_of_a_value():
    assert shown("v1") == "'v1'"
    long = shown("x" * 50_000_000)
    assert long.count("x") <= SHOWN_CHARACTERS and len(long) < SHOWN_CHARACTERS + 60
    assert len(shown([[["y" * 1000] * 1000] * 1000])) <= SHOWN_CHARACTERS + 60


def test_one_line_shortens_long_runs_and_breaks_no_line():
    message = one_line(f"f.json, field 'clip_uid': {'c' * 10**6} is bad\nsecond line {ESCAPES}")
    assert "\n" not in message and "\x1b" not in message and message.count("c") <= SHOWN_CHARACTERS + 10
    assert message.startswith("f.json, field 'clip_uid': ") and "is bad" in message


def test_a_1_mb_clip_uid_is_echoed_shortened_in_one_line(tmp_path, capsys):
    clip_uid = "c" * 1_000_000 + "/x"
    data = _nlq("v1")
    data["videos"][0]["clips"][0]["clip_uid"] = clip_uid
    (tmp_path / "nlq.json").write_text(json.dumps(data))
    status = main(["extract-nlq-features", str(tmp_path / "model"), "--annotations", str(tmp_path / "nlq.json"),
                   "--videos", str(tmp_path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "field 'clip_uid'" in err
    assert err.count("c") < SHOWN_CHARACTERS + 40 and len(err) < 1000, len(err)


def test_an_error_never_echoes_a_long_value_whatever_builds_it():
    assert len(str(MetadataError("x.csv, line 2: " + "z" * 10**6))) < 400
    assert str(MetadataError(f"{ESCAPES}.json: bad")) == r"\x1b]0;x\x07\x1b[2J.json: bad"
