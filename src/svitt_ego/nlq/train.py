"""``svitt-ego train-nlq`` and ``predict-nlq``: the grounding model on extracted features.

Training runs in stages, each a list of NLQ-format annotation files and a number of epochs:
e.g. pretraining on narration queries, then fine-tuning on NLQ, as the paper did. Every epoch
ends with an atomic ``last.pt`` (model, optimizer, stage, epoch and the torch RNG state), from
which ``--resume`` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from svitt_ego.atomic import atomic_torch_save
from svitt_ego.nlq.annotations import NLQFormatError, NLQQuery, load_json, read_nlq
from svitt_ego.nlq.detection import decode, grounding_loss
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.metric import evaluate_nlq, make_submission, submission_entry
from svitt_ego.nlq.model import GroundingConfig, GroundingModel
from svitt_ego.nlq.narrations import jitter

log = logging.getLogger(__name__)
BEST_BY = "R@1 IoU=0.3"  # the validation score that picks best.pt


@dataclass
class TrainSettings:
    batch_size: int = 2      # GroundNLQ's NLQ training
    lr: float = 5e-5
    weight_decay: float = 0.05  # on convolution weights only
    warmup_epochs: int = 4   # linear warm-up from 0, then cosine to 1e-8, per iteration
    max_windows: int | None = 2560  # longer clips are cropped around the moment in training (None: never)
    seed: int = 0
    model: dict = field(default_factory=dict)  # GroundingConfig fields other than the dimensions


@dataclass
class Stage:
    annotations: list[str]
    epochs: int
    jitter: bool = False  # GroundNLQ's temporal jittering of the answers (its narration pretraining)


def training_queries(features: NLQFeatures, files: list) -> list[NLQQuery]:
    """The queries of ``files``, answers clamped to their clip (a training target never leaves it)."""
    queries = []
    for path in files:
        parsed = read_nlq(path)
        for q in parsed.queries:
            if q.start is None:
                raise NLQFormatError(f"{path}: clip {q.clip_uid} annotation {q.annotation_uid} query "
                                     f"{q.query_idx}: field 'clip_start_sec' is missing (no answer to train on)")
            features.clip(q.clip_uid)
            duration = parsed.clips[q.clip_uid].duration
            queries.append(replace(q, start=min(max(q.start, 0.0), duration), end=min(max(q.end, 0.0), duration)))
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


def _jittered(features: NLQFeatures, query: NLQQuery) -> NLQQuery:
    clip = features.clip(query.clip_uid)
    start, end = jitter(query.start, query.end, clip["frames"] / clip["fps"])
    return replace(query, start=start, end=end)


def _forward(model: GroundingModel, batch: dict, device: torch.device) -> list[dict]:
    return model(*(batch[k].to(device) for k in ("video", "video_mask", "text", "text_mask")))


def _learning_rate(settings: TrainSettings, step: int, warmup: int, total: int, floor: float = 1e-8) -> float:
    """GroundNLQ's per-iteration schedule: 0 to ``lr`` over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return settings.lr * step / max(1, warmup - 1)
    return floor + 0.5 * (settings.lr - floor) * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: GroundingModel, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW, weight decay on convolution weights only (not on biases, norms or scales)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv1d)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr)


def _train_epoch(model, optimizer, features, queries, settings, epoch: int, stage: Stage,
                 device: torch.device) -> dict:
    model.train()
    order = torch.randperm(len(queries)).tolist()
    steps = math.ceil(len(queries) / settings.batch_size)
    sums = {"loss": 0.0, "cls": 0.0, "reg": 0.0}
    for i in range(steps):
        chosen = [queries[j] for j in order[i * settings.batch_size:(i + 1) * settings.batch_size]]
        if stage.jitter:
            chosen = [_jittered(features, q) for q in chosen]
        batch = collate(features, chosen, model.multiple, settings.max_windows)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, epoch * steps + i, settings.warmup_epochs * steps, stage.epochs * steps)
        losses = grounding_loss(_forward(model, batch, device), batch["moments"].to(device), model.config,
                                float(model.loss_normalizer))
        model.loss_normalizer.fill_(losses["normalizer"])
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


def _validate(model: GroundingModel, features: NLQFeatures, val: Path, device: torch.device) -> dict:
    """The official metric of the model's predictions on ``val``."""
    parsed = read_nlq(val)
    results = predict_moments(model, features, parsed.queries, parsed.clips, device=device)
    return evaluate_nlq(load_json(val), make_submission(results), annotations_name=str(val))


def train_nlq(features_dir: str | Path, stages: list[Stage], out: str | Path, settings: TrainSettings | None = None,
              resume: bool = False, device: torch.device | str = "cpu", val: str | Path | None = None) -> GroundingModel:
    """Train the grounding model stage by stage; writes ``out/last.pt`` and ``out/metrics.jsonl``.

    With ``val`` (an NLQ file with answers) every epoch is scored on it with the official metric
    (in ``metrics.jsonl``) and the epoch with the best ``BEST_BY`` so far is also ``out/best.pt``.
    """
    settings = settings or TrainSettings()
    features, out, device = NLQFeatures(features_dir), Path(out), torch.device(device)
    last = out / "last.pt"
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue it, or another --out")
    torch.manual_seed(settings.seed)
    cfg = GroundingConfig(video_dim=features.manifest["dimension"], text_dim=features.manifest["text_dimension"],
                          **settings.model)
    model, position, optimizer_state, best = GroundingModel(cfg), (0, 0), None, None
    if resume and last.exists():
        model, state = load_grounding(last)
        position, optimizer_state = (state["stage"], state["epoch"]), state["optimizer"]
        best = state.get("best_val")
        torch.set_rng_state(state["rng"])
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    for s, stage in enumerate(stages[position[0]:], start=position[0]):
        queries = training_queries(features, stage.annotations)
        if s > 0 and (s != position[0] or position[1] == 0):
            model.reset_heads()  # a later stage fine-tunes with fresh heads, as GroundNLQ does
        optimizer = _optimizer(model, settings)
        if s == position[0] and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        for epoch in range(position[1] if s == position[0] else 0, stage.epochs):
            start = time.perf_counter()
            stats = _train_epoch(model, optimizer, features, queries, settings, epoch, stage, device)
            record = {"stage": s, "epoch": epoch + 1, **stats, "seconds": time.perf_counter() - start}
            improved = False
            if val is not None:
                record["val"] = _validate(model, features, Path(val), device)
                improved = best is None or record["val"][BEST_BY] > best
                best = record["val"][BEST_BY] if improved else best
            log.info("%s", record)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stage": s,
                          "epoch": epoch + 1, "rng": torch.get_rng_state(), "config": cfg.to_dict(),
                          "settings": asdict(settings), "best_val": best,
                          "features": {k: features.manifest.get(k) for k in ("checkpoint", "window", "stride")}}
            if improved:
                atomic_torch_save(checkpoint, out / "best.pt")
            atomic_torch_save(checkpoint, last)
    return model


@torch.no_grad()
def predict_moments(model: GroundingModel, features: NLQFeatures, queries: list[NLQQuery], clips: dict,
                    batch_size: int = 8, top_k: int = 5, device: torch.device | str = "cpu") -> list[dict]:
    """The official submission's ``results``: each query's ``top_k`` moments in clip seconds, best first.

    A batch holds queries of one clip only, so a query's moments do not depend on its batch.
    """
    model.to(device).eval()
    by_clip: dict[str, list[NLQQuery]] = {}
    for q in queries:
        by_clip.setdefault(q.clip_uid, []).append(q)
    found = {}
    for clip_queries in by_clip.values():
        for i in range(0, len(clip_queries), batch_size):
            chosen = clip_queries[i:i + batch_size]
            outputs = _forward(model, collate(features, chosen, model.multiple), torch.device(device))
            for row, q in enumerate(chosen):
                segments, _ = decode(outputs, row, model.config, top_k)
                seconds = features.to_seconds(q.clip_uid, segments.cpu().double())
                found[q.key] = submission_entry(q, seconds.clamp(0, clips[q.clip_uid].duration).tolist())
    return [found[q.key] for q in queries]


def predict_nlq(features_dir: str | Path, checkpoint: str | Path, annotations: str | Path, output: str | Path,
                top_k: int = 5, batch_size: int = 8) -> dict:
    """``svitt-ego predict-nlq``: write the official submission for every query of ``annotations``."""
    from svitt_ego.atomic import atomic_write_json

    model, _ = load_grounding(checkpoint)
    parsed = read_nlq(annotations)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = predict_moments(model, NLQFeatures(features_dir), parsed.queries, parsed.clips, batch_size, top_k,
                              device)
    submission = make_submission(results)
    atomic_write_json(output, submission)
    return submission
