import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svitt_ego.nlq import NLQFormatError, evaluate_nlq
from svitt_ego.nlq.annotations import read_nlq
from svitt_ego.nlq.metric import interval_iou


def _query(start, end, text="When did I open the drawer?"):
    return {"query": text, "clip_start_sec": start, "clip_end_sec": end, "template": "x"}


def _annotations():
    return {"videos": [{"video_uid": "v1", "clips": [
        {"clip_uid": "c1", "video_start_sec": 0.0, "video_end_sec": 20.0,
         "annotations": [{"annotation_uid": "a1", "language_queries": [
             _query(-4e-07, 1.0, "Query Text: when did I cut the onion?"),
             _query(0.0, 3.0),
             {"query": None, "clip_start_sec": 0.0, "clip_end_sec": 1.0},  # skipped, keeps index 2
             _query(2.0, 4.0),
             _query(1.0, 1.0),  # a zero-length answer
         ]}]},
        {"clip_uid": "c2", "video_start_sec": 30.0, "video_end_sec": 40.0,
         "annotations": [{"annotation_uid": "a2", "language_queries": [_query(0.0, 4.0)]}]},
    ]}]}


def _submission(predictions):
    return {"version": "1.0", "challenge": "ego4d_nlq_challenge", "results": [
        {"clip_uid": c, "annotation_uid": a, "query_idx": i, "predicted_times": times}
        for (c, a, i), times in predictions.items()]}


PREDICTIONS = {
    ("c1", "a1", 0): [[0.0, 2.0]],                 # IoU 1/2: above 0.3, not above 0.5
    ("c1", "a1", 1): [[5.0, 6.0], [0.0, 10.0]],    # 0, then exactly 0.3: never counts
    ("c1", "a1", 3): [[0.0, 1.0], [2.0, 4.0]],     # 0, then 1: only R@5
    ("c1", "a1", 4): [[1.0, 1.0], [0.0, 2.0]],     # zero-length answer: IoU 0 both
    ("c2", "a2", 0): [[1.0, 4.0]],                 # 3/4, one prediction only
}


def test_hand_worked_values():
    result = evaluate_nlq(_annotations(), _submission(PREDICTIONS))
    assert result["R@1 IoU=0.3"] == pytest.approx(100 * 2 / 5)
    assert result["R@5 IoU=0.3"] == pytest.approx(100 * 3 / 5)
    assert result["R@1 IoU=0.5"] == pytest.approx(100 * 1 / 5)
    assert result["R@5 IoU=0.5"] == pytest.approx(100 * 2 / 5)
    # mean of the first predictions' IoU; the answer as written, -4e-07, makes query 0's 1 / (2 + 4e-07)
    assert result["mIoU"] == pytest.approx(100 * (1 / (2 + 4e-07) + 0 + 0 + 0 + 0.75) / 5, abs=1e-12)


def test_only_first_k_predictions_count():
    predictions = dict(PREDICTIONS)
    predictions["c2", "a2", 0] = [[10, 11]] * 5 + [[0.0, 4.0]]  # the right answer sixth
    result = evaluate_nlq(_annotations(), _submission(predictions))
    assert result["R@5 IoU=0.5"] == pytest.approx(100 * 1 / 5)


def test_interval_iou_by_hand():
    assert interval_iou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    assert interval_iou((0, 1), (2, 3)) == 0.0
    assert interval_iou((0, 10), (0, 3)) == 0.3
    assert interval_iou((1, 1), (1, 1)) == 0.0


def _official_iou(pred, gt):
    """The official script's compute_IoU (numpy, one prediction row against one answer)."""
    pred, gt = np.asarray(pred, float)[None], np.asarray(gt, float)[None]
    inter_left = np.maximum(pred[:, 0, None], gt[None, :, 0])
    inter_right = np.minimum(pred[:, 1, None], gt[None, :, 1])
    inter = np.maximum(0.0, inter_right - inter_left)
    union_left = np.minimum(pred[:, 0, None], gt[None, :, 0])
    union_right = np.maximum(pred[:, 1, None], gt[None, :, 1])
    union = np.maximum(0.0, union_right - union_left)
    return float((inter / union)[0, 0])


interval = st.tuples(st.floats(0, 100), st.floats(0.01, 50)).map(lambda p: (p[0], p[0] + p[1]))


@settings(max_examples=200, deadline=None)
@given(interval, interval)
def test_iou_matches_the_official_formula(a, b):
    assert interval_iou(a, b) == pytest.approx(_official_iou(a, b), abs=1e-12)
    assert interval_iou(a, b) == interval_iou(b, a)
    assert 0.0 <= interval_iou(a, b) <= 1.0


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop(("c2", "a2", 0)), r"misses 1 of 5 queries, e.g. \('c2', 'a2', 0\)"),
    (lambda p: p.update({("c1", "a1", 2): [[0, 1]]}), r"annotations do not have, e.g. \('c1', 'a1', 2\)"),
    (lambda p: p.update({("c1", "a1", 0): []}), r"results\[0\] \(query \('c1', 'a1', 0\)\): field 'predicted_times'"),
    (lambda p: p.update({("c1", "a1", 0): [[2, 1]]}), r"predicted_times\[0\] must be \[start, end\]"),
    (lambda p: p.update({("c1", "a1", 0): [[0, "1"]]}), r"predicted_times\[0\]"),
])
def test_bad_submissions_name_the_query(change, message):
    predictions = dict(PREDICTIONS)
    change(predictions)
    with pytest.raises(NLQFormatError, match=message):
        evaluate_nlq(_annotations(), _submission(predictions))


def test_malformed_submission_entries():
    submission = _submission(PREDICTIONS)
    submission["results"][1]["query_idx"] = True
    with pytest.raises(NLQFormatError, match=r"results\[1\]: field 'query_idx' must be an integer"):
        evaluate_nlq(_annotations(), submission)
    submission["results"][1]["query_idx"] = 0
    with pytest.raises(NLQFormatError, match="predicted twice"):
        evaluate_nlq(_annotations(), submission)
    with pytest.raises(NLQFormatError, match="'results' list"):
        evaluate_nlq(_annotations(), {"version": "1.0"})


def test_bad_annotations_name_the_field():
    annotations = _annotations()
    del annotations["videos"][0]["clips"][1]["annotations"][0]["language_queries"][0]["clip_end_sec"]
    with pytest.raises(NLQFormatError, match="clip c2 annotation a2 query 0: field 'clip_end_sec' is missing"):
        evaluate_nlq(annotations, _submission(PREDICTIONS))
    annotations = _annotations()
    annotations["videos"][0]["clips"][0]["video_end_sec"] = "20"
    with pytest.raises(NLQFormatError, match="clip c1: field 'video_end_sec' must be a finite number"):
        evaluate_nlq(annotations, _submission(PREDICTIONS))


@pytest.mark.parametrize("field, value", [("clip_uid", "../../outside"), ("clip_uid", "/etc/passwd"),
                                          ("annotation_uid", ".."), ("annotation_uid", "a/b")])
def test_ids_that_would_name_paths_are_refused(tmp_path, field, value):
    """clip_uid and annotation_uid name feature files: an id that is a path never reaches the disk."""
    clip = {"clip_uid": "c1", "video_start_sec": 0.0, "video_end_sec": 8.0,
            "annotations": [{"annotation_uid": "a1", "language_queries": [
                {"query": "where?", "clip_start_sec": 1.0, "clip_end_sec": 2.0}]}]}
    (clip if field == "clip_uid" else clip["annotations"][0])[field] = value
    path = tmp_path / "nlq.json"
    path.write_text(json.dumps({"videos": [{"video_uid": "v1", "clips": [clip]}]}))
    with pytest.raises(NLQFormatError, match=rf"field '{field}': '{re.escape(value)}' is not an id"):
        read_nlq(path)


def _official_scores(annotations, submission):
    """The official script's evaluate_nlq_performance restated: each prediction row against the
    answer exactly as written in the file, numpy IoU, R@k = any of the first k above m, mIoU =
    the first row's IoU, means over the submitted queries."""
    answers = {(c["clip_uid"], a["annotation_uid"]): a["language_queries"]
               for v in annotations["videos"] for c in v["clips"] for a in c["annotations"]}
    hits, first = {(k, m): [] for k in (1, 5) for m in (0.3, 0.5)}, []
    for entry in submission["results"]:
        q = answers[entry["clip_uid"], entry["annotation_uid"]][entry["query_idx"]]
        overlap = np.array([_official_iou(p, (q["clip_start_sec"], q["clip_end_sec"])) for p in entry["predicted_times"]])
        # The one documented difference: 0/0 (a zero-length answer predicted exactly) is NaN there, 0 here.
        first.append(np.nan_to_num(overlap[0]))
        for k, m in hits:
            hits[k, m].append((overlap > m)[:k].any())
    result = {f"R@{k} IoU={m}": 100 * np.mean(v) for (k, m), v in hits.items()}
    return result | {"mIoU": 100 * np.mean(first)}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_equals_the_official_metric_on_complete_submissions(data):
    """Answers at or past the clip's written end (88 real val answers end up to 0.43 s after
    video_end_sec - video_start_sec) are scored as written, as the official script does."""
    duration = data.draw(st.floats(5, 100))
    ends = st.one_of(st.just(duration), st.floats(duration, duration + 0.5), st.floats(1, duration))
    queries, predictions = [], {}
    for i in range(data.draw(st.integers(1, 6))):
        end = data.draw(ends)
        start = data.draw(st.floats(-4e-07, end))
        queries.append(_query(start, end))
        rows = data.draw(st.lists(st.tuples(st.floats(0, duration), st.floats(0, 20)), min_size=1, max_size=6))
        predictions["c1", "a1", i] = [[s, s + length] for s, length in rows]
    annotations = {"videos": [{"video_uid": "v1", "clips": [{"clip_uid": "c1", "video_start_sec": 3.1,
                   "video_end_sec": 3.1 + duration, "annotations": [{"annotation_uid": "a1",
                                                                      "language_queries": queries}]}]}]}
    submission = _submission(predictions)
    ours, official = evaluate_nlq(annotations, submission), _official_scores(annotations, submission)
    assert ours == pytest.approx(official, abs=1e-9)
