"""Linear layers that keep less for the backward, with the same maths.

``scaled_linear`` folds a per-channel layer scale into the weight: ``gamma * linear(x)`` makes
autograd keep the linear's output for gamma's gradient, an [N, C] tensor beside the linear's input;
``linear(x, W * gamma, b * gamma)`` keeps only the input (and the scaled weight, a weight's size).

``gelu_linear`` is ``linear(gelu(h))`` keeping only ``h`` and the weight: autograd would keep both
``h`` (GELU's input) and ``gelu(h)`` (the linear's input); here ``gelu(h)`` is recomputed in the
backward. Under autocast it computes in autocast's dtype, as ``F.linear`` would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _scaled(linear: nn.Linear, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of ``scale * linear``: ``scale`` [out] multiplies each output channel."""
    if scale is None:
        return linear.weight, linear.bias
    return linear.weight * scale[:, None], None if linear.bias is None else linear.bias * scale


def scaled_linear(x: torch.Tensor, linear: nn.Linear, scale: torch.Tensor | None) -> torch.Tensor:
    """``scale * linear(x)``, the per-output-channel ``scale`` folded into the weight and bias; without
    a scale, ``linear(x)``."""
    return F.linear(x, *_scaled(linear, scale))


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            out = F.linear(F.gelu(h), weight, bias)
        ctx.save_for_backward(h, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        h_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_out = grad_out.to(h.dtype)
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad_out @ weight, h).to(h_dtype)
        if ctx.needs_input_grad[1]:
            flat = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = (flat.t() @ F.gelu(h).reshape(flat.shape[0], -1)).to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(bias_dtype)
        return grad_h, grad_weight, grad_bias


def gelu_linear(h: torch.Tensor, linear: nn.Linear, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(gelu(h))`` (the exact, erf GELU), times ``scale`` per output channel if given, keeping
    ``h`` and the weight for the backward and recomputing ``gelu(h)`` there, rather than keeping both."""
    return _GeluLinear.apply(h, *_scaled(linear, scale))
