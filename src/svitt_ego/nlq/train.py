"""``svitt-ego train-nlq`` and ``predict-nlq``: the grounding model on extracted features.

Training runs in stages, each a list of NLQ-format annotation files and its schedule: e.g.
pretraining on narration queries, then fine-tuning on NLQ, as the paper did, by default each with
GroundNLQ's recipe for that stage (:mod:`svitt_ego.nlq.recipe`, :func:`recipe_stage`). Every epoch
ends with an atomic ``last.pt`` (model, optimizer, stage, epoch, the torch RNG state and what the
run's state means: its settings, stages and features), from which ``--resume`` continues exactly;
a resume with other settings is refused naming them. The output folder is held through
:func:`svitt_ego.run_folder.run_folder`, so a second run into it is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from svitt_ego.atomic import atomic_torch_save
from svitt_ego.checkpoint import write_on_main
from svitt_ego.nlq.annotations import NLQFormatError, NLQQuery, load_json, read_nlq
from svitt_ego.nlq.detection import decode, grounding_loss
from svitt_ego.nlq.features import NLQFeatures
from svitt_ego.nlq.metric import evaluate_nlq, make_submission, submission_entry
from svitt_ego.nlq.model import GroundingConfig, GroundingModel
from svitt_ego.nlq.narrations import jitter
from svitt_ego.nlq.recipe import RECIPES
from svitt_ego.run_folder import MetricsFile, refuse_changes, run_folder, settings_changes
from svitt_ego.train import count_nonfinite

log = logging.getLogger(__name__)
BEST_BY = "R@1 IoU=0.3"  # the validation score that picks best.pt


@dataclass
class TrainSettings:
    """What holds for every stage of a run (a stage's schedule is its :class:`Stage`)."""
    weight_decay: float = 0.05  # on convolution weights only
    max_windows: int | None = None  # crop longer training clips around the moment to this (None: never)
    micro_batch: int | None = None  # queries per forward pass: a batch's gradients summed over its parts
    seed: int = 0
    model: dict = field(default_factory=dict)  # GroundingConfig fields other than the dimensions
    max_nonfinite: int = 10  # steps skipped for a non-finite loss or gradient before the run stops


# What may differ between a run and its resumption; any other setting, stage or feature key is refused.
RESUMABLE_CHANGES = ("settings.max_nonfinite", "settings.micro_batch")
# What a feature folder's manifest says about the features' meaning (not about which clips it holds).
FEATURE_KEYS = ("format", "checkpoint", "weights_digest", "what", "window", "stride", "frames", "fps", "dtype",
                "dimension", "text_dimension", "text_encoder", "time_convention")
# Bounds on the sizes that the weights' shapes do not show, or that are looped over before they are checked.
MAX_LEVELS, MAX_TEXT_LAYERS = 16, 64  # also the bound on stem_layers


@dataclass
class Stage:
    """One stage: its files and its schedule, a linear warm-up from 0 over ``warmup_epochs``, then a
    cosine to 1e-8 over ``epochs`` more, per iteration (``epochs`` counts after the warm-up, as
    GroundNLQ counts it). ``loss_norm_init`` None starts the loss normaliser at the model config's."""
    annotations: list[str]
    epochs: int
    lr: float
    batch_size: int
    warmup_epochs: int = 0
    jitter: bool = False  # GroundNLQ's temporal jittering of the answers (its narration pretraining)
    loss_norm_init: float | None = None

    @property
    def total_epochs(self) -> int:
        return self.warmup_epochs + self.epochs


def recipe_stage(name: str, annotations: list, **changes) -> Stage:
    """A stage with GroundNLQ's recipe ``name`` (``pretrain``, ``finetune``, ``scratch``), but
    ``changes`` (those given as None keep the recipe's)."""
    r = RECIPES[name]
    stage = Stage([str(a) for a in annotations], r.epochs, r.lr, r.batch_size, r.warmup_epochs, r.jitter,
                  r.loss_norm_init)
    return replace(stage, **{key: value for key, value in changes.items() if value is not None})


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


def collate(features: NLQFeatures, queries: list[NLQQuery], padded_length: Callable[[int], int],
            max_windows: int | None = None, generator: torch.Generator | None = None) -> dict:
    """Padded video [B, T, D], text [B, L, C], their masks, moments [B, 2] (window indices) and offsets.

    ``T`` is ``padded_length(longest clip)`` (:meth:`GroundingModel.padded_length`), ``L`` the
    longest query's tokens and one more: every row keeps a padded point after its last valid one,
    so a query's outputs do not depend on the other rows of its batch.
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
    length = padded_length(max(len(v) for v in videos))
    video = pad_sequence(videos, batch_first=True)
    video = torch.nn.functional.pad(video, (0, 0, 0, length - video.shape[1]))
    lengths = torch.tensor([len(v) for v in videos])
    text_lengths = torch.tensor([len(t) for t in texts])
    text_length = int(text_lengths.max()) + 1  # a padded token after every query, as for the video
    text = torch.nn.functional.pad(pad_sequence(texts, batch_first=True), (0, 0, 0, 1))
    return {"video": video, "video_mask": torch.arange(length)[None] < lengths[:, None], "text": text,
            "text_mask": torch.arange(text_length)[None] < text_lengths[:, None],
            "moments": torch.stack(moments), "offsets": torch.tensor(offsets)}


def _jittered(features: NLQFeatures, query: NLQQuery) -> NLQQuery:
    clip = features.clip(query.clip_uid)
    start, end = jitter(query.start, query.end, clip["frames"] / clip["fps"])
    return replace(query, start=start, end=end)


def _forward(model: GroundingModel, batch: dict, device: torch.device) -> list[dict]:
    return model(*(batch[k].to(device) for k in ("video", "video_mask", "text", "text_mask")))


def _learning_rate(lr: float, step: int, warmup: int, total: int, floor: float = 1e-8) -> float:
    """GroundNLQ's per-iteration schedule: 0 to ``lr`` over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return lr * step / max(1, warmup - 1)
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: GroundingModel, settings: TrainSettings, lr: float) -> torch.optim.Optimizer:
    """AdamW, weight decay on convolution weights only (not on biases, norms or scales); the
    learning rate is set before every step (:func:`_learning_rate`)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv1d)}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) in decay], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _backward(model: GroundingModel, features: NLQFeatures, chosen: list[NLQQuery], settings: TrainSettings,
              device: torch.device) -> dict:
    """Forward and backward of one batch, ``settings.micro_batch`` queries at a time; the gradients
    are the whole batch's (its losses summed over all its points, divided by the loss normaliser
    updated with all its positives), however it is split: each part's sums are backpropagated and
    the gradients divided by that normaliser at the end. Returns the batch's losses."""
    size, parts = settings.micro_batch or len(chosen), []
    for j in range(0, len(chosen), size):
        batch = collate(features, chosen[j:j + size], model.padded_length, settings.max_windows)
        losses = grounding_loss(_forward(model, batch, device), batch["moments"].to(device), model.config,
                                float(model.loss_normalizer))
        (losses["loss"] if size >= len(chosen) else losses["loss"] * losses["normalizer"]).backward()
        parts.append(losses)
    if len(parts) == 1:
        return parts[0]
    momentum, positives = model.config.loss_norm_momentum, sum(part["positives"] for part in parts)
    normalizer = momentum * float(model.loss_normalizer) + (1 - momentum) * max(positives, 1)
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.div_(normalizer)
    total = {key: sum(part[key].detach() * part["normalizer"] for part in parts) / normalizer
             for key in ("loss", "cls", "reg")}
    return {**total, "normalizer": normalizer, "positives": positives,
            "zero_offsets": sum(part["zero_offsets"] for part in parts)}


def _train_epoch(model, optimizer, features, queries, settings, stage: Stage, position: tuple[int, int],
                 device: torch.device, nonfinite: int) -> tuple[dict, int]:
    """One epoch of ``stage`` at ``position`` (stage index, epoch); returns its mean losses and the
    non-finite steps so far."""
    model.train()
    index, epoch = position
    order = torch.randperm(len(queries)).tolist()
    steps = math.ceil(len(queries) / stage.batch_size)
    sums, trained = {"loss": 0.0, "cls": 0.0, "reg": 0.0}, 0
    positives, zero_offsets = 0, torch.zeros(2, dtype=torch.long)
    bar = f"stage {index} epoch {epoch + 1}/{stage.total_epochs}"  # warm-up epochs included
    for i in tqdm(range(steps), desc=bar, unit="step", dynamic_ncols=True):
        chosen = [queries[j] for j in order[i * stage.batch_size:(i + 1) * stage.batch_size]]
        if stage.jitter:
            chosen = [_jittered(features, q) for q in chosen]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(stage.lr, epoch * steps + i, stage.warmup_epochs * steps,
                                         stage.total_epochs * steps)
        optimizer.zero_grad(set_to_none=True)
        losses = _backward(model, features, chosen, settings, device)
        model.loss_normalizer.fill_(losses["normalizer"])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (torch.isfinite(losses["loss"]) and torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            what = "loss" if not torch.isfinite(losses["loss"]) else "gradient"
            queries_named = [(q.clip_uid, q.annotation_uid, q.query_idx) for q in chosen]
            nonfinite = count_nonfinite(nonfinite, settings.max_nonfinite, "--max-nonfinite",
                                        f"{what} in stage {index}, epoch {epoch}, batch {i}; queries {queries_named}")
            continue
        optimizer.step()
        trained += 1
        for key in sums:
            sums[key] += float(losses[key].detach())
        positives, zero_offsets = positives + losses["positives"], zero_offsets + losses["zero_offsets"].cpu()
    stats = {key: value / max(trained, 1) for key, value in sums.items()}
    dead = [side for side, zeros in zip(("start", "end"), zero_offsets.tolist()) if positives and zeros == positives]
    if dead:
        stats["dead_offsets"] = dead
        log.warning("stage %d, epoch %d: the regression head's distance to the %s was 0 at all %d positives "
                    "of the epoch: its ReLU passes no gradient, so it will not recover "
                    "(restart it, e.g. at a lower --lr)", index, epoch + 1, " and the ".join(dead), positives)
    return stats, nonfinite


def _grounding_config(path: Path, config, weights) -> GroundingConfig:
    """The checkpoint's config, every field checked, and every size against the weights' own shapes,
    before anything of that size is allocated (the model is laid out on the meta device first)."""
    fields = {f.name: f for f in dataclasses.fields(GroundingConfig)}
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise NLQFormatError(f"{path}: not a train-nlq checkpoint ('config' and 'model' must be dicts)")
    unknown, missing = sorted(set(config) - set(fields)), [k for k in ("video_dim", "text_dim") if k not in config]
    problems = [f"has unknown keys {unknown}"] * bool(unknown) + [f"lacks {missing}"] * bool(missing)
    if problems:
        raise NLQFormatError(f"{path}: config {' and '.join(problems)}")
    for key, value in config.items():
        integer = fields[key].type in ("int", int)
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not abs(value) < 2**31:
            raise NLQFormatError(f"{path}: config field '{key}' is {_short(value)}, not "
                                 f"{'an integer' if integer else 'a number'} of magnitude below 2**31")
    cfg = GroundingConfig(**config)
    checks = {"levels": 1 <= cfg.levels <= MAX_LEVELS, "text_layers": 1 <= cfg.text_layers <= MAX_TEXT_LAYERS,
              "stem_layers": 1 <= cfg.stem_layers <= MAX_TEXT_LAYERS, "head_layers": 1 <= cfg.head_layers <= 16,
              "num_heads": 1 <= cfg.num_heads <= cfg.hidden and cfg.hidden % cfg.num_heads == 0,
              "window": 1 <= cfg.window <= 1025 and cfg.window % 2 == 1, "dropout": 0 <= cfg.dropout < 1,
              "drop_path": 0 <= cfg.drop_path < 1, "center_radius": cfg.center_radius > 0,
              "pre_nms": 1 <= cfg.pre_nms <= 100_000}
    for key, ok in checks.items():
        if not ok:
            raise NLQFormatError(f"{path}: config field '{key}' is {getattr(cfg, key)!r}, out of range")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GroundingModel(cfg).state_dict().items()}
    found = {name: tuple(t.shape) if isinstance(t, torch.Tensor) else None for name, t in weights.items()}
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise NLQFormatError(f"{path}: weight '{name}' has shape {found.get(name)}, its config gives "
                                 f"{expected.get(name)}")
    return cfg


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
    model = GroundingModel(_grounding_config(path, state["config"], state["model"]))
    model.load_state_dict(state["model"])
    return model, state


def _validate(model: GroundingModel, features: NLQFeatures, val: Path, device: torch.device) -> dict:
    """The official metric of the model's predictions on ``val``."""
    parsed = read_nlq(val)
    results = predict_moments(model, features, parsed.queries, parsed.clips, device=device)
    return evaluate_nlq(load_json(val), make_submission(results), annotations_name=str(val))


def _check_position(path: Path, state: dict) -> None:
    """What a resume reads besides the model: the position, the counts, the RNG state and the optimizer."""
    counts = [state.get(k, 0) for k in ("stage", "epoch", "nonfinite", "metrics_bytes")]
    rng, optimizer = state.get("rng"), state.get("optimizer")
    counted = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    if not (counted and isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and isinstance(optimizer, dict)):
        raise NLQFormatError(f"{path}: not a train-nlq checkpoint to resume ('stage', 'epoch', 'nonfinite', "
                             "'metrics_bytes' must be counts, 'rng' a byte tensor, 'optimizer' a dict)")


def _resume_changes(state: dict, meaning: dict) -> dict[str, tuple]:
    """How ``meaning`` (:func:`run_settings`) differs from the saved run's, in the stages begun so far:
    later ones may be added or changed."""
    begun = state["stage"] + 1
    saved = {key: state.get(key) for key in meaning}
    if isinstance(saved["stages"], list):
        saved["stages"] = saved["stages"][:begun]
    return settings_changes(saved, {**meaning, "stages": meaning["stages"][:begun]}, RESUMABLE_CHANGES)


def _short(value) -> str:
    """A number as written, anything else (or a huge integer) by its type: never a long repr."""
    small = isinstance(value, float) or (isinstance(value, int) and abs(value) < 2**64)
    return repr(value) if small else f"a {type(value).__name__}"


def run_settings(features: NLQFeatures, stages: list[Stage], settings: TrainSettings,
                 val: str | Path | None = None) -> dict:
    """What a run's state means: compared with the saved one when resuming."""
    return {"settings": asdict(settings), "features": {k: features.manifest.get(k) for k in FEATURE_KEYS},
            "stages": [{**asdict(stage), "annotations": [str(Path(a).resolve()) for a in stage.annotations]}
                       for stage in stages],
            "val": None if val is None else str(Path(val).resolve())}


def train_nlq(features_dir: str | Path, stages: list[Stage], out: str | Path, settings: TrainSettings | None = None,
              resume: bool = False, device: torch.device | str = "cpu", val: str | Path | None = None,
              allow_config_change: bool = False) -> GroundingModel:
    """Train the grounding model stage by stage; writes ``out/last.pt`` and ``out/metrics.jsonl``.

    With ``val`` (an NLQ file with answers) every epoch is scored on it with the official metric
    (in ``metrics.jsonl``) and the epoch with the best ``BEST_BY`` so far is also ``out/best.pt``.
    ``resume`` continues ``out/last.pt``; settings, features or stages begun so far other than its own
    are refused (naming the keys) unless ``allow_config_change``; later stages may be added. A second
    run into ``out`` is refused.
    """
    settings = settings or TrainSettings()
    features, out = NLQFeatures(features_dir), Path(out)
    with run_folder(out, "train-nlq"):
        return _train_nlq(features, stages, out, settings, resume, torch.device(device), val, allow_config_change)


def _train_nlq(features, stages, out, settings, resume, device, val, allow_config_change) -> GroundingModel:
    last, meaning = out / "last.pt", run_settings(features, stages, settings, val)
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue it, or another --output")
    torch.manual_seed(settings.seed)
    cfg = GroundingConfig(video_dim=features.manifest["dimension"], text_dim=features.manifest["text_dimension"],
                          **settings.model)
    model, state = GroundingModel(cfg), {"stage": 0, "epoch": 0, "nonfinite": 0, "metrics_bytes": 0}
    if resume and last.exists():
        model, state = load_grounding(last)
        _check_position(last, state)
        refuse_changes(last, _resume_changes(state, meaning), allow_config_change)
        torch.set_rng_state(state["rng"])
    metrics = MetricsFile(out / "metrics.jsonl")
    metrics.rewind(state.get("metrics_bytes"))
    model.to(device)
    position, nonfinite, best = (state["stage"], state["epoch"]), state.get("nonfinite", 0), state.get("best_val")
    try:
        for s, stage in enumerate(stages[position[0]:], start=position[0]):
            queries = training_queries(features, stage.annotations)
            if s != position[0] or position[1] == 0:  # the stage begins
                if s > 0:
                    model.reset_heads()  # a later stage fine-tunes with fresh heads, as GroundNLQ does
                if stage.loss_norm_init is not None:
                    model.loss_normalizer.fill_(stage.loss_norm_init)
            optimizer = _optimizer(model, settings, stage.lr)
            if s == position[0] and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
            for epoch in range(position[1] if s == position[0] else 0, stage.total_epochs):
                start = time.perf_counter()
                stats, nonfinite = _train_epoch(model, optimizer, features, queries, settings, stage, (s, epoch),
                                                device, nonfinite)
                record = {"stage": s, "epoch": epoch + 1, **stats, "seconds": time.perf_counter() - start}
                improved = False
                if val is not None:
                    record["val"] = _validate(model, features, Path(val), device)
                    improved = best is None or record["val"][BEST_BY] > best
                    best = record["val"][BEST_BY] if improved else best
                log.info("%s", record)
                metrics.write(record)
                saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stage": s,
                         "epoch": epoch + 1, "rng": torch.get_rng_state(), "config": model.config.to_dict(),
                         "nonfinite": nonfinite, "metrics_bytes": metrics.size, "best_val": best, **meaning}
                if improved:
                    write_on_main(out / "best.pt", lambda: atomic_torch_save(saved, out / "best.pt"))
                write_on_main(last, lambda: atomic_torch_save(saved, last))
    finally:
        metrics.close()
    return model


def check_inputs(checkpoint: str | Path, state: dict, config: GroundingConfig, features: NLQFeatures) -> None:
    """Refuse features the checkpoint's model cannot read, or whose queries another text encoder made."""
    where = features.folder / "manifest.json"
    for name, ours, theirs in (("video", config.video_dim, features.manifest["dimension"]),
                               ("text", config.text_dim, features.manifest["text_dimension"])):
        if ours != theirs:
            raise NLQFormatError(f"{checkpoint}: the model reads {name} features of dimension {ours}, {where} holds "
                                 f"{theirs}")
    trained_on = (state.get("features") or {}).get("text_encoder", features.manifest["text_encoder"])
    if trained_on != features.manifest["text_encoder"]:
        raise NLQFormatError(f"{checkpoint}: trained on queries encoded by {trained_on}, {where} holds queries "
                             f"encoded by {features.manifest['text_encoder']}")


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
            outputs = _forward(model, collate(features, chosen, model.padded_length), torch.device(device))
            for row, q in enumerate(chosen):
                segments, _ = decode(outputs, row, model.config, top_k)
                seconds = features.to_seconds(q.clip_uid, segments.cpu().double())
                found[q.key] = submission_entry(q, seconds.clamp(0, clips[q.clip_uid].duration).tolist())
    return [found[q.key] for q in queries]


def predict_nlq(features_dir: str | Path, checkpoint: str | Path, annotations: str | Path, output: str | Path,
                top_k: int = 5, batch_size: int = 8, device: str | None = None) -> dict:
    """``svitt-ego predict-nlq``: write the official submission for every query of ``annotations``, the model
    run on ``device`` (:func:`~svitt_ego.device.pick_device`)."""
    from svitt_ego.atomic import atomic_write_json
    from svitt_ego.device import pick_device

    model, state = load_grounding(checkpoint)
    features = NLQFeatures(features_dir)
    check_inputs(checkpoint, state, model.config, features)
    parsed = read_nlq(annotations)
    results = predict_moments(model, features, parsed.queries, parsed.clips, batch_size, top_k, pick_device(device))
    submission = make_submission(results)
    atomic_write_json(output, submission)
    return submission
