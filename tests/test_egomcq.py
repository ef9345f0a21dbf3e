"""The EgoMCQ reader (egomcq.json), its dataset and collate function."""

from __future__ import annotations

import pytest
from helpers import FRAMES, SIZE, make_config, mcq_question, write_egomcq

from svitt_ego.data.egomcq import EgoMCQDataset, collate_egomcq, read_egomcq


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
