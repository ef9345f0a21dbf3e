"""Will it fit? The peak GPU memory of one pretraining step, predicted on a machine without a GPU.

:func:`plan_memory` runs the trainer's own step (:class:`~svitt_ego.objective.PretrainingObjective`
forward with hard negatives, backward, :func:`~svitt_ego.train.optimizer_step` with fused AdamW and
the gradient scaler) on fake tensors through :mod:`svitt_ego.memory_engine` and returns the peak
by part; :func:`largest_batch` finds the largest ``train.batch_size`` that fits a card.
docs/memory.md lists what is substituted and the reserve constants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from svitt_ego.config import Config, ConfigError, VisionConfig, load_config
from svitt_ego.device import AUTOCAST_DTYPES
from svitt_ego.memory_engine import StepContext, StepParts, block_bytes, gib, measure_step, training_flops
from svitt_ego.models import SViTTEgo, VideoEncoder, attention
from svitt_ego.objective import PretrainingObjective
from svitt_ego.train import build_optimizer, optimizer_step, parameter_groups

# What a card needs besides the step's peak (docs/memory.md): the CUDA context (outside
# max_memory_allocated), and the caching allocator's fragmentation (reserved over allocated).
CUDA_CONTEXT_BYTES = int(0.75 * 2**30)
FRAGMENTATION = 0.10
# BERT's special ids ([PAD], [UNK], [CLS], [SEP], [MASK]): all the objective reads of a tokenizer.
BERT_TOKENS = SimpleNamespace(all_special_ids=[0, 100, 101, 102, 103], mask_token_id=103)
# The operator namespace of the fused kernel (a ``torch.library.custom_op``).
KERNEL_NAMESPACE = "svitt_ego::"
UNITS = {"": 2**30, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
MAX_BATCH = 4096
_MISSING = object()


@dataclass
class MemoryPlan:
    """The predicted peak of one training step on one GPU, by part, in bytes."""

    batch_size: int
    world_size: int
    backend: str
    precision: str
    peak_bytes: int
    parts: dict[str, int]
    where: str  # forward, backward or optimizer
    saved_bytes: int  # activations kept for backward at the end of the forward
    clips: int  # clips per step (the batch and its hard negatives)
    flops_per_clip: float  # the whole step (forward + backward), counted
    video_flops_per_clip: float  # the video encoder's forward + backward
    dense_flops_per_clip: float  # the same encoder without edge or node sparsity, on the same tokens
    notes: list[str]

    @property
    def peak_gib(self) -> float:
        return gib(self.peak_bytes)

    def needed_bytes(self) -> float:
        """The card memory this step needs: the peak plus the reserve (docs/memory.md)."""
        return self.peak_bytes * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES

    def to_dict(self, fitted: "Fit | None" = None) -> dict:
        """The plan as JSON (GiB); with ``fitted``, also the largest batch that fits the card."""
        card = {} if fitted is None else {
            "gpu_memory_gib": gib(fitted.gpu_bytes), "largest_batch": fitted.largest_batch,
            "checkpointing_needed": fitted.checkpointing_needed,
            "largest_batch_checkpointed": fitted.largest_batch_checkpointed}
        return {**card, "peak_gib": self.peak_gib, "parts": {k: gib(v) for k, v in self.parts.items()},
                "peak_during": self.where, "saved_for_backward_gib": gib(self.saved_bytes),
                "needed_gib": gib(self.needed_bytes()), "batch_size": self.batch_size,
                "clips_per_step": self.clips, "world_size": self.world_size, "backend": self.backend,
                "precision": self.precision, "train_gflops_per_clip": self.flops_per_clip / 1e9,
                "video_train_gflops_per_clip": self.video_flops_per_clip / 1e9,
                "dense_video_train_gflops_per_clip": self.dense_flops_per_clip / 1e9, "notes": self.notes}


def parse_memory(text: str) -> int:
    """``12GB``, ``11.5GiB``, ``24000MiB``, ``12`` (GiB) -> bytes; ConfigError if it does not parse."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory: expected a size such as 12GB, 11.5GiB or 24000MiB, got {text!r}")
    return int(float(match.group(1)) * unit)


def kernel_operator_registered() -> bool:
    """Whether the fused Triton kernel is registered as a PyTorch operator (FakeTensor runs need it);
    importing :mod:`svitt_ego.models.attention` registers it, where it is."""
    return any(name.startswith(KERNEL_NAMESPACE) for name in torch._C._dispatch_get_all_op_names())


def planning_backend(cfg: Config) -> tuple[str, list[str]]:
    """The attention backend a GPU would run for ``cfg`` and notes on the choice: ``auto`` is the fused
    kernel, whose memory the planner sees through its operator."""
    backend, notes = cfg.model.vision.backend, []
    if cfg.model.vision.attention != "sparse":
        return backend, notes
    if backend == "auto" and cfg.train.precision not in AUTOCAST_DTYPES:
        notes.append("auto planned as blocked: the fused kernel takes fp16 or bf16 activations only")
        return "blocked", notes
    if backend in ("auto", "triton") and not kernel_operator_registered():
        if backend == "triton":
            raise ConfigError("model.vision.backend=triton: the fused kernel is not registered as a PyTorch "
                              "operator in this build, so its memory cannot be planned; use blocked",
                              key="model.vision.backend")
        notes.append("auto planned as blocked: the fused kernel is not registered as a PyTorch operator")
        return "blocked", notes
    return ("triton" if backend == "auto" else backend), notes


def plan_memory(cfg: Config, world_size: int = 1, flops: bool = True) -> MemoryPlan:
    """The peak memory of one training step of ``cfg`` on each of ``world_size`` GPUs (``flops``: also
    count the video encoder's training FLOPs per clip, sparse and dense, else 0)."""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    backend, notes = planning_backend(cfg)
    cfg = _with(cfg, "model", vision=dataclasses.replace(cfg.model.vision, backend=backend))
    dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
    clips = 2 * cfg.train.batch_size
    length = cfg.model.text.max_length
    # MLM selects each of the length - 2 words ([CLS] and [SEP] never) with mlm_probability, at least one a row.
    selected = max(clips, round(cfg.loss.mlm_probability * clips * (length - 2)))
    with torch.device("meta"):
        model = SViTTEgo(cfg.model)
    objective = PretrainingObjective(model, cfg, BERT_TOKENS)

    def build(context: StepContext) -> StepParts:
        objective.to_empty(device="cpu").train()
        with warnings.catch_warnings():  # its CUDA gradient scaler disables itself without CUDA: replaced below
            warnings.simplefilter("ignore")
            optimizer, scheduler, _ = build_optimizer(model, cfg, torch.device("cuda"), total_steps=10,
                                                      steps_per_epoch=1)
        scaler = torch.amp.GradScaler("cpu", enabled=cfg.train.precision == "fp16")
        batch = _batch(cfg, clips)
        forward = _Forward(objective, context, dtype)
        return StepParts(model, optimizer, list(batch.values()),
                         lambda: optimizer_step(forward, optimizer, scaler, scheduler, batch, cfg))

    vision = cfg.model.vision
    dense_vision = dataclasses.replace(vision, attention="dense", keep_rate=1.0, prune_layers=[])
    with _fused_kernel_taken(cfg, dtype):
        step = measure_step(build, (clips * length, selected))
        video, dense = (encoder_flops(vision, dtype), encoder_flops(dense_vision, dtype)) if flops else (0, 0)
    parts = dict(step.parts)
    peak = step.peak_bytes
    if world_size > 1:
        peak, notes = _distributed(cfg, parts, peak, world_size, model, notes)
    return MemoryPlan(cfg.train.batch_size, world_size, backend, cfg.train.precision, peak, parts, step.where,
                      step.saved_bytes, clips, step.flops / clips, video, dense, notes)


def _distributed(cfg: Config, parts: dict, peak: int, world_size: int, model: nn.Module,
                 notes: list[str]) -> tuple[int, list[str]]:
    """Under torchrun: DDP (``gradient_as_bucket_view``) keeps the gradients in its buckets, allocated
    when it is built for every trained parameter in fp32 and kept for the whole run; with
    ``train.shard_optimizer`` a rank keeps the AdamW state of its share only (the largest share of
    ZeroRedundancyOptimizer's partition; its step counts are scalars)."""
    buckets = sum(block_bytes(p.numel() * p.element_size()) for p in model.parameters() if p.requires_grad)
    peak += buckets - parts["gradients"]
    parts["gradients"] = buckets
    notes.append("gradients: DDP's buckets, allocated for the whole run")
    if cfg.train.shard_optimizer:
        from svitt_ego.sharding import shard_sizes  # seconds to import: only when sharding (as train does)

        share = max(shard_sizes(parameter_groups(model, cfg.train.weight_decay), world_size))
        kept = 2 * 4 * share  # two fp32 moments an element
        peak -= parts["optimizer state"] - kept
        parts["optimizer state"] = kept
        notes.append(f"optimizer state sharded over {world_size} ranks: the largest share")
    return peak, notes


@contextlib.contextmanager
def _fused_kernel_taken(cfg: Config, dtype: torch.dtype | None):
    """With ``backend=triton``, the fused kernel's verdict taken as the GPU's ("it runs") for the planned
    activations, so that the model calls its operator on fake CPU tensors; restored afterwards."""
    v = cfg.model.vision
    if v.backend != "triton" or dtype is None:
        yield
        return
    key = (dtype, v.width // v.num_heads, v.block_size)
    problems = attention._fused_problems
    before = problems.get(key, _MISSING)
    problems[key] = None
    try:
        yield
    finally:
        if before is _MISSING:
            del problems[key]
        else:
            problems[key] = before


class _Forward(nn.Module):
    """The objective's forward in the autocast a GPU would run (``optimizer_step``'s own autocast is a
    no-op on the CPU)."""

    def __init__(self, objective: nn.Module, context: StepContext, dtype: torch.dtype | None):
        super().__init__()
        self.objective, self.context, self.dtype = objective, context, dtype

    def forward(self, batch: dict) -> dict:
        with self.context.forward_autocast(self.dtype):
            return self.objective(batch)


def _batch(cfg: Config, clips: int) -> dict[str, torch.Tensor]:
    """A collated batch's tensors (collate_egoclip's shapes and dtypes)."""
    v, length = cfg.model.vision, cfg.model.text.max_length
    return {"frames": torch.zeros(clips, v.num_frames, 3, v.image_size, v.image_size),
            "input_ids": torch.zeros(clips, length, dtype=torch.long),
            "attention_mask": torch.ones(clips, length, dtype=torch.long),
            "nouns": torch.zeros(clips, 2, dtype=torch.long), "verbs": torch.zeros(clips, 1, dtype=torch.long),
            "clip_idx": torch.arange(clips)}


def encoder_flops(vision: VisionConfig, dtype: torch.dtype | None) -> float:
    """Training FLOPs (forward + backward) per clip of the video encoder ``vision``, counted on one fake clip."""
    with torch.device("meta"):
        encoder = VideoEncoder(vision)
    frames = (1, vision.num_frames, 3, vision.image_size, vision.image_size)
    return training_flops(encoder, lambda: torch.zeros(frames), lambda out: out.pooled.float().sum(), dtype)


def _with(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


# --------------------------------------------------------------------------- which batch fits


@dataclass
class Fit:
    """Which ``train.batch_size`` fits a card."""

    gpu_bytes: int
    largest_batch: int  # 0: not even batch 1 fits
    checkpointing_needed: bool  # the config's batch fits only with activation checkpointing
    largest_batch_checkpointed: int | None  # with activation checkpointing, when that was needed


def largest_batch(cfg: Config, gpu_bytes: int, world_size: int = 1, known: MemoryPlan | None = None) -> int:
    """The largest ``train.batch_size`` whose predicted peak plus reserve fits ``gpu_bytes`` (0 if none).

    Every activation scales with the batch, so the peak is nearly affine in it: each plan is aimed
    where the line through the last two meets the card (``known``, a plan of ``cfg``, saves one),
    between the largest batch known to fit and the smallest known not to, until they are adjacent."""
    needed: dict[int, float] = {known.batch_size: known.needed_bytes()} if known else {}

    def need(batch: int) -> float:
        if batch not in needed:
            needed[batch] = plan_memory(_with(cfg, "train", batch_size=batch), world_size, flops=False).needed_bytes()
        return needed[batch]

    if need(1) > gpu_bytes:
        return 0
    fits, fails = 1, None  # the largest batch known to fit, the smallest known not to
    probe = next((b for b in needed if b > 1), 2)
    while fails is None or fails - fits > 1:
        if need(probe) <= gpu_bytes:
            fits = probe
        else:
            fails = probe
        if fits >= MAX_BATCH:
            return MAX_BATCH
        probe = _next_probe(fits, fails, need(fits), need(fails) if fails else need(probe), probe, gpu_bytes)
    return fits


def _next_probe(fits: int, fails: int | None, at_fits: float, at_other: float, last: int, gpu_bytes: int) -> int:
    """Where the line through the last two plans meets ``gpu_bytes``, kept strictly between ``fits`` and ``fails``."""
    other = fails or last
    slope = (at_other - at_fits) / (other - fits) if other != fits else 0.0
    guess = fits + int((gpu_bytes - at_fits) // slope) if slope > 0 else 2 * fits
    high = min(fails - 1, MAX_BATCH) if fails else MAX_BATCH
    return min(high, max(fits + 1, guess if fails else max(guess, fits + 1)))


def fit(cfg: Config, gpu_bytes: int, world_size: int = 1, known: MemoryPlan | None = None) -> Fit:
    """Which batch fits a card of ``gpu_bytes``, and whether the config's batch needs activation checkpointing."""
    largest = largest_batch(cfg, gpu_bytes, world_size, known)
    vision = cfg.model.vision
    if largest >= cfg.train.batch_size or vision.grad_checkpointing:
        return Fit(gpu_bytes, largest, False, None)
    checkpointed = _with(cfg, "model", vision=dataclasses.replace(vision, grad_checkpointing=True))
    with_ckpt = largest_batch(checkpointed, gpu_bytes, world_size)
    return Fit(gpu_bytes, largest, with_ckpt >= cfg.train.batch_size, with_ckpt)


def load_plan_config(preset: str, overrides: list[str]) -> Config:
    """The config to plan: ``preset`` with ``overrides``; the batch bounded (1..MAX_BATCH)."""
    cfg = load_config(preset, overrides)
    if cfg.train.batch_size > MAX_BATCH:
        raise ConfigError(f"train.batch_size: at most {MAX_BATCH} for planning, got {cfg.train.batch_size}",
                          key="train.batch_size")
    return cfg


# --------------------------------------------------------------------------- report


def format_plan(plan: MemoryPlan, fitted: Fit | None = None) -> str:
    rows = [f"one training step: batch {plan.batch_size} + {plan.batch_size} hard negatives, {plan.precision}, "
            f"backend {plan.backend}, world size {plan.world_size}"]
    rows += [f"  {name:<32} {gib(size):7.2f} GiB" for name, size in plan.parts.items() if size]
    rows.append(f"  {'peak (max_memory_allocated)':<32} {plan.peak_gib:7.2f} GiB   during the {plan.where}")
    rows.append(f"  {'kept at the end of the forward':<32} {gib(plan.saved_bytes):7.2f} GiB")
    rows.append(f"  {'card memory needed':<32} {gib(plan.needed_bytes()):7.2f} GiB   peak + {FRAGMENTATION:.0%} "
                f"fragmentation + {gib(CUDA_CONTEXT_BYTES):.2f} GiB CUDA context")
    rows.append(f"training GFLOPs per clip: {plan.flops_per_clip / 1e9:.1f} for the whole step; video encoder "
                f"{plan.video_flops_per_clip / 1e9:.1f} against {plan.dense_flops_per_clip / 1e9:.1f} for it dense "
                f"(x{plan.dense_flops_per_clip / max(plan.video_flops_per_clip, 1):.2f})")
    if fitted is not None:
        rows.append(f"on {gib(fitted.gpu_bytes):.2f} GiB: largest train.batch_size {fitted.largest_batch}"
                    + (f"; with activation checkpointing {fitted.largest_batch_checkpointed}"
                       if fitted.largest_batch_checkpointed is not None else "")
                    + ("; activation checkpointing needed" if fitted.checkpointing_needed
                       else f"; the configured batch {plan.batch_size} fits as it is"
                       if fitted.largest_batch >= plan.batch_size else ""))
    rows += [f"note: {note}" for note in plan.notes]
    return "\n".join(rows)
