"""Run one training step on fake tensors and account for the GPU memory it would take.

This module imports nothing of svitt-ego, so that it can measure the step of another checkout
(``benchmarks/memory_calibration.py`` runs it on an older commit's code). :mod:`svitt_ego.memory`
builds today's step on it. docs/memory.md describes the substitutions; in short:

* Every tensor is a ``FakeTensor`` on the CPU: shapes, dtypes and storages, no data. The step's
  code runs unchanged; the model is built on ``meta`` (its initialisation needs no data) and
  materialised as fake CPU tensors with ``Module.to_empty`` inside the step's builder.
* CUDA's autocast policy: :func:`cuda_autocast` registers, for the CPU autocast dispatch key, the
  casts that CUDA autocast applies to each op of torch's own CUDA autocast list (fp16/bf16 for
  matrix products and convolutions, fp32 for norms, softmax, reductions, losses; the widest type
  for the "promote" ops), with CUDA's cache of casted weights, and turns CPU autocast's own
  casts off.
* Data-dependent sizes are fixed (:class:`MemoryTracker`): a boolean mask of the MLM mask's size
  selects the expected MLM count, any other mask all its elements (an upper bound); ``.item()`` of
  an integer or boolean flag reads 1 (the finite check: "finite"), of a float 0 outside the
  optimizer (the gradient scaler's ``found_inf``: no overflow) and 1 inside it (the step count).
* Bytes are counted as the CUDA caching allocator counts ``max_memory_allocated``: each storage
  rounded up to 512 bytes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

GIB = 2**30
BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of this

# The categories of live memory, in the order they are reported.
PARTS = ("parameters", "gradients", "optimizer state", "autocast weight copies", "activations kept for backward",
         "inputs", "transient")

# CUDA autocast's casts, by op name (torch's autocast_mode.cpp); every other op of the CUDA list runs in fp32.
LOWER_PRECISION = {
    "_convolution", "_scaled_dot_product_flash_attention", "_thnn_fused_gru_cell", "_thnn_fused_lstm_cell",
    "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution", "cudnn_convolution",
    "cudnn_convolution_transpose", "einsum", "gru_cell", "linalg_multi_dot", "linalg_vecdot", "linear", "lstm_cell",
    "matmul", "mm", "mv", "prelu", "rnn_relu_cell", "rnn_tanh_cell", "scaled_dot_product_attention"}
PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "scatter_add", "tensordot"}
# fp32 through the op's own ``dtype`` argument (no fp32 copy of the input), as CUDA autocast does.
FP32_DTYPE_ARGUMENT = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
                       "linalg_matrix_norm", "sum", "norm"}


def gib(nbytes: float) -> float:
    return nbytes / GIB


def block_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator counts for a request of ``nbytes``."""
    return max(BLOCK, math.ceil(nbytes / BLOCK) * BLOCK) if nbytes else 0


# --------------------------------------------------------------------------- CUDA autocast on fake CPU tensors


class _CastCache:
    """CUDA autocast's weight cache: one low-precision copy per leaf tensor that requires grad, while
    ``active`` (the forward of a step); the copies are reported as their own part."""

    def __init__(self):
        self.active = False
        self.copies: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self.on_copy: Callable[[torch.Tensor], None] = lambda t: None

    def cast(self, t, dtype):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                and t.dtype != dtype):
            return t
        if not (self.active and t.is_leaf and t.requires_grad):
            return t.to(dtype)
        key = id(t)
        entry = self.copies.get(key)
        if entry is None or entry[0]() is not t or entry[1].dtype != dtype:
            copy = t.to(dtype)
            self.copies[key] = (weakref.ref(t), copy)
            self.on_copy(copy)
            return copy
        return entry[1]


def _widest(args) -> torch.dtype | None:
    dtypes = [a.dtype for a in _tensors(args) if a.is_floating_point()]
    return max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else None


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def _autocast_kernel(op, policy: str, cache: _CastCache):
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            if policy == "pass":
                return op(*args, **kwargs)
            if policy == "dtype":
                first = args[0]
                if (isinstance(first, torch.Tensor) and first.is_floating_point()
                        and first.dtype != torch.float32 and kwargs.get("dtype") is None):
                    kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            dtype = {"lower": torch.get_autocast_dtype("cpu"), "fp32": torch.float32}.get(policy) or _widest(args)
            cast = lambda a: cache.cast(a, dtype)  # noqa: E731
            return op(*tree_map(cast, args), **tree_map(cast, kwargs))

    return kernel


def _policy(name: str) -> str:
    base = name.removeprefix("aten::").split(".")[0]
    if base in LOWER_PRECISION:
        return "lower"
    if base in PROMOTE:
        return "promote"
    return "dtype" if base in FP32_DTYPE_ARGUMENT else "fp32"


@contextlib.contextmanager
def cuda_autocast(cache: _CastCache):
    """While open, ``torch.autocast("cpu", ...)`` casts as CUDA autocast does (see the module docstring)."""
    lib = torch.library.Library("aten", "IMPL")
    names = torch._C._dispatch_get_all_op_names()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    cuda = {n for n in names if has(n, "AutocastCUDA")}
    cpu_only = {n for n in names if has(n, "AutocastCPU")} - cuda
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        for name in sorted(cuda | cpu_only):
            base, _, overload = name.removeprefix("aten::").partition(".")
            op = getattr(getattr(torch.ops.aten, base), overload or "default")
            policy = "pass" if name in cpu_only else _policy(name)
            lib.impl(name.removeprefix("aten::"), _autocast_kernel(op, policy, cache), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


# --------------------------------------------------------------------------- memory accounting


@dataclass
class Peak:
    """The largest total of live bytes so far, its parts, and the phase it fell in."""

    bytes: int = 0
    parts: dict[str, int] = field(default_factory=dict)
    where: str = ""


class MemoryTracker(TorchDispatchMode):
    """Live storages, each counted as the CUDA allocator's block, by part; the peak and its parts.

    Also fixes the data-dependent sizes and values (see the module docstring).
    """

    def __init__(self, selected: tuple[int, int]):
        super().__init__()
        self.mask_numel, self.selected = selected
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, part, weakref]
        self.current = dict.fromkeys(PARTS, 0)
        self.peak = Peak()
        self.phase = "setup"  # then forward, backward, optimizer

    # -- storages
    def track(self, t: torch.Tensor, part: str | None = None) -> None:
        st = t.untyped_storage()
        key = id(st)
        entry = self.live.get(key)
        if entry is not None and entry[2]() is st:
            if part is not None:
                self._move(entry, part)
            return
        size = block_bytes(st.nbytes())
        entry = [size, part or "transient", None]
        entry[2] = weakref.ref(st, lambda _, e=entry, k=key: self._free(k, e))
        self.live[key] = entry
        self.current[entry[1]] += size
        self._update()

    def retag(self, t: torch.Tensor, part: str) -> None:
        """Count ``t``'s storage as ``part`` if it is counted as transient (not a parameter, input, ...)."""
        entry = self.live.get(id(t.untyped_storage()))
        if entry is not None and entry[1] == "transient":
            self._move(entry, part)

    def _move(self, entry: list, part: str) -> None:
        self.current[entry[1]] -= entry[0]
        self.current[part] += entry[0]
        entry[1] = part

    def _free(self, key: int, entry: list) -> None:
        if self.live.get(key) is entry:
            del self.live[key]
        self.current[entry[1]] -= entry[0]

    def _update(self) -> None:
        total = sum(self.current.values())
        if total > self.peak.bytes:
            self.peak = Peak(total, dict(self.current), self.phase)

    def reset_peak(self) -> None:
        self.peak = Peak(sum(self.current.values()), dict(self.current), self.phase)

    # -- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default:
            out = torch.empty((self._count(args[0]), args[0].dim()), dtype=torch.long, device=args[0].device)
        elif func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            if not args[0].is_floating_point():
                return 1  # a flag: true
            return 1.0 if self.phase == "optimizer" else 0.0  # the optimizer's step count; found_inf: none
        elif func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            out = func(args[0], self._fixed_indices(args[1]))
        else:
            out = func(*args, **kwargs)
        for t in _tensors(out if isinstance(out, (tuple, list)) else [out]):
            self.track(t)
        return out

    def _count(self, mask: torch.Tensor) -> int:
        """How many elements ``mask`` selects: ``selected`` of the MLM mask's size, else all (an upper bound)."""
        return self.selected if mask.numel() == self.mask_numel else mask.numel()

    def _fixed_indices(self, indices):
        fixed = []
        for i in indices:
            if i is not None and i.dtype == torch.bool:
                fixed += [torch.empty(self._count(i), dtype=torch.long, device=i.device)] * i.dim()
            else:
                fixed.append(i)
        return fixed


# --------------------------------------------------------------------------- one step


@dataclass
class StepParts:
    """What :func:`measure_step` needs of a training step."""

    model: nn.Module  # its parameters are "parameters", their gradients "gradients"
    optimizer: torch.optim.Optimizer  # its state is "optimizer state"
    inputs: list[torch.Tensor]  # the batch: "inputs"
    step: Callable[[], None]  # one whole training step; the forward inside ``forward_autocast``


class _NoModules:
    """FlopCounterMode's module tracker, switched off: its gradient hooks on module outputs keep the
    tensors an activation-checkpointed block recomputes alive (reference cycles), which no GPU run has."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass


def flop_counter() -> FlopCounterMode:
    """A FLOP counter of the total only (matrix products, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModules()
    return counter


def training_flops(module: nn.Module, make_input: Callable[[], torch.Tensor],
                   loss: Callable[[object], torch.Tensor], dtype: torch.dtype | None) -> int:
    """Forward + backward FLOPs of ``module`` (built on ``meta``) on one fake input from ``make_input``,
    under CUDA's autocast to ``dtype`` (None: fp32), the backward from ``loss(module(input))``."""
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_autocast(_CastCache()):
        module.to_empty(device="cpu").train()
        x = make_input()
        with flop_counter() as counter:
            with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
                out = loss(module(x))
            out.backward()
    return counter.get_total_flops()


@dataclass
class StepMemory:
    peak_bytes: int
    parts: dict[str, int]
    where: str  # forward, backward or optimizer: where the peak is
    saved_bytes: int  # activations kept for backward at the end of the forward
    flops: int


class StepContext:
    """Handed to the step's builder: the autocast to wrap its forward in, and the fixed sizes."""

    def __init__(self, tracker: MemoryTracker, cache: _CastCache):
        self.tracker, self.cache = tracker, cache
        self.saved_at_backward = 0

    @contextlib.contextmanager
    def forward_autocast(self, dtype: torch.dtype | None):
        """The step's forward: CUDA's autocast to ``dtype`` (None: fp32), saved tensors counted as kept."""
        tracker = self.tracker

        def pack(t):
            tracker.retag(t, "activations kept for backward")
            return t.detach()

        tracker.phase = "forward"
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if dtype is None:
                yield
            else:
                self.cache.active = True
                try:
                    with torch.autocast("cpu", dtype=dtype):
                        yield
                finally:
                    self.cache.active = False
                    self.cache.copies.clear()
        self.saved_at_backward = tracker.current["activations kept for backward"]
        tracker.phase = "backward"


def measure_step(build: Callable[[StepContext], StepParts], selected: tuple[int, int]) -> StepMemory:
    """Build a step with ``build`` (inside fake mode), initialise the optimizer's state with one step
    on zero gradients (the state a GPU measurement sees after its warm-up steps), then run the step
    once and return its peak and parts; ``selected`` is (the MLM mask's size, how many it selects)."""
    tracker, cache = MemoryTracker(selected), _CastCache()
    cache.on_copy = lambda t: tracker.retag(t, "autocast weight copies")
    context = StepContext(tracker, cache)
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_autocast(cache), tracker:
        parts = build(context)
        for p in parts.model.parameters():
            tracker.track(p, "parameters")
        for b in parts.model.buffers():
            tracker.track(b, "parameters")
        for t in parts.inputs:
            tracker.track(t, "inputs")
        pre = parts.optimizer.register_step_pre_hook(lambda *_: setattr(tracker, "phase", "optimizer"))
        _initialise_optimizer(parts.optimizer, tracker)
        hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "gradients"))
                 for p in parts.model.parameters() if p.requires_grad]
        tracker.reset_peak()
        counter = flop_counter()
        with counter:
            parts.step()
        for hook in [*hooks, pre]:
            hook.remove()
    peak = tracker.peak
    return StepMemory(peak.bytes, peak.parts, peak.where, context.saved_at_backward, counter.get_total_flops())


def _initialise_optimizer(optimizer: torch.optim.Optimizer, tracker: MemoryTracker) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tracker.track(value, "optimizer state")
