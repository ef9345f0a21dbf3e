"""The EgoMCQ reader (egomcq.json), its dataset and collate function; every malformed input is a
MetadataError naming the file, the question and the field."""

from __future__ import annotations

import json

import pytest
from helpers import FRAMES, SIZE, make_config, mcq_question, write_egomcq

from svitt_ego.data.egomcq import EgoMCQDataset, collate_egomcq, read_egomcq
from svitt_ego.data.errors import MetadataError


def test_egomcq_read_dataset_and_collate(tmp_path, video_root, word_tokenizer):
    path = write_egomcq(tmp_path / "egomcq.json", {"0": mcq_question(), "17": mcq_question(4, 1)})
    questions = read_egomcq(path)
    assert [q.question_id for q in questions] == ["0", "17"]
    assert [q.type for q in questions] == [2, 1] and questions[1].answer == 4
    dataset = EgoMCQDataset(make_config(video_root), questions)
    item = dataset[0]
    assert item["frames"].shape == (5, FRAMES, 3, SIZE, SIZE)
    assert item["text"] == "#C C opens the door" and item["answer"] == 2 and item["type"] == 2
    batch = collate_egomcq(word_tokenizer, 8)([dataset[0], dataset[1]])
    assert batch["frames"].shape == (2, 5, FRAMES, 3, SIZE, SIZE)
    assert batch["answer"].tolist() == [2, 4] and batch["type"].tolist() == [2, 1]
    assert batch["input_ids"].shape[0] == 2 and batch["question_id"] == ["0", "17"]


@pytest.mark.parametrize("change, message", [
    (lambda q: q.pop("answer"), "field 'answer': missing"),
    (lambda q: q.update(types=3), "field 'types'"),
    (lambda q: q.update(answer=5), "field 'answer'"),
    (lambda q: q["choices"]["3"].update(clip_start="soon"), r"field 'choices\.3\.clip_start': expected a number, got 'soon'"),
    (lambda q: q["choices"].pop("1"), "field 'choices'"),
    (lambda q: q["query"].pop("clip_text"), r"field 'query\.clip_text'"),
    (lambda q: q["query"].update(clip_end=0.0), r"field 'query\.clip_end': 0\.0 is before clip_start 0\.5"),
])
def test_egomcq_errors_name_question_and_field(tmp_path, change, message):
    bad = mcq_question()
    change(bad)
    path = write_egomcq(tmp_path / "egomcq.json", {"0": mcq_question(), "42": bad})
    with pytest.raises(ValueError, match=rf"egomcq.json: question '42', {message}"):
        read_egomcq(path)


def clip(uid="v1", start=0.5, text="#C C picks a cup") -> dict:
    return {"video_uid": uid, "clip_start": start, "clip_end": start + 0.8, "clip_text": text}


def question(**changes) -> dict:
    entry = {"query": clip(), "choices": {str(i): clip("v2", 0.3 * i) for i in range(5)}, "answer": 2, "types": 1}
    return entry | changes


def write(tmp_path, text: str | bytes):
    path = tmp_path / "egomcq.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_strings_of_ascii_digits_are_integers_and_any_number_of_choices_reads(tmp_path):
    three = {str(i): clip("v2", float(i)) for i in range(3)}
    path = write(tmp_path, json.dumps({"7": question(answer="1", types=" 2 ", choices=three)}))
    (q,) = read_egomcq(path)
    assert (q.question_id, q.answer, q.type, len(q.choices)) == ("7", 1, 2, 3)
    assert [c.start for c in q.choices] == [0.0, 1.0, 2.0] and q.query.text == "#C C picks a cup"


@pytest.mark.parametrize("entry, message", [
    (question(answer="²"), r"field 'answer': expected an integer, got '²'"),
    (question(types="١"), r"field 'types': expected an integer, got '١'"),
    (question(answer=10**30), r"field 'answer': 1000000000000000000000000000000 is not a choice \(0\.\.4\)"),
    (question(query=clip() | {"clip_start": 10**400}), r"field 'query\.clip_start': expected a number, got 10000"),
    (question(query=clip(uid="../../x")), r"field 'query\.video_uid': '\.\./\.\./x' is not an id"),
    (question(query=clip(uid="/etc")), r"field 'query\.video_uid': '/etc' is not an id"),
    (question(choices={str(i): clip("..") for i in range(5)}), r"field 'choices\.0\.video_uid': '\.\.' is not an id"),
    (question(choices={str(i): clip("") for i in range(5)}), r"field 'choices\.0\.video_uid': '' is not an id"),
    (question(answer=True), r"field 'answer': expected an integer, got True"),
])
def test_bad_values_name_the_question_and_field(tmp_path, entry, message):
    path = write(tmp_path, json.dumps({"0": question(), "42": entry}))
    with pytest.raises(MetadataError, match=rf"{path}: question '42', {message}"):
        read_egomcq(path)


@pytest.mark.parametrize("text, message", [
    (b'{"0": "caf\xe9"}', r"not UTF-8 text \(byte 10\)"),
    ('{"0": ' + "1" * 5000 + "}", "not valid JSON: Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON: nested too deeply"),
    ('{"0": [}', r"not valid JSON: Expecting value: line 1 column 8"),
    ("[]", "expected an object of questions keyed by id, got list"),
])
def test_bad_files_name_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(MetadataError, match=rf"{path}: {message}"):
        read_egomcq(path)


def test_missing_file_is_a_metadata_error(tmp_path):
    with pytest.raises(MetadataError, match=rf"{tmp_path / 'egomcq.json'}: no such EgoMCQ file"):
        read_egomcq(tmp_path / "egomcq.json")


def test_a_question_id_given_twice_is_refused_naming_it(tmp_path):
    question = json.dumps(mcq_question())
    path = tmp_path / "egomcq.json"
    path.write_text(f'{{"0": {question}, "17": {question}, "0": {question}}}')
    with pytest.raises(MetadataError, match=r"egomcq\.json: not valid JSON: the key '0' appears more than once"):
        read_egomcq(path)
