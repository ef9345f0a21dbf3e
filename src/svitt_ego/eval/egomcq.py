"""EgoMCQ evaluation.

Each question's narration is scored against its candidate clips (``score``):

- ``dual``: the cosine of the dual-encoder embeddings;
- ``vtm``: the VTM head's log-odds of "match" (logit 1 - logit 0) of the narration with each clip,
  through the multimodal encoder;
- ``both``: ``dual + vtm_weight * vtm``, SViTT's re-ranking of the dual encoder by the matching head.

A question is right when the best choice is the answer. Under torchrun every process takes every
``world_size``-th question, so none is counted twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from svitt_ego.atomic import atomic_write_text
from svitt_ego.config import Config, ConfigError
from svitt_ego.data.egomcq import INTER_VIDEO, INTRA_VIDEO, EgoMCQDataset, MCQQuestion, collate_egomcq, read_egomcq
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.device import autocast, pick_device, to_device
from svitt_ego.distributed import gather_objects, is_main, rank, setup_distributed, world_size
from svitt_ego.models import SViTTEgo
from svitt_ego.models.loading import load_for_eval

CHANCE = {"inter": 20.0, "intra": 20.0}  # five choices per question
SCORES = ("dual", "vtm", "both")
# The weight of the VTM log-odds in ``both``, picked on pseudo-questions of the demo's training split
# (benchmarks/multimodal.py), never on the evaluation questions: 0 and 0.01 tied there, larger weights
# lost; the largest of the best lets VTM break near-ties of the cosine.
VTM_WEIGHT = 0.01


def egomcq_accuracy(scores, answers, types) -> dict:
    """Accuracy in percent of EgoMCQ, per question type.

    A question is right when its highest-scoring choice is the answer; ties go to the
    first maximum (a row containing NaN counts as wrong). Type 1 is inter-video (choices
    from different videos), type 2 intra-video (choices from the query's video);
    EgoVLP's and LaViLa's printouts swap these two labels.

    Args:
        scores: [Q, C] scores of the C choices (tensor or array); questions with fewer
            choices pad their row with -inf.
        answers: [Q] index of the right choice.
        types: [Q] question type, 1 (inter) or 2 (intra).

    Returns:
        ``{"inter": %, "intra": %, "num_inter": int, "num_intra": int}``; the accuracy of a
        type without questions is None (absent, and ``null`` in JSON).
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
        accuracy[name] = 100.0 * correct[selected].double().mean().item() if count[name] else None
    return {**accuracy, "num_inter": count["inter"], "num_intra": count["intra"]}


def egomcq_score(result: dict) -> float:
    """One number to rank checkpoints by: the mean accuracy of the question types present."""
    present = [result[k] for k in ("inter", "intra") if result[k] is not None]
    return sum(present) / len(present) if present else -math.inf


@torch.no_grad()
def egomcq_scores(model: SViTTEgo, batch: dict, with_vtm: bool = False) -> dict[str, torch.Tensor]:
    """Scores [B, C] of each question's text against its C candidate clips: ``dual`` (the cosine) and,
    ``with_vtm``, ``vtm`` (the VTM head's log-odds of "match")."""
    frames, ids, mask = batch["frames"], batch["input_ids"], batch["attention_mask"]
    B, C = frames.shape[:2]
    video = model.forward_video(frames.flatten(0, 1))
    text = model.forward_text(ids, mask)
    video_emb = model.video_embedding(video).view(B, C, -1)
    scores = {"dual": torch.einsum("bcd,bd->bc", video_emb.float(), model.text_embedding(text, mask).float())}
    if with_vtm:
        logits = model.vtm_logits(text.repeat_interleave(C, 0), mask.repeat_interleave(C, 0), video.tokens).float()
        scores["vtm"] = (logits[:, 1] - logits[:, 0]).view(B, C)
    return scores


def combine_scores(scores: dict[str, torch.Tensor], score: str, vtm_weight: float = VTM_WEIGHT) -> torch.Tensor:
    """The ``score`` (one of :data:`SCORES`) of :func:`egomcq_scores`' output."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if score == "both":
        return scores["dual"] + vtm_weight * scores["vtm"]
    return scores[score]


def batches_by_choices(questions: list[MCQQuestion], batch_size: int) -> list[list[int]]:
    """Batches of question indices, each holding questions with the same number of choices (so they stack)."""
    groups: dict[int, list[int]] = {}
    for index, question in enumerate(questions):
        groups.setdefault(len(question.choices), []).append(index)
    return [indices[i:i + batch_size] for _, indices in sorted(groups.items())
            for i in range(0, len(indices), batch_size)]


@torch.no_grad()
def evaluate_egomcq(model: SViTTEgo, cfg: Config, device: torch.device, tokenizer=None, score: str = "dual",
                    vtm_weight: float = VTM_WEIGHT) -> dict:
    """EgoMCQ accuracy of ``model`` on ``cfg.data.egomcq`` by ``score``; every process returns the global result."""
    return evaluate_egomcq_scores(model, cfg, device, (score,), vtm_weight, tokenizer)[score]


@torch.no_grad()
def evaluate_egomcq_scores(model: SViTTEgo, cfg: Config, device: torch.device, scores=SCORES,
                           vtm_weight: float = VTM_WEIGHT, tokenizer=None) -> dict[str, dict]:
    """EgoMCQ accuracy by each of ``scores`` (from one pass over the clips), keyed by score."""
    raw, answers, types = egomcq_choice_scores(model, cfg, device, tokenizer, with_vtm=set(scores) != {"dual"})
    return {score: egomcq_accuracy(combine_scores(raw, score, vtm_weight), answers, types) for score in scores}


@torch.no_grad()
def egomcq_choice_scores(model: SViTTEgo, cfg: Config, device: torch.device, tokenizer=None,
                         with_vtm: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`egomcq_scores` of every question of ``cfg.data.egomcq`` ([Q, C], rows of fewer choices padded
    with -inf), their answers and types [Q]; every process returns all questions."""
    questions = read_egomcq(cfg.data.egomcq)
    if not questions:
        raise ConfigError(f"data.egomcq: {cfg.data.egomcq} holds no questions")
    width = max(len(q.choices) for q in questions)
    mine = questions[rank()::world_size()]
    tokenizer = tokenizer or load_tokenizer(cfg.model.text)
    loader = DataLoader(EgoMCQDataset(cfg, mine), batch_sampler=batches_by_choices(mine, cfg.eval.batch_size),
                        collate_fn=collate_egomcq(tokenizer, cfg.model.text.max_length),
                        num_workers=cfg.data.num_workers)
    was_training = model.training
    model.eval()
    names = ("dual", "vtm") if with_vtm else ("dual",)
    scores = {name: [torch.empty(0, width, dtype=torch.float64)] for name in names}
    answers, types = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
    for batch in tqdm(loader, desc="EgoMCQ", disable=not is_main(), dynamic_ncols=True):
        batch = to_device(batch, device)
        with autocast(cfg, device):
            batch_scores = egomcq_scores(model, batch, with_vtm)
        for name, score in batch_scores.items():
            scores[name].append(F.pad(score.double().cpu(), (0, width - score.shape[1]), value=-math.inf))
        answers.append(batch["answer"].cpu())
        types.append(batch["type"].cpu())
    model.train(was_training)
    parts = gather_objects(({name: torch.cat(s) for name, s in scores.items()}, torch.cat(answers), torch.cat(types)))
    gathered = {name: torch.cat([p[0][name] for p in parts]) for name in names}
    return gathered, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def format_egomcq(rows: dict[str, dict]) -> str:
    """A table of accuracies, one row per named result, and the number of questions of each type."""
    def cell(value) -> str:
        return f"{'-':>8s}" if value is None else f"{value:>8.1f}"

    lines = [f"{'EgoMCQ':14s}{'inter':>8s}{'intra':>8s}"]
    counted = next((r for r in rows.values() if "num_inter" in r), None)
    if counted is not None:
        lines.append(f"{'questions':14s}{counted['num_inter']:>8d}{counted['num_intra']:>8d}")
    lines += [f"{name:14s}{cell(r['inter'])}{cell(r['intra'])}" for name, r in rows.items()]
    return "\n".join(lines)


def run_egomcq(checkpoint: str | Path, config: str | None = None, overrides: list[str] | tuple = (),
               output: str | Path | None = None, score: str = "dual", vtm_weight: float | None = None,
               device: str | None = None) -> dict:
    """``svitt-ego eval-mcq``: evaluate by ``score`` on ``device`` (:func:`pick_device`), print the table,
    optionally write JSON."""
    vtm_weight = VTM_WEIGHT if vtm_weight is None else vtm_weight
    if not math.isfinite(vtm_weight):
        raise ConfigError(f"--vtm-weight: must be a finite number, got {vtm_weight}", "--vtm-weight")
    if output is not None and os.path.lexists(output) and not Path(output).is_file():
        raise ConfigError(f"--output {output}: exists and is not a regular file; give a file name", "--output")
    _, _, device = setup_distributed(pick_device(device))
    model, cfg = load_for_eval(checkpoint, config, overrides)
    result = evaluate_egomcq(model.to(device), cfg, device, score=score, vtm_weight=vtm_weight)
    if is_main():
        print(format_egomcq({"accuracy (%)" if score == "dual" else f"{score} (%)": result}))
        if output is not None:
            scoring = {"score": score, **({"vtm_weight": vtm_weight} if score == "both" else {})}
            atomic_write_text(output, json.dumps({"checkpoint": str(checkpoint), **scoring, **result}, indent=2,
                                                 allow_nan=False))
    return result
