"""EgoMCQ evaluation (and later NLQ feature extraction).

Each question's narration is scored against its five candidate clips by the
cosine of the dual-encoder embeddings; a question is right when the best
choice is the answer. Under torchrun every process takes every
``world_size``-th question, so none is counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from svitt_ego.config import Config, config_from_dict, load_config, override
from svitt_ego.data.egomcq import INTER_VIDEO, INTRA_VIDEO, EgoMCQDataset, collate_egomcq, read_egomcq
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.models import SViTTEgo


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


@torch.no_grad()
def egomcq_scores(model: SViTTEgo, batch: dict) -> torch.Tensor:
    """Cosine scores [B, C] of each question's text against its C candidate clips."""
    frames = batch["frames"]
    B, C = frames.shape[:2]
    video = model.encode_video(frames.flatten(0, 1)).view(B, C, -1)
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return torch.einsum("bcd,bd->bc", video.float(), text.float())


@torch.no_grad()
def evaluate_egomcq(model: SViTTEgo, cfg: Config, device: torch.device, tokenizer=None) -> dict:
    """EgoMCQ accuracy of ``model`` on ``cfg.data.egomcq``; every process returns the global result."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tokenizer = tokenizer or load_tokenizer(cfg.model.text)
    questions = read_egomcq(cfg.data.egomcq)
    loader = DataLoader(EgoMCQDataset(cfg, questions[rank::world_size]), batch_size=cfg.train.batch_size,
                        collate_fn=collate_egomcq(tokenizer, cfg.model.text.max_length),
                        num_workers=cfg.data.num_workers)
    from svitt_ego.train import autocast_dtype

    amp_dtype = autocast_dtype(cfg, device)
    was_training = model.training
    model.eval()
    scores, answers, types = [], [], []
    for batch in tqdm(loader, desc="EgoMCQ", disable=rank != 0, dynamic_ncols=True):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores.append(egomcq_scores(model, batch).cpu())
        answers.append(batch["answer"].cpu())
        types.append(batch["type"].cpu())
    model.train(was_training)
    local = (torch.cat(scores), torch.cat(answers), torch.cat(types))
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, local)
        local = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
    return egomcq_accuracy(*local)


def format_egomcq(result: dict) -> str:
    return (f"{'EgoMCQ':14s}{'inter':>8s}{'intra':>8s}\n"
            f"{'questions':14s}{result['num_inter']:>8d}{result['num_intra']:>8d}\n"
            f"{'accuracy (%)':14s}{result['inter']:>8.1f}{result['intra']:>8.1f}")


def load_for_eval(checkpoint: str | Path, config: str | None = None,
                  overrides: list[str] | tuple = ()) -> tuple[SViTTEgo, Config]:
    """A model and its config from a training checkpoint (``.pt``) or a ``save_pretrained`` folder.

    The model's settings always come from the checkpoint. The rest (data paths,
    batch size) comes from ``config`` if given, else from the training
    checkpoint's own config; ``overrides`` apply last.
    """
    path = Path(checkpoint)
    if path.is_dir():
        model = SViTTEgo.from_pretrained(path)
        cfg = load_config(config) if config else Config()
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = config_from_dict(state["config"])
        cfg = load_config(config) if config else saved
        model = SViTTEgo(saved.model)
        model.load_state_dict(state["model"])
    cfg.model = model.config
    return model, override(cfg, overrides)


def run_egomcq(checkpoint: str | Path, config: str | None = None, overrides: list[str] | tuple = (),
               output: str | Path | None = None) -> dict:
    """``svitt-ego eval-mcq``: evaluate, print the table, optionally write JSON."""
    from svitt_ego.train import setup_distributed

    rank, _, device = setup_distributed()
    model, cfg = load_for_eval(checkpoint, config, overrides)
    result = evaluate_egomcq(model.to(device), cfg, device)
    if rank == 0:
        print(format_egomcq(result))
        if output is not None:
            Path(output).write_text(json.dumps({"checkpoint": str(checkpoint), **result}, indent=2))
    return result
