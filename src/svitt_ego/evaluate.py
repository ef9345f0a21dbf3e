"""EgoMCQ evaluation (and later NLQ feature extraction)."""

from __future__ import annotations

import torch

INTER_VIDEO, INTRA_VIDEO = 1, 2


def egomcq_accuracy(scores, answers, types) -> dict:
    """Accuracy in percent of EgoMCQ, per question type.

    A question is right when its highest-scoring choice is the answer; ties go to the
    first maximum (a row containing NaN counts as wrong). Type 1 is inter-video (choices
    from different videos), type 2 intra-video (choices from the query's video);
    EgoVLP's and LaViLa's printouts swap these two labels.

    Args:
        scores: [Q, C] scores of the C choices (tensor or array).
        answers: [Q] index of the right choice.
        types: [Q] question type, 1 (inter) or 2 (intra).

    Returns:
        ``{"inter": %, "intra": %, "num_inter": int, "num_intra": int}``; the accuracy of a
        type without questions is NaN.
    """
    scores = torch.as_tensor(scores).double().cpu()
    answers = torch.as_tensor(answers).long().cpu()
    types = torch.as_tensor(types).long().cpu()
    if scores.ndim != 2 or answers.shape != scores.shape[:1] or types.shape != scores.shape[:1]:
        raise ValueError(
            f"expected scores [Q, C], answers [Q], types [Q]; got {tuple(scores.shape)}, "
            f"{tuple(answers.shape)}, {tuple(types.shape)}"
        )
    if not torch.isin(types, torch.tensor([INTER_VIDEO, INTRA_VIDEO])).all():
        raise ValueError(f"types must be {INTER_VIDEO} (inter) or {INTRA_VIDEO} (intra)")

    num_choices = scores.shape[1]
    is_max = scores == scores.max(dim=1, keepdim=True).values
    choice_index = torch.arange(num_choices).expand_as(scores)
    prediction = torch.where(is_max, choice_index, num_choices).min(dim=1).values
    correct = prediction == answers

    accuracy, count = {}, {}
    for name, type_id in (("inter", INTER_VIDEO), ("intra", INTRA_VIDEO)):
        selected = types == type_id
        count[name] = int(selected.sum())
        accuracy[name] = 100.0 * correct[selected].double().mean().item() if count[name] else float("nan")
    return {**accuracy, "num_inter": count["inter"], "num_intra": count["intra"]}
