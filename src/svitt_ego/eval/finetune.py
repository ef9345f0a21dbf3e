"""Fine-tuning on a downstream benchmark: one loop for every task, pretraining's own (docs/downstream.md).

A benchmark's module builds a :class:`Task` (its training clips, its objective, the evaluation of
the held-out part of its training split and of its test split); :func:`finetune` runs it with
the pieces pretraining has (:mod:`svitt_ego.train`): the run folder guard, the AdamW + warm-up +
cosine schedule, :func:`~svitt_ego.train.optimizer_step` (fp16 with a gradient scaler on CUDA,
non-finite steps skipped), the :class:`~svitt_ego.checkpoint.Checkpointer` (exact resume),
the :class:`~svitt_ego.train.MetricsLogger`, and DDP under torchrun. ``best.pt`` is the epoch
that scores best on the held-out training videos; the test split is scored once, after the
last epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from svitt_ego.atomic import atomic_write_json
from svitt_ego.checkpoint import Checkpointer, write_on_main
from svitt_ego.config import Config, ConfigError
from svitt_ego.data.dataset import EpochSampler
from svitt_ego.data.egoclip import pad_tags
from svitt_ego.data.tokenizer import tokenize
from svitt_ego.data.transforms import ClipTransform
from svitt_ego.data.video import VideoReadError, read_frames_by_index
from svitt_ego.distributed import barrier, decide_on_main, rank, world_size
from svitt_ego.models.loading import load_for_eval
from svitt_ego.models import SViTTEgo
from svitt_ego.run_folder import refuse_changes, run_folder, settings_changes
from svitt_ego.train import MetricsLogger, Run, TrainState, build_optimizer, seed_everything, train_epochs


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    """A fine-tuning run's settings; the defaults are LaViLa's EK-100 MIR recipe (docs/downstream.md)."""

    epochs: int = 100
    batch_size: int = 16  # per process; the negatives are those of the global batch
    lr: float = 3e-5
    min_lr: float = 1e-5  # the cosine schedule's end
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    num_frames: int = 16
    val_fraction: float = 0.1  # of the training videos, held out to choose best.pt
    seed: int = 0
    workers: int = 4

    def overrides(self, output: str | Path) -> list[str]:
        """The ``train.`` / ``data.`` / ``model.`` settings of the run (over the model's own config)."""
        return [f"model.vision.num_frames={self.num_frames}", f"train.output_dir={output}",
                f"train.epochs={self.epochs}", f"train.batch_size={self.batch_size}", f"train.lr={self.lr}",
                f"train.min_lr_ratio={self.min_lr / self.lr}", f"train.weight_decay={self.weight_decay}",
                f"train.warmup_epochs={self.warmup_epochs}", "train.betas=[0.9, 0.999]", "train.grad_accum=1",
                "train.grad_clip=", "train.max_steps=", "train.precision=fp16", "train.eval_every_epoch=true",
                f"train.seed={self.seed}", f"data.num_workers={self.workers}"]


def load_model(model: str | Path, recipe: Recipe, output: str | Path) -> tuple[SViTTEgo, Config]:
    """The model to start from (a ``save_pretrained`` folder or a pretraining checkpoint, re-inflated to
    ``recipe.num_frames``) and the run's config; ``output`` may not hold ``model`` (its pretraining run)."""
    model_path, out = Path(model).resolve(), Path(output).resolve()
    if out == model_path or out in model_path.parents:
        raise ConfigError(f"--output {output}: holds the model to fine-tune ({model}); a fine-tuning run "
                          "never writes into its pretraining run's folder, choose another", "--output")
    return load_for_eval(model, overrides=recipe.overrides(output))


def held_out(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A random ``fraction`` of the distinct ``keys`` (videos), at least one, leaving at least one."""
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise ConfigError(f"the training split has {len(distinct)} video(s); holding some out for validation "
                          "needs two or more", "--val-fraction")
    count = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
    order = np.random.default_rng([seed, 33]).permutation(len(distinct))
    return {distinct[i] for i in order[:count]}


# --------------------------------------------------------------------------- training clips


@dataclass(frozen=True)
class TrainingClip:
    """A span of a video file and its text; ``tags`` are the task's per-clip values (lists are padded)."""

    path: Path
    start: float  # seconds
    stop: float
    text: str
    tags: dict = field(default_factory=dict)


def jittered_frame_ids(start: int, end: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random frame of each of ``num_frames`` equal segments of frames ``[start, end)`` (LaViLa's
    ``get_frame_ids`` with jitter; without it, :func:`svitt_ego.eval.embed.segment_frame_ids`)."""
    size = (end - start - 1) / num_frames
    edges = np.round(size * np.arange(num_frames + 1)) + start
    low, high = edges[:-1].astype(np.int64), np.minimum(edges[1:].astype(np.int64), end)
    return rng.integers(low, np.maximum(high, low) + 1)


class TrainingClips(Dataset):
    """Item ``i``: ``{"frames": [T, 3, S, S]`` (the training transform), ``"text"``, ``"clip_idx": i``,
    ``"skipped": 0`` and the clip's tags``}``; its randomness (frames, crop, flip) comes from
    ``(seed, epoch, i)``, so that a resumed run sees the same clips (:meth:`set_epoch` before each epoch)."""

    def __init__(self, clips: Sequence[TrainingClip], cfg: Config):
        vision = cfg.model.vision
        self.clips, self.num_frames, self.seed, self.epoch = clips, vision.num_frames, cfg.train.seed, 0
        # LaViLa's: a random resized crop, no flip.
        self.transform = ClipTransform(vision.image_size, True, vision.mean, vision.std, scale=cfg.data.crop_scale,
                                       flip=False)

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        clip, rng = self.clips[index], np.random.default_rng([self.seed, self.epoch, index])
        frames = read_frames_by_index(clip.path, lambda fps: jittered_frame_ids(
            round(clip.start * fps), max(round(clip.start * fps) + 1, math.ceil(clip.stop * fps)),
            self.num_frames, rng))
        return {"frames": self.transform(frames, rng), "text": clip.text, "clip_idx": index, "skipped": 0,
                **clip.tags}


def collate_clips(tokenizer, max_length: int) -> Callable[[list[dict]], dict]:
    """The batch of :class:`TrainingClips` items: stacked frames, tokens, ``clip_idx`` and each tag as a
    tensor (lists of ids padded with -1)."""
    def collate(items: list[dict]) -> dict:
        batch = {"frames": torch.stack([item["frames"] for item in items]),
                 **tokenize(tokenizer, [item["text"] for item in items], max_length),
                 "clip_idx": torch.tensor([item["clip_idx"] for item in items]), "skipped": 0}
        for key in items[0].keys() - {"frames", "text", "clip_idx", "skipped"}:
            values = [item[key] for item in items]
            batch[key] = pad_tags(values) if isinstance(values[0], list) else torch.tensor(values)
        return batch

    return collate


# --------------------------------------------------------------------------- the task and the run


@dataclass
class Task:
    """What a benchmark gives :func:`finetune`."""

    command: str  # the CLI command, which the run folder names
    clips: list[TrainingClip]  # the training split less its held-out videos
    objective: Callable[[SViTTEgo], nn.Module]  # forward(batch) -> {"loss": ..., ...}
    validate: Callable[[SViTTEgo], dict]  # the held-out training videos: a dict with "score" (higher: better)
    test: Callable[[SViTTEgo], dict]  # the benchmark's test split
    settings: dict  # what the data means (files, classes, held-out videos): a resume must keep them


class TaskSettings:
    """The task's settings in a checkpoint (an object the :class:`Checkpointer` saves and loads): a
    resume whose settings differ is refused unless ``allow_change``, as a changed config is."""

    def __init__(self, settings: dict, path: Path, allow_change: bool):
        self.settings, self.path, self.allow_change = settings, path, allow_change

    def state_dict(self) -> dict:
        return self.settings

    def load_state_dict(self, saved: dict) -> None:
        refuse_changes(self.path, settings_changes(saved, self.settings), self.allow_change)


@dataclass
class FinetuneRun(Run):
    """A :class:`~svitt_ego.train.Run` whose data, objective and evaluation are a :class:`Task`'s."""

    task: Task | None = None

    def collate(self):
        return collate_clips(self.tokenizer, self.cfg.model.text.max_length)

    def before_training(self, state: TrainState) -> None:
        """The held-out videos' scores of the model as loaded (step 0): what fine-tuning starts from."""
        self.logger.scores(state, "val", self.task.validate(self.model))

    def evaluate(self, state: TrainState) -> tuple[dict, float, str]:
        results = self.task.validate(self.model)
        self.logger.scores(state, "val", results)
        return results, results["score"], "val"


def build_finetune_run(task: Task, model: SViTTEgo, cfg: Config, device: torch.device,
                       allow_config_change: bool) -> FinetuneRun:
    seed_everything(cfg.train.seed)
    t, out = cfg.train, Path(cfg.train.output_dir)
    model = model.to(device)
    objective = task.objective(model).to(device)
    wrapped = (nn.parallel.DistributedDataParallel(objective, gradient_as_bucket_view=True)
               if world_size() > 1 else objective)
    dataset = TrainingClips(task.clips, cfg)
    sampler = EpochSampler(len(dataset), 1.0, t.seed, t.batch_size, rank(), world_size())
    if sampler.batches_per_epoch < 1:
        raise ConfigError(f"{task.command}: {len(dataset)} training clips give no batch of {t.batch_size} per "
                          f"process (x {world_size()} processes)", "--batch-size")
    total_steps = t.epochs * sampler.batches_per_epoch
    optimizer, scheduler, scaler = build_optimizer(model, cfg, device, total_steps, sampler.batches_per_epoch)
    checkpointer = Checkpointer(out, t.keep_checkpoints, {  # the task's settings first: checked before loading
        "task": TaskSettings(task.settings, out / "last.pt", allow_config_change), "model": model,
        "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler})
    return FinetuneRun(cfg, device, model, wrapped, model.tokenizer, optimizer, scheduler, scaler, dataset,
                       sampler, total_steps, checkpointer, MetricsLogger(out, device), task)


def finetune(task: Task, model: SViTTEgo, cfg: Config, device: torch.device, resume: bool = False,
             allow_config_change: bool = False) -> dict:
    """Fine-tune ``model`` on ``task`` into ``cfg.train.output_dir``; returns the test split's scores of the
    last epoch's model, also written to ``test.json`` (``best.pt``: the best epoch on the held-out videos)."""
    out = Path(cfg.train.output_dir)
    missing = sorted({str(clip.path) for clip in task.clips if not clip.path.is_file()})
    if missing:
        raise VideoReadError(f"{missing[0]}: no such video file ({len(missing)} of the training videos are missing)")
    if not resume and decide_on_main((out / "last.pt").exists):
        raise FileExistsError(f"{out} already holds a run ({out / 'last.pt'}); pass --resume to continue it, "
                              "or choose another --output")
    with run_folder(out, task.command):
        run = build_finetune_run(task, model, cfg, device, allow_config_change)
        try:
            train_epochs(run, resume, allow_config_change)
            results = task.test(run.model)
            run.logger.scores(TrainState(step=run.total_steps, epoch=cfg.train.epochs), "test", results)
            write_on_main(out / "test.json", lambda: atomic_write_json(out / "test.json", results))
            write_on_main(out / "model", lambda: run.model.save_pretrained(out / "model"))
        finally:
            run.logger.close()
    barrier()
    return results
