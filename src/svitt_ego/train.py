"""Pretraining: EgoNCE (or InfoNCE) + VTM + MLM on EgoClip, one process or many under torchrun.

:func:`pretrain` composes the parts: it holds the run folder
(:func:`~svitt_ego.run_folder.run_folder`), builds a :class:`Run`
(model, :class:`~svitt_ego.objective.PretrainingObjective`, data, AdamW with a cosine
schedule, a :class:`~svitt_ego.checkpoint.Checkpointer` and a :class:`MetricsLogger`),
resumes the :class:`TrainState` if asked, then runs :func:`train_one_epoch` (one
:func:`optimizer_step` per batch) and :func:`end_epoch` (EgoMCQ, checkpoint, ``best.pt``)
until the last epoch or ``train.max_steps``.

Resuming is exact: a checkpoint holds the model, optimizer, gradient scaler,
scheduler, the train state and every rank's RNG states; the data order of an
epoch is a function of (seed, epoch) and each clip's randomness of (seed, epoch,
index), so the resumed run sees the same batches in the same state as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from svitt_ego.atomic import atomic_write
from svitt_ego.checkpoint import Checkpointer, write_on_main
from svitt_ego.config import Config, ConfigError
from svitt_ego.data.dataset import EgoClipDataset, EpochSampler, collate_egoclip
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.data.video_uids import warn_shared_eval_videos
from svitt_ego.device import autocast, pick_device, to_device
from svitt_ego.distributed import (barrier, decide_on_main, is_main, rank, setup_distributed, true_on_every_rank,
                                   world_size)
from svitt_ego.eval.egomcq import egomcq_score, evaluate_egomcq
from svitt_ego.models import SViTTEgo, create_model
from svitt_ego.objective import PretrainingObjective
from svitt_ego.run_folder import MetricsFile, run_folder

__all__ = ["MetricsLogger", "NonFiniteStep", "Run", "TrainState", "build_optimizer", "cosine_schedule",
           "count_nonfinite", "optimizer_step", "parameter_groups", "pretrain", "train_epochs", "train_one_epoch"]

log = logging.getLogger(__name__)


def parameter_groups(model: SViTTEgo, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on parameters of fewer than two dimensions (biases, norms, layer
    scales, the temperature) and on those the model names in ``no_weight_decay()``."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``; the factor applied to the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- one step


class NonFiniteStep(Exception):
    """A step's loss or gradient was not finite on some rank; its gradients were dropped."""


def optimizer_step(objective: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   scheduler, batch: dict, cfg: Config, accumulate: bool = False) -> dict[str, torch.Tensor]:
    """Forward and backward on one batch, then (unless ``accumulate``) clip, step and schedule.

    ``objective`` is a :class:`PretrainingObjective`, DDP-wrapped or not; ``batch`` is on its
    device. Returns the detached losses. Raises :class:`NonFiniteStep` (after dropping every
    gradient accumulated since the last step) when the loss, or without a gradient scaler the
    gradient norm, is not finite on some rank. One host-device sync per call decides that for
    all ranks at once; with fp16 the scaler skips steps with non-finite gradients itself.
    """
    ddp = isinstance(objective, nn.parallel.DistributedDataParallel)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with objective.no_sync() if accumulate and ddp else contextlib.nullcontext():
        with autocast(cfg, batch["frames"].device):
            losses = objective(batch)
        scaler.scale(losses["loss"] / cfg.train.grad_accum).backward()
    checks = [torch.isfinite(losses["loss"].detach())]
    if not accumulate and not scaler.is_enabled():
        checks.append(torch.isfinite(_grad_norm(params, cfg.train.grad_clip)))
    finite = true_on_every_rank(torch.stack(checks))
    if not all(finite):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep("loss" if not finite[0] else "gradient")  # a non-finite loss has non-finite gradients
    if not accumulate:
        if scaler.is_enabled() and cfg.train.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return {k: v.detach() for k, v in losses.items()}


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """The total gradient norm (clipping to ``clip`` on the way, if given), without a host sync."""
    if clip is not None:
        return nn.utils.clip_grad_norm_(params, clip)
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


# --------------------------------------------------------------------------- state, logging


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides the model, optimizer, scheduler and scaler."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    best: float = -math.inf  # the best end-of-epoch score so far ...
    best_metric: str = ""  # ... and what it measures: "egomcq" (mean accuracy) or "-train_loss"
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient
    metrics_bytes: int | None = None  # the size of metrics.jsonl when saved (None: not recorded)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, state: dict) -> "TrainState":
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


class MetricsLogger:
    """Training and evaluation records into the progress bar, TensorBoard and ``metrics.jsonl`` (rank 0).

    Between two training records it counts clips (over all ranks) and skipped clips, so each
    record carries the throughput since the previous one.
    """

    def __init__(self, folder: Path, device: torch.device):
        self.enabled, self.device = is_main(), device
        self.writer = self.file = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(folder / "tensorboard")
            self.file = MetricsFile(folder / "metrics.jsonl")
        self._reset()

    @property
    def size(self) -> int | None:
        """How much of ``metrics.jsonl`` is written (rank 0; None elsewhere)."""
        return self.file.size if self.enabled else None

    def rewind(self, size: int | None) -> None:
        """Forget the records written after ``size`` bytes (those of steps a resumed run takes again)."""
        if self.enabled:
            self.file.rewind(size)

    def _reset(self) -> None:
        self.tic, self.clips, self.skipped = time.perf_counter(), 0, 0

    def progress(self, epoch: int, initial: int, total: int) -> tqdm:
        """The epoch's bar, counted by hand (one update per batch taken), so that it ends at its total
        even when the loop stops at the run's last step."""
        return tqdm(desc=f"epoch {epoch}", disable=not self.enabled, dynamic_ncols=True, initial=initial, total=total)

    def count(self, batch: dict) -> None:
        self.clips += batch["frames"].shape[0] * world_size()
        self.skipped += batch["skipped"]

    def train(self, progress: tqdm, state: TrainState, lr: float, temperature: torch.Tensor,
              losses: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        record = {"step": state.step, "epoch": state.epoch, "lr": lr,
                  "clips_per_s": self.clips / (time.perf_counter() - self.tic),
                  "temperature": temperature.item(), "skipped_clips": self.skipped,
                  **{k: v.item() for k, v in losses.items()}}
        postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.2e}", "clips_s": f"{record['clips_per_s']:.1f}"}
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            postfix["mem"] = f"{record['peak_mem_gb']:.1f}G"
        progress.set_postfix(**postfix)
        self._write(record, "train", exclude=("step", "epoch"))
        self._reset()

    def egomcq(self, state: TrainState, results: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": state.step, "epoch": state.epoch, **{f"egomcq_{k}": v for k, v in results.items()}},
                    "egomcq", include=("egomcq_inter", "egomcq_intra"))
        log.info("epoch %d: EgoMCQ inter %s, intra %s", state.epoch, *(
            "absent" if results[k] is None else f"{results[k]:.1f}%" for k in ("inter", "intra")))

    def scores(self, state: TrainState, section: str, results: dict) -> None:
        """An evaluation's numbers (``{name: value}``) as ``<section>_<name>`` records and scalars."""
        if self.enabled:
            self._write({"step": state.step, "epoch": state.epoch,
                         **{f"{section}_{k}": v for k, v in results.items() if isinstance(v, (int, float))}},
                        section, exclude=("step", "epoch"))

    def _write(self, record: dict, section: str, exclude: tuple = (), include: tuple | None = None) -> None:
        for key, value in record.items():
            if key not in exclude and (include is None or key in include) and value is not None:
                self.writer.add_scalar(f"{section}/{key.removeprefix(section + '_')}", value, record["step"])
        self.file.write(record)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.file.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a pretraining run works with, built once by :func:`build_run`."""

    cfg: Config
    device: torch.device
    model: SViTTEgo
    objective: nn.Module  # the PretrainingObjective, DDP-wrapped under torchrun
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dataset: EgoClipDataset
    sampler: EpochSampler
    total_steps: int
    checkpointer: Checkpointer
    logger: MetricsLogger

    def collate(self):
        """The DataLoader's collate function for :attr:`dataset`."""
        return collate_egoclip(self.tokenizer, self.cfg.model.text.max_length)

    def before_training(self, state: TrainState) -> None:
        """Called once on a fresh run, before its first step (fine-tuning scores its starting model)."""

    def evaluate(self, state: TrainState) -> tuple[dict, float, str] | None:
        """The end of an epoch's evaluation: ``(results, score, metric)`` (logged), the higher the score the
        better; None when there is nothing to evaluate on. Here EgoMCQ's mean accuracy."""
        if not (self.cfg.train.eval_every_epoch and decide_on_main(Path(self.cfg.data.egomcq).exists)):
            return None
        results = evaluate_egomcq(self.model, self.cfg, self.device, self.tokenizer)
        self.logger.egomcq(state, results)
        return results, egomcq_score(results), "egomcq"


def seed_everything(seed: int) -> None:
    # seed + rank: each rank draws its own random attention blocks, drop paths and MLM masks. That is
    # harmless for DDP, which averages gradients and never compares activations across ranks; the
    # parameters themselves are broadcast from rank 0 when DDP wraps the model.
    for set_seed in (torch.manual_seed, np.random.seed, random.seed):
        set_seed(seed + rank())


def build_optimizer(model: SViTTEgo, cfg: Config, device: torch.device, total_steps: int, steps_per_epoch: int):
    """AdamW (fused on CUDA) over :func:`parameter_groups`, its state sharded over the ranks with
    ``train.shard_optimizer`` under torchrun; its warm-up + cosine schedule by step, and the gradient
    scaler (enabled for fp16 on CUDA)."""
    t = cfg.train
    optimizer = _adamw(t)(parameter_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas),
                          fused=True if device.type == "cuda" else None)
    warmup = round(t.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, total_steps, warmup, t.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and t.precision == "fp16")
    return optimizer, scheduler, scaler


def _adamw(t) -> type[torch.optim.Optimizer]:
    """AdamW, or under torchrun with ``train.shard_optimizer`` its sharded form (imported only then)."""
    if not t.shard_optimizer or world_size() == 1:
        return torch.optim.AdamW
    from svitt_ego.sharding import ShardedAdamW

    return ShardedAdamW


def build_run(cfg: Config, device: torch.device) -> Run:
    seed_everything(cfg.train.seed)
    if cfg.loss.mlm_weight > 0 and not cfg.model.text.mlm_head:
        raise ConfigError(f"loss.mlm_weight={cfg.loss.mlm_weight} needs an MLM head, and model.text.mlm_head is "
                          "false (a model converted from a retrieval checkpoint); set loss.mlm_weight=0",
                          "loss.mlm_weight")
    model = create_model(cfg.model).to(device)  # with model.init_from, it names the tokenizer
    tokenizer = load_tokenizer(cfg.model.text)
    objective = PretrainingObjective(model, cfg, tokenizer).to(device)
    # The gradients are views into DDP's buckets: no second copy of them (0.76 GiB for the paper's model).
    wrapped = (nn.parallel.DistributedDataParallel(objective, gradient_as_bucket_view=True)
               if world_size() > 1 else objective)
    dataset = EgoClipDataset(cfg, train=True)
    if is_main():
        warn_shared_eval_videos(dataset.table, cfg.data.egomcq, cfg.data.exclude_videos)
    t = cfg.train
    sampler = EpochSampler(len(dataset), cfg.data.fraction_per_epoch, t.seed, t.batch_size, rank(), world_size())
    if sampler.batches_per_epoch < t.grad_accum:
        raise ConfigError(f"{cfg.data.egoclip}: {len(dataset)} clips give {sampler.batches_per_epoch} batches of "
                          f"{t.batch_size} per process, fewer than train.grad_accum={t.grad_accum}")
    steps_per_epoch = sampler.batches_per_epoch // t.grad_accum
    total_steps = min(t.epochs * steps_per_epoch, t.max_steps if t.max_steps is not None else math.inf)
    optimizer, scheduler, scaler = build_optimizer(model, cfg, device, total_steps, steps_per_epoch)
    checkpointer = Checkpointer(t.output_dir, t.keep_checkpoints, {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler})
    return Run(cfg, device, model, wrapped, tokenizer, optimizer, scheduler, scaler, dataset, sampler,
               total_steps, checkpointer, MetricsLogger(Path(t.output_dir), device))


def train_one_epoch(run: Run, state: TrainState) -> float | None:
    """Train from ``state.batch_in_epoch`` to the end of ``state.epoch`` (or ``run.total_steps``).

    Updates ``state`` as it goes and returns the mean loss of the batches it trained on (None if none).
    """
    cfg, t = run.cfg, run.cfg.train
    run.sampler.set_epoch(state.epoch, state.batch_in_epoch)
    run.dataset.set_epoch(state.epoch)
    loader = DataLoader(run.dataset, batch_size=t.batch_size, sampler=run.sampler,
                        collate_fn=run.collate(),
                        num_workers=cfg.data.num_workers, pin_memory=run.device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(t.seed + state.epoch))
    progress = run.logger.progress(state.epoch, state.batch_in_epoch, run.sampler.batches_per_epoch)
    loss_sum, trained = torch.zeros((), dtype=torch.float64, device=run.device), 0
    for batch in loader:
        batch = to_device(batch, run.device)
        state.batch_in_epoch += 1
        progress.update()
        run.logger.count(batch)
        accumulate = state.batch_in_epoch % t.grad_accum != 0
        try:
            losses = optimizer_step(run.objective, run.optimizer, run.scaler, run.scheduler, batch, cfg, accumulate)
        except NonFiniteStep as what:
            state.nonfinite = count_nonfinite(
                state.nonfinite, t.max_nonfinite, "train.max_nonfinite",
                f"{what} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch - 1}); "
                f"clip ids {batch['clip_idx'].tolist()}")
            continue
        loss_sum += losses["loss"]
        trained += 1
        if accumulate:
            continue
        state.step += 1
        if state.step % t.log_every == 0 or state.step == 1:
            run.logger.train(progress, state, run.scheduler.get_last_lr()[0], run.model.temperature, losses)
        if state.step % t.checkpoint_every == 0:
            save_state(run, state)
        if state.step >= run.total_steps:
            break
    progress.close()
    return loss_sum.item() / trained if trained else None


def count_nonfinite(count: int, limit: int, setting: str, what: str) -> int:
    """One more step skipped for a non-finite ``what`` (logged); more than ``limit`` stop the run."""
    count += 1
    log.error("non-finite %s; step skipped (%d of %d allowed)", what, count, limit)
    if count > limit:
        raise RuntimeError(f"{count} non-finite losses, more than {setting}={limit}; stopping")
    return count


def save_state(run: Run, state: TrainState) -> None:
    """``step-<N>.pt`` and ``last.pt``, recording how much of ``metrics.jsonl`` they have seen."""
    state.metrics_bytes = run.logger.size
    run.checkpointer.save(f"step-{state.step}.pt", state.to_dict(), run.cfg)


def end_epoch(run: Run, state: TrainState, mean_loss: float | None) -> dict:
    """After :func:`train_one_epoch`: move to the next epoch if this one is complete, evaluate it
    (:meth:`Run.evaluate`), checkpoint, and copy the checkpoint to ``best.pt`` if its score is the best so far.

    The score is the evaluation's when there is one, else minus the mean training loss.
    """
    batches = run.sampler.batches_per_epoch
    finished = state.batch_in_epoch >= batches - batches % run.cfg.train.grad_accum
    if finished:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    evaluated = run.evaluate(state) if finished else None
    if evaluated is not None:
        results, score, metric = evaluated
    else:
        results, score, metric = {}, (-mean_loss if mean_loss is not None else -math.inf), "-train_loss"
    improved = score > state.best
    if improved:
        state.best, state.best_metric = score, metric
    save_state(run, state)
    if improved:
        run.checkpointer.mark_best()
    return results


def start(run: Run, resume: bool, allow_config_change: bool) -> TrainState:
    """The state to start from: ``last.pt``'s when resuming and it exists (after checking the config),
    else a fresh one; then ``metrics.jsonl`` is cut back to what that state has seen (emptied when
    starting afresh) and ``config.yaml`` is written (atomically), once the checks have passed."""
    out, state = Path(run.cfg.train.output_dir), TrainState(metrics_bytes=0)
    saved = run.checkpointer.resume(run.cfg, allow_config_change) if resume else None
    if saved is not None:
        state = TrainState.from_checkpoint(saved)
        if is_main():
            log.info("resumed from %s at step %d (epoch %d, batch %d)", run.checkpointer.last, state.step,
                     state.epoch, state.batch_in_epoch)
    elif resume and is_main():
        log.info("no checkpoint in %s; starting afresh", out)
    run.logger.rewind(state.metrics_bytes)
    write_on_main(out / "config.yaml", lambda: atomic_write(out / "config.yaml", run.cfg.save))
    return state


def train_epochs(run: Run, resume: bool, allow_config_change: bool) -> dict:
    """:func:`start`, then :func:`train_one_epoch` and :func:`end_epoch` until the last epoch or step;
    returns the last evaluation's results."""
    state, results = start(run, resume, allow_config_change), {}
    if state.step == 0:
        run.before_training(state)
    run.model.train()
    while state.epoch < run.cfg.train.epochs and state.step < run.total_steps:
        results = end_epoch(run, state, train_one_epoch(run, state))
    return results


def pretrain(cfg: Config, resume: bool = False, allow_config_change: bool = False, device: str | None = None) -> dict:
    """Pretrain with ``cfg``; returns the last EgoMCQ accuracies (empty without evaluation).

    ``resume`` continues the run in ``train.output_dir`` from ``last.pt``; a config that changes
    what the saved state means is refused unless ``allow_config_change``. ``device``: :func:`pick_device`.
    """
    _, _, device = setup_distributed(pick_device(device))
    out = Path(cfg.train.output_dir)
    if not resume and decide_on_main((out / "last.pt").exists):
        raise FileExistsError(f"{out} already holds a run ({out / 'last.pt'}); pass --resume to continue it, "
                              "or choose another train.output_dir")
    with run_folder(out, "pretrain"):
        run = build_run(cfg, device)
        try:
            results = train_epochs(run, resume, allow_config_change)
            write_on_main(out / "model", lambda: run.model.save_pretrained(out / "model"))
        finally:
            run.logger.close()
    barrier()
    return results
