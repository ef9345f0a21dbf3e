"""The official Ego4D NLQ metric: Recall@{1, 5} at IoU {0.3, 0.5}, and mIoU.

A query counts for R@k at IoU m when one of its first k predicted intervals has an IoU
strictly greater than m with the answer as written in the file; the recalls are means over the
queries, in percent. ``mIoU`` is the mean over the queries of the first prediction's IoU (the
official script's ``np.mean(np.sort(overlap[0])[-3:])`` with its one answer per query). On a
submission that answers every query this is the official script's result, but for one case:
two intervals whose union is empty (a zero-length answer predicted exactly) have IoU 0, where
the official 0/0 gives NaN, never above a threshold either but NaN in its mIoU.
"""

from __future__ import annotations

from svitt_ego.data.errors import json_number
from svitt_ego.nlq.annotations import NLQFormatError, NLQQuery, parse_nlq
from svitt_ego.untrusted import shown

THRESHOLDS = (0.3, 0.5)
TOP_K = (1, 5)
CHALLENGE = "ego4d_nlq_challenge"


def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    union = max(a[1], b[1]) - min(a[0], b[0])
    if union <= 0:
        return 0.0
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) / union


def _predicted_times(entry: dict, where: str) -> list[tuple[float, float]]:
    times = entry.get("predicted_times")
    if not isinstance(times, list) or not times:
        raise NLQFormatError(f"{where}: field 'predicted_times' must be a non-empty list of [start, end]")
    out = []
    for i, pair in enumerate(times):
        numbers = [json_number(t) for t in pair] if isinstance(pair, (list, tuple)) and len(pair) == 2 else [None]
        if None in numbers or numbers[1] < numbers[0]:
            raise NLQFormatError(f"{where}: predicted_times[{i}] must be [start, end] with start <= end, "
                                 f"got {shown(pair)}")
        out.append((numbers[0], numbers[1]))
    return out


def read_submission(submission, source: str = "submission") -> dict[tuple[str, str, int], list]:
    """``{(clip_uid, annotation_uid, query_idx): [(start, end), ...]}`` of an official submission."""
    if not isinstance(submission, dict) or not isinstance(submission.get("results"), list):
        raise NLQFormatError(f"{source}: expected a JSON object with a 'results' list")
    predictions = {}
    for i, entry in enumerate(submission["results"]):
        where = f"{source}: results[{i}]"
        if not isinstance(entry, dict):
            raise NLQFormatError(f"{where}: must be an object")
        for name in ("clip_uid", "annotation_uid"):
            if not isinstance(entry.get(name), str):
                raise NLQFormatError(f"{where}: field '{name}' must be a string, got {shown(entry.get(name))}")
        idx = entry.get("query_idx")
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise NLQFormatError(f"{where}: field 'query_idx' must be an integer, got {shown(idx)}")
        key = (entry["clip_uid"], entry["annotation_uid"], idx)
        if key in predictions:
            raise NLQFormatError(f"{where}: query {key} is predicted twice")
        predictions[key] = _predicted_times(entry, f"{where} (query {key})")
    return predictions


def evaluate_nlq(annotations: dict, submission: dict, *, annotations_name: str = "annotations",
                 submission_name: str = "submission") -> dict:
    """R@1 / R@5 at IoU 0.3 / 0.5 and mIoU, in percent, of ``submission`` on ``annotations``.

    Both are the loaded JSON (an Ego4D NLQ file and an official submission); errors name them
    by ``annotations_name`` and ``submission_name``. Every query of the annotations must be
    predicted once, and nothing else.
    """
    queries = parse_nlq(annotations, annotations_name).queries
    predictions = read_submission(submission, submission_name)
    expected = {q.key for q in queries}
    unknown = [key for key in predictions if key not in expected]
    if unknown:
        raise NLQFormatError(f"{submission_name}: names {len(unknown)} queries the annotations do not have, "
                             f"e.g. {unknown[0]}")
    missing = [q.key for q in queries if q.key not in predictions]
    if missing:
        raise NLQFormatError(f"{submission_name}: misses {len(missing)} of {len(queries)} queries, e.g. {missing[0]}")
    unanswered = [q.key for q in queries if q.start is None]
    if unanswered:
        raise NLQFormatError(f"{annotations_name}: query {unanswered[0]} has no answer (clip_start_sec / clip_end_sec)")
    if not queries:
        raise NLQFormatError(f"{annotations_name}: no queries to evaluate")
    hits = {(k, m): 0 for k in TOP_K for m in THRESHOLDS}
    total_iou = 0.0
    for q in queries:
        ious = [interval_iou(p, (q.start, q.end)) for p in predictions[q.key]]
        total_iou += ious[0]
        for k, m in hits:
            hits[k, m] += any(iou > m for iou in ious[:k])
    result = {f"R@{k} IoU={m}": 100.0 * hits[k, m] / len(queries) for m in THRESHOLDS for k in TOP_K}
    result["mIoU"] = 100.0 * total_iou / len(queries)
    return result


def format_nlq(result: dict) -> str:
    keys = [f"R@{k} IoU={m}" for m in THRESHOLDS for k in TOP_K] + ["mIoU"]
    return "  ".join(f"{key} {result[key]:.2f}" for key in keys)


def submission_entry(query: NLQQuery, times: list) -> dict:
    return {"clip_uid": query.clip_uid, "annotation_uid": query.annotation_uid, "query_idx": query.query_idx,
            "predicted_times": [[round(s, 3), round(e, 3)] for s, e in times]}


def make_submission(results: list[dict]) -> dict:
    return {"version": "1.0", "challenge": CHALLENGE, "results": results}
