"""``svitt-ego train-nlq`` and ``predict-nlq``: the grounding model on extracted features.

Training runs in stages, each a list of NLQ-format annotation files and a number of epochs:
e.g. pretraining on Moment Queries converted to NLQ format, then fine-tuning on NLQ, as the
paper did. Every epoch ends with an atomic ``last.pt`` (model, optimizer, stage, epoch and the
torch RNG state), from which ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from svitt_ego.nlq.annotations import NLQFormatError, NLQQuery, read_nlq
from svitt_ego.nlq.detection import decode, grounding_loss
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.io import atomic_torch_save
from svitt_ego.nlq.metric import make_submission, submission_entry
from svitt_ego.nlq.model import GroundingConfig, GroundingModel

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    max_windows: int = 2560  # longer clips are cropped around the moment in training
    seed: int = 0
    model: dict = field(default_factory=dict)  # GroundingConfig fields other than the dimensions


@dataclass
class Stage:
    annotations: list[str]
    epochs: int


def training_queries(features: NLQFeatures, files: list) -> list[NLQQuery]:
    queries = []
    for path in files:
        for q in read_nlq(path).queries:
            if q.start is None:
                raise NLQFormatError(f"{path}: clip {q.clip_uid} annotation {q.annotation_uid} query "
                                     f"{q.query_idx}: field 'clip_start_sec' is missing (no answer to train on)")
            features.clip(q.clip_uid)
            queries.append(q)
    return queries


def collate(features: NLQFeatures, queries: list[NLQQuery], multiple: int, max_windows: int | None = None,
            generator: torch.Generator | None = None) -> dict:
    """Padded video [B, T, D], text [B, L, C], their masks, moments [B, 2] (window indices) and offsets.

    With ``max_windows`` a longer clip is cut to a random crop of that many windows that holds
    as much of the moment as fits; ``offsets`` says where each row starts in its clip.
    """
    videos, offsets, moments = [], [], []
    for q in queries:
        video = features.video(q.clip_uid).float()
        moment = torch.tensor([features.to_index(q.clip_uid, q.start or 0.0),
                               features.to_index(q.clip_uid, q.end or 0.0)])
        offset = 0
        if max_windows is not None and len(video) > max_windows:
            low = int(min(max(moment[1].item() - max_windows + 1, 0), len(video) - max_windows))
            high = int(max(min(moment[0].item(), len(video) - max_windows), low))
            offset = int(torch.randint(low, high + 1, (1,), generator=generator))
            video = video[offset:offset + max_windows]
        videos.append(video)
        offsets.append(offset)
        moments.append(moment - offset)
    texts = [features.text(q).float() for q in queries]
    length = math.ceil(max(len(v) for v in videos) / multiple) * multiple
    video = pad_sequence(videos, batch_first=True)
    video = torch.nn.functional.pad(video, (0, 0, 0, length - video.shape[1]))
    lengths = torch.tensor([len(v) for v in videos])
    text_lengths = torch.tensor([len(t) for t in texts])
    return {"video": video, "video_mask": torch.arange(length)[None] < lengths[:, None],
            "text": pad_sequence(texts, batch_first=True),
            "text_mask": torch.arange(max(text_lengths))[None] < text_lengths[:, None],
            "moments": torch.stack(moments), "offsets": torch.tensor(offsets)}


def _forward(model: GroundingModel, batch: dict, device: torch.device) -> list[dict]:
    return model(*(batch[k].to(device) for k in ("video", "video_mask", "text", "text_mask")))


def _learning_rate(settings: TrainSettings, step: int, total: int) -> float:
    warmup = max(1, round(settings.warmup_fraction * total))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return settings.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: GroundingModel, settings: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _train_epoch(model, optimizer, features, queries, settings, epoch: int, epochs: int,
                 device: torch.device) -> dict:
    model.train()
    order = torch.randperm(len(queries)).tolist()
    steps = math.ceil(len(queries) / settings.batch_size)
    sums = {"loss": 0.0, "cls": 0.0, "reg": 0.0}
    for i in range(steps):
        chosen = [queries[j] for j in order[i * settings.batch_size:(i + 1) * settings.batch_size]]
        batch = collate(features, chosen, model.multiple, settings.max_windows)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, epoch * steps + i, epochs * steps)
        losses = grounding_loss(_forward(model, batch, device), batch["moments"].to(device), model.config)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for key in sums:
            sums[key] += float(losses[key].detach()) / steps
    return sums


def load_grounding(path: str | Path) -> tuple[GroundingModel, dict]:
    """The grounding model of a ``train-nlq`` checkpoint, and the checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise NLQFormatError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise NLQFormatError(f"{path}: not a readable checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise NLQFormatError(f"{path}: not a train-nlq checkpoint (no 'model' or 'config')")
    model = GroundingModel(GroundingConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return model, state


def train_nlq(features_dir: str | Path, stages: list[Stage], out: str | Path, settings: TrainSettings | None = None,
              resume: bool = False, device: torch.device | str = "cpu") -> GroundingModel:
    """Train the grounding model stage by stage; writes ``out/last.pt`` and ``out/metrics.jsonl``."""
    settings = settings or TrainSettings()
    features, out, device = NLQFeatures(features_dir), Path(out), torch.device(device)
    last = out / "last.pt"
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue it, or another --out")
    torch.manual_seed(settings.seed)
    cfg = GroundingConfig(video_dim=features.meta["dimension"], text_dim=features.meta["text_dimension"],
                          **settings.model)
    model, position, optimizer_state = GroundingModel(cfg), (0, 0), None
    if resume and last.exists():
        model, state = load_grounding(last)
        position, optimizer_state = (state["stage"], state["epoch"]), state["optimizer"]
        torch.set_rng_state(state["rng"])
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    for s, stage in enumerate(stages[position[0]:], start=position[0]):
        queries = training_queries(features, stage.annotations)
        optimizer = _optimizer(model, settings)
        if s == position[0] and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        for epoch in range(position[1] if s == position[0] else 0, stage.epochs):
            start = time.perf_counter()
            stats = _train_epoch(model, optimizer, features, queries, settings, epoch, stage.epochs, device)
            record = {"stage": s, "epoch": epoch + 1, **stats, "seconds": time.perf_counter() - start}
            log.info("%s", record)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stage": s,
                               "epoch": epoch + 1, "rng": torch.get_rng_state(), "config": cfg.to_dict(),
                               "settings": asdict(settings), "features": {k: features.meta.get(k) for k in
                                                                          ("checkpoint", "window", "stride")}},
                              last)
    return model


@torch.no_grad()
def predict_moments(model: GroundingModel, features: NLQFeatures, queries: list[NLQQuery], clips: dict,
                    batch_size: int = 8, top_k: int = 5, device: torch.device | str = "cpu") -> list[dict]:
    """The official submission's ``results``: each query's ``top_k`` moments in clip seconds, best first."""
    model.to(device).eval()
    results = []
    for i in range(0, len(queries), batch_size):
        chosen = queries[i:i + batch_size]
        outputs = _forward(model, collate(features, chosen, model.multiple), torch.device(device))
        for row, q in enumerate(chosen):
            segments, _ = decode(outputs, row, top_k)
            seconds = features.to_seconds(q.clip_uid, segments.cpu().double()).clamp(0, clips[q.clip_uid].duration)
            results.append(submission_entry(q, seconds.tolist()))
    return results


def predict_nlq(features_dir: str | Path, checkpoint: str | Path, annotations: str | Path, output: str | Path,
                top_k: int = 5, batch_size: int = 8) -> dict:
    """``svitt-ego predict-nlq``: write the official submission for every query of ``annotations``."""
    from svitt_ego.nlq.io import atomic_write_json

    model, _ = load_grounding(checkpoint)
    parsed = read_nlq(annotations)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = predict_moments(model, NLQFeatures(features_dir), parsed.queries, parsed.clips, batch_size, top_k,
                              device)
    submission = make_submission(results)
    atomic_write_json(output, submission)
    return submission
