"""Where and in which precision tensors run: autocast from ``train.precision``, batches onto a device."""

from __future__ import annotations

import contextlib

import torch

from svitt_ego.config import Config, ConfigError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    """Where a command runs when not told: CUDA when there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name: str | None = None) -> torch.device:
    """``--device``: the device ``name`` gives (cpu, cuda, cuda:1), or :func:`default_device` when None.

    A name torch does not know, or CUDA on a machine without a GPU, is a one-line error."""
    try:
        device = torch.device(name or default_device())
    except RuntimeError as err:
        raise ConfigError(f"--device {name}: {str(err).splitlines()[0]}", "--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA device; use --device cpu", "--device")
    return device


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """fp16 or bf16 autocast on CUDA as ``train.precision`` says; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return AUTOCAST_DTYPES.get(cfg.train.precision)


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``train.precision`` on ``device`` (a no-op for fp32 and on the CPU)."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (asynchronous from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
