"""What the NLQ subcommands of ``svitt-ego`` run: files in, files and a printed table out."""

from __future__ import annotations

from pathlib import Path

from svitt_ego.atomic import atomic_write_json
from svitt_ego.nlq.annotations import load_json, read_nlq
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.metric import evaluate_nlq, format_nlq, make_submission


def eval_nlq(submission: str | Path, annotations: str | Path, output: str | Path | None = None) -> dict:
    result = evaluate_nlq(load_json(annotations), load_json(submission), annotations_name=str(annotations),
                          submission_name=str(submission))
    print(format_nlq(result))
    if output is not None:
        atomic_write_json(output, {"submission": str(submission), "annotations": str(annotations), **result})
    return result


def predict_zero_shot(features_dir: str | Path, annotations: str | Path, output: str | Path,
                      top_k: int = 5, checkpoint: str | None = None) -> dict:
    """The dual encoder's zero-shot submission (see :mod:`svitt_ego.nlq.search`)."""
    from svitt_ego.nlq.search import load_dual_encoder, zero_shot_results

    features = NLQFeatures(features_dir)
    results = zero_shot_results(load_dual_encoder(features, checkpoint), features, read_nlq(annotations), top_k)
    submission = make_submission(results)
    atomic_write_json(output, submission)
    return submission
