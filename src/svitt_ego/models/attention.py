"""Edge sparsity: block-local + random attention with the 3D relative position bias.

Token 0 is [CLS]; the ``n`` patch tokens after it are cut into blocks of ``G``
consecutive tokens. The [CLS] query attends to every key. A patch query attends
to the [CLS] key and to its block's key blocks in the layer's
:class:`~svitt_ego.models.block_pattern.BlockPattern` (its local blocks and
``K_r`` random ones), one draw per layer and forward, shared by the batch and
the heads.

Backends compute the same function:

- ``reference``: dense attention with the equivalent N x N mask (for tests).
- ``blocked``: gathers each query block's key blocks; never builds an N x N
  matrix, runs anywhere (:mod:`svitt_ego.models.blocked`).
- ``triton``: one fused Triton kernel (forward and backward) over G-token
  tiles, the bias looked up inside it; see
  :mod:`svitt_ego.models.sparse_attention_triton`. Called as the PyTorch
  operators of :mod:`svitt_ego.models.ops` (whose CPU implementation is the
  blocked math). What ``auto`` picks on CUDA where the kernel is meant to run
  and has passed a self-check (:func:`resolve_backend`).
- ``flex``: PyTorch FlexAttention (compiled). Each G-token block is padded to
  a tile of ``BlockPattern.tile_size`` tokens, [CLS] gets a tile of its own, the block
  pattern becomes the tile-level block mask and the bias is computed inside
  the kernel from the (t, h, w) offsets. CUDA only for training (FlexAttention
  has no CPU backward); opt-in (``backend: flex``) until it is measured on a GPU.
- ``dense``: no edge sparsity at all (``attention: dense``), PyTorch SDPA with
  the bias materialised.

Every backend also returns the [CLS] query's attention probabilities, the
score node sparsity prunes by. Scores are formed in fp32 whatever the input
dtype (fp16 scores can overflow before the softmax).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from svitt_ego.config import ConfigError
from svitt_ego.distributed import decide_on_main, is_main
from svitt_ego.models.block_pattern import BlockPattern, dense_mask, sample_block_pattern
from svitt_ego.models.blocked import blocked_attention, cls_query_probs, score_dtype
from svitt_ego.models.ops import triton_attention
from svitt_ego.models.position_bias import CLS_POSITION, RelativePositionBias3D


Backend = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def dense_attention(q, k, v, positions, rel_bias: RelativePositionBias3D, pattern=None):
    """Full attention through SDPA with the bias as a float mask; [CLS] probabilities on the side."""
    bias = rel_bias(positions, positions)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    cls_probs = cls_query_probs(q, k, bias[:, :, :1])
    return out, cls_probs


def reference_attention(q, k, v, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern | None):
    """Materialise scores, bias and the dense mask: simple, O(N^2) memory."""
    scale = q.shape[-1] ** -0.5
    acc = score_dtype(q)
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    scores = scores + rel_bias(positions, positions)
    if pattern is not None:
        scores = scores.masked_fill(~dense_mask(pattern, q.shape[-2] - 1), float("-inf"))
    probs = scores.softmax(-1).to(q.dtype)
    return probs @ v, probs[:, :, 0]


_compiled_flex_attention = None


def _flex_attention():
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def flex_attention(q, k, v, positions, rel_bias: RelativePositionBias3D, pattern: BlockPattern):
    """Edge-sparse attention through FlexAttention, in a tiled layout: tile 0 holds [CLS], tile b + 1 block b."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, N, D = q.shape
    n, G, nb = N - 1, pattern.block_size, pattern.num_blocks
    P = pattern.tile_size
    L = (nb + 1) * P
    device = q.device
    patch = torch.arange(n, device=device)
    slot = torch.cat([patch.new_zeros(1), (patch // G + 1) * P + patch % G])  # token -> place in the tiled layout

    def tiled(x):
        return x.new_zeros(B, H, L, D).index_copy(2, slot, x)

    pos = positions.expand(B, -1).new_zeros(B, L).index_copy(1, slot, positions.expand(B, -1))
    key_ok = torch.zeros(L, dtype=torch.bool, device=device)
    key_ok[slot] = True
    # Query tile 0 ([CLS]) sees every tile; query tile b + 1 sees tile 0 and its key blocks' tiles.
    rows = torch.cat([torch.zeros(nb, 1, dtype=torch.long, device=device), pattern.key_blocks + 1], dim=1)
    kv_indices = torch.zeros(nb + 1, nb + 1, dtype=torch.int32, device=device)
    kv_indices[0] = torch.arange(nb + 1, device=device)
    kv_indices[1:, :rows.shape[1]] = rows.int()
    kv_num = torch.cat([torch.tensor([nb + 1], device=device), 1 + pattern.valid.sum(1)]).int()
    table = rel_bias.table

    def mask_mod(b, h, q_idx, kv_idx):
        return key_ok[kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[rel_bias.index(pos[b, q_idx], pos[b, kv_idx]), h]

    block_mask = BlockMask.from_kv_blocks(kv_num[None, None], kv_indices[None, None], BLOCK_SIZE=P,
                                          mask_mod=mask_mod, seq_lengths=(L, L))
    out = _flex_attention()(tiled(q), tiled(k), tiled(v), score_mod=score_mod, block_mask=block_mask)
    cls_probs = cls_query_probs(q, k, rel_bias(positions[:, :1], positions))
    return out[:, :, slot], cls_probs


BACKENDS: dict[str, Backend] = {"reference": reference_attention, "blocked": blocked_attention,
                                 "triton": triton_attention, "flex": flex_attention}


# Where the fused kernel is meant to run: Ampere or newer, half-precision activations (in fp32 its
# kernels spill registers), head dims up to 128 (its tiles hold a whole head).
FUSED_MIN_CAPABILITY = (8, 0)
FUSED_DTYPES = (torch.float16, torch.bfloat16)
FUSED_MAX_HEAD_DIM = 128
# The largest error against the reference, relative to max(1, max |reference|), per dtype (the GPU tests').
SELF_CHECK_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-5}

log = logging.getLogger(__name__)
_fused_problems: dict[tuple, str | None] = {}  # (dtype, head dim, block size) -> why not fused; once a process


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> Backend:
    """The backend ``name`` for ``dtype`` activations of ``head_dim`` in blocks of ``block_size`` on ``device``.

    ``auto``: ``blocked`` off CUDA; on CUDA the fused ``triton`` kernel where
    :func:`fused_kernel_problem` finds nothing against it, else ``blocked`` with one warning naming
    the reason. ``triton`` raises :class:`ConfigError` naming the reason instead. The finding is made
    once a process per (dtype, head dim, block size), on rank 0, and shared by every rank, so that
    all ranks run the same backend.
    """
    device = torch.device(device)
    if name not in ("auto", "triton"):
        return BACKENDS[name]
    if name == "auto" and device.type != "cuda":
        return BACKENDS["blocked"]
    key = (dtype, head_dim, block_size)
    first = key not in _fused_problems
    if first:
        _fused_problems[key] = decide_on_main(lambda: fused_kernel_problem(device, dtype, head_dim, block_size))
    problem = _fused_problems[key]
    if problem is None:
        return BACKENDS["triton"]
    if name == "triton":
        raise ConfigError(f"model.vision.backend=triton: {problem}; use auto or blocked", key="model.vision.backend")
    if first and is_main():
        log.warning("model.vision.backend=auto: %s; using the blocked backend", problem)
    return BACKENDS["blocked"]


def fused_kernel_problem(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """Why the fused kernel must not run on ``device`` for these activations, or None when it may:
    CUDA, Triton installed, compute capability, dtype and head dim, then :func:`self_check`."""
    if device.type != "cuda":
        return f"the fused Triton kernel needs a CUDA device, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "the fused Triton kernel needs Triton, which is not installed"
    capability = torch.cuda.get_device_capability(device)
    if capability < FUSED_MIN_CAPABILITY:
        return (f"the fused Triton kernel needs compute capability >= {'.'.join(map(str, FUSED_MIN_CAPABILITY))}, "
                f"this GPU has {'.'.join(map(str, capability))}")
    if dtype not in FUSED_DTYPES:
        return (f"the fused Triton kernel runs fp16 / bf16 activations, not {str(dtype).removeprefix('torch.')} "
                "(train.precision=fp16 or bf16)")
    if head_dim > FUSED_MAX_HEAD_DIM:
        return f"the fused Triton kernel takes head dims up to {FUSED_MAX_HEAD_DIM}, not {head_dim}"
    return self_check(BACKENDS["triton"], device, dtype, head_dim, block_size)


def self_check(backend: Backend, device: torch.device, dtype: torch.dtype, head_dim: int,
               block_size: int) -> str | None:
    """Run ``backend`` on a small input (2 samples, 2 heads, per-sample positions, 3 blocks with a
    partial last one) through :func:`errors_against_reference`. None when every error is within
    :data:`SELF_CHECK_TOLERANCE`, else the reason (what it raised, or its largest error). Draws from
    its own generator, not the global one."""
    g = torch.Generator().manual_seed(0)
    heads, n = 2, 3 * block_size - block_size // 2
    grid = math.isqrt(n - 1) + 1
    positions = torch.stack([torch.randperm(2 * grid * grid, generator=g)[:n].sort().values for _ in range(2)])
    positions = F.pad(positions, (1, 0), value=CLS_POSITION).to(device)
    q, k, v = (torch.randn(2, heads, 1 + n, head_dim, generator=g).to(device) for _ in range(3))
    rel_bias = RelativePositionBias3D(2, grid, heads).to(device)
    rel_bias.table.data.copy_(torch.randn(rel_bias.table.shape, generator=g))
    pattern = sample_block_pattern(n, block_size, 1, 1, generator=g, device=device)
    try:
        errors = errors_against_reference(backend, q, k, v, positions, rel_bias, pattern, dtype)
    except Exception as error:  # noqa: BLE001 - a kernel that does not compile or launch, whatever it raises
        return f"the fused Triton kernel failed its self-check: {type(error).__name__}: {_first_line(error)}"
    error, tolerance = max(errors.values()), SELF_CHECK_TOLERANCE[dtype]
    if not error <= tolerance:  # NaN fails too
        return (f"the fused Triton kernel's self-check differs from the reference by {error:.3g} "
                f"(tolerance {tolerance:g}) in {str(dtype).removeprefix('torch.')}, head dim {head_dim}")
    return None


def errors_against_reference(backend: Backend, q, k, v, positions, rel_bias: RelativePositionBias3D,
                             pattern: BlockPattern, dtype: torch.dtype) -> dict[str, float]:
    """``backend`` on ``q``, ``k``, ``v`` cast to ``dtype`` against :func:`reference_attention` in fp32,
    forward and backward of a fixed random loss: for the output, the [CLS] probabilities and the
    gradients of q, k, v and the bias table, the largest error relative to max(1, max |reference|).
    Runs outside autocast, with gradients on and its own saved tensors (also inside an activation-
    checkpointed forward, whose hooks would count them as the block's); raises what ``backend`` raises."""
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device)

    def outputs_and_grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        bias = copy.deepcopy(rel_bias).float()
        out, cls_probs = fn(*leaves, positions, bias, pattern)
        ((out.float() * weights).sum() + cls_probs.float().square().sum()).backward()
        return [out.detach(), cls_probs.detach(), *(t.grad for t in leaves), bias.table.grad]

    with (torch.inference_mode(False), torch.enable_grad(), torch.autocast(q.device.type, enabled=False),
          torch.autograd.graph.saved_tensors_hooks(_same, _same)):
        got = outputs_and_grads(backend, dtype)
        ref = outputs_and_grads(reference_attention, torch.float32)
    return {name: ((a.float() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
            for name, a, b in zip(("out", "cls_probs", "dq", "dk", "dv", "dtable"), got, ref)}


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
