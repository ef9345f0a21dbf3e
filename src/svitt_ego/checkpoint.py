"""Checkpoints: atomic writes that fail alike on every rank, safe loading, exact RNG states, resume checks.

A checkpoint is read with ``torch.load(weights_only=True)``: it may hold only
tensors and plain Python values (dicts, lists, numbers, strings), so loading a
crafted file never runs code. The RNG states of Python and NumPy, which are
tuples holding arrays, are stored as tensors and plain values for that reason.
Checkpoints written before that stored NumPy's state as an array; NumPy arrays
(plain data, rebuilt without calling anything else) are allowed so they still load.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from svitt_ego.atomic import atomic_copy, atomic_write
from svitt_ego.config import Config
from svitt_ego.distributed import decide_on_main, gather_objects, rank, world_size
from svitt_ego.run_folder import refuse_changes, settings_changes
from svitt_ego.untrusted import one_line

# Settings that may change between a run and its resumption: where things are written or read from,
# how often to log or save, how errors are handled. Any other change alters what the saved state means
# (model shape, batch size, data, seed, schedule) and needs ``allow_change``.
RESUMABLE_CHANGES = (
    "train.output_dir", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every_epoch",
    "train.max_nonfinite", "train.log_every", "data.egomcq", "data.video_root", "data.num_workers",
    "data.on_error", "data.lax_metadata", "model.vision.backend", "model.vision.grad_checkpointing",
    "model.vision.pretrained", "model.text.pretrained", "model.init_from", "eval.",
    "train.shard_optimizer",  # where the AdamW state lives: the checkpoint holds it whole either way
)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe to load or cannot be written."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


_NUMPY_CORE = getattr(np, "_core", None) or np.core
# What an array of numbers needs to unpickle: its class, its dtype and NumPy's array constructor.
NUMPY_ARRAY_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# --------------------------------------------------------------------------- RNG states as plain values


def rng_state() -> dict:
    """This process's torch, CUDA, NumPy and Python RNG states as tensors and plain values."""
    version, mt, gauss = random.getstate()
    key, np_mt, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"key": key, "state": torch.from_numpy(np_mt.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states (or the tuples that older checkpoints hold)."""
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        n = (n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    if isinstance(p, dict):
        p = (p["version"], tuple(p["state"].tolist()), p["gauss_next"])
    random.setstate(p)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save and load


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, allowed: list = ()) -> dict:
    """A checkpoint's contents, read without running code: anything but tensors and plain values is refused.
    ``allowed`` admits more globals, as ``torch.serialization.safe_globals`` takes them (inert stand-ins)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([*NUMPY_ARRAY_GLOBALS, *allowed]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to load: it holds more than tensors and plain values "
                              f"({first_line})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None


def step_checkpoints(folder: Path) -> list[Path]:
    """``step-<N>.pt`` files, oldest first."""
    return sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


# --------------------------------------------------------------------------- writes and resume checks


def write_on_main(path: Path, write: Callable[[], None]) -> None:
    """Run ``write`` on rank 0; if it fails (a full disk, ...) every rank raises the same
    :class:`CheckpointError` naming ``path``, instead of the others waiting in the next collective."""
    def attempt() -> str | None:
        try:
            write()
        except (OSError, RuntimeError) as err:
            return f"{path}: could not write ({getattr(err, 'reason', err)})"
        return None

    error = decide_on_main(attempt)
    if error:
        raise CheckpointError(error)


def check_resume(path: Path, state: dict, cfg: Config, allow_change: bool) -> None:
    """Refuse to resume ``state`` with a config (or world size) that changes what it means, unless allowed;
    :data:`RESUMABLE_CHANGES` may differ."""
    changes = settings_changes(state["config"], cfg.to_dict(), RESUMABLE_CHANGES)
    if state.get("world_size", 1) != world_size():
        changes["world size"] = (state.get("world_size", 1), world_size())
    refuse_changes(path, changes, allow_change)


# --------------------------------------------------------------------------- the checkpointer


def _whole_state(obj) -> dict | None:
    """``obj.state_dict()``; for a sharded optimizer (``sharding.ShardedAdamW``, which has
    ``full_state_dict``) its whole state gathered on rank 0, None elsewhere."""
    gather = getattr(obj, "full_state_dict", None)
    return gather() if gather is not None else obj.state_dict()


class Checkpointer:
    """Saves and restores a run's state in its folder: ``step-<N>.pt`` (the newest ``keep`` of them),
    ``last.pt`` and ``best.pt``. Rank 0 writes; every rank learns whether the write worked, so a failed
    write stops all of them instead of leaving the others waiting in the next collective."""

    def __init__(self, folder: str | Path, keep: int, objects: dict):
        self.folder, self.keep = Path(folder), keep
        self.objects = objects  # name -> anything with state_dict() / load_state_dict()

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    def save(self, name: str, train_state: dict, cfg: Config) -> None:
        rng = gather_objects(rng_state())  # every rank's, so that each resumes its own stream
        state = {**{key: _whole_state(obj) for key, obj in self.objects.items()}, **train_state,
                 "rng": rng, "config": cfg.to_dict(), "world_size": world_size()}
        write_on_main(self.folder / name, lambda: self._write(name, state))

    def _write(self, name: str, state: dict) -> None:
        save_checkpoint(self.folder / name, state)
        save_checkpoint(self.last, state)
        for old in step_checkpoints(self.folder)[:-self.keep]:
            old.unlink()

    def mark_best(self) -> None:
        """``best.pt`` becomes a copy of ``last.pt``."""
        write_on_main(self.folder / "best.pt", lambda: atomic_copy(self.last, self.folder / "best.pt"))

    def resume(self, cfg: Config, allow_change: bool = False) -> dict | None:
        """Load ``last.pt`` into the objects and this rank's RNG; returns the rest (step, epoch, ...) or None."""
        if not decide_on_main(self.last.exists):
            return None
        state = load_checkpoint(self.last)
        check_resume(self.last, state, cfg, allow_change)
        for key, obj in self.objects.items():
            obj.load_state_dict(state[key])
        rngs = state["rng"]
        set_rng_state(rngs[rank()] if rank() < len(rngs) else rngs[0])
        return state
