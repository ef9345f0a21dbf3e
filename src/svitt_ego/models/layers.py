"""Linear layers that keep less for the backward, with the same maths.

``scaled_linear`` folds a per-channel layer scale into the weight: ``gamma * linear(x)`` makes
autograd keep the linear's output for gamma's gradient, an [N, C] tensor beside the linear's input;
``linear(x, W * gamma, b * gamma)`` keeps only the input (and the scaled weight, a weight's size).

``gelu_linear`` is ``linear(gelu(h))`` keeping only ``h`` and the weight: autograd would keep both
``h`` (GELU's input) and ``gelu(h)`` (the linear's input); here ``gelu(h)`` is recomputed in the
backward.

``norm_linear`` is ``linear(layer_norm(x))`` keeping only ``x`` and the weight: under autocast, autograd
would keep the fp32 copy of ``x`` that LayerNorm runs on and the fp16 copy of its output that the
linear runs on; here both are recomputed in the backward.

Under autocast both compute as autocast would (CUDA's policy: LayerNorm in fp32, the linear in autocast's
dtype); autocast's dtype is read when the forward runs, since the backward runs without autocast.
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


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _linear_grads(ctx, grad_out, inputs, weight, dtypes):
    """The weight's and bias's gradients of ``F.linear(inputs, weight, bias)``, in their own dtypes."""
    flat = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[-2]:
        grad_weight = (flat.t() @ inputs.reshape(flat.shape[0], -1)).to(dtypes[0])
    if dtypes[1] is not None and ctx.needs_input_grad[-1]:
        grad_bias = flat.sum(0).to(dtypes[1])
    return grad_weight, grad_bias


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias):
        device = h.device.type
        dtype = _autocast_dtype(h) or h.dtype
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
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad_out @ weight, h).to(h_dtype)
        return grad_h, *_linear_grads(ctx, grad_out, F.gelu(h), weight, (weight_dtype, bias_dtype))


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        device = x.device.type
        dtype = _autocast_dtype(x)
        ctx.norm_dtype = torch.float32 if dtype is not None else x.dtype  # CUDA autocast: LayerNorm in fp32
        dtype = dtype or x.dtype
        ctx.eps, ctx.dtypes = eps, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        weight = weight.to(dtype)
        with torch.autocast(device, enabled=False):
            y = _NormLinear.norm(ctx, x.to(ctx.norm_dtype), norm_weight, norm_bias)[0].to(dtype)
            out = F.linear(y, weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        return out

    @staticmethod
    def norm(ctx, x, norm_weight, norm_bias):
        """LayerNorm over the last dimension of ``x`` (in the norm's dtype): its output, mean and 1 / std."""
        dtype = ctx.norm_dtype
        return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], norm_weight.to(dtype), norm_bias.to(dtype),
                                                ctx.eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        dtype = ctx.norm_dtype
        grad_out = grad_out.to(weight.dtype)
        x = x.to(dtype)
        y, mean, rstd = _NormLinear.norm(ctx, x, norm_weight, norm_bias)
        grads = _linear_grads(ctx, grad_out, y.to(weight.dtype), weight, (weight_dtype, bias_dtype))
        del y
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            (grad_out @ weight).to(dtype), x, [x.shape[-1]], mean, rstd, norm_weight.to(dtype),
            norm_bias.to(dtype), ctx.needs_input_grad[:3])
        return (None if grad_x is None else grad_x.to(x_dtype),
                None if grad_norm_weight is None else grad_norm_weight.to(norm_weight.dtype),
                None if grad_norm_bias is None else grad_norm_bias.to(norm_bias.dtype), None, *grads)


def gelu_linear(h: torch.Tensor, linear: nn.Linear, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(gelu(h))`` (the exact, erf GELU), times ``scale`` per output channel if given, keeping
    ``h`` and the weight for the backward and recomputing ``gelu(h)`` there, rather than keeping both."""
    return _GeluLinear.apply(h, *_scaled(linear, scale))


def norm_linear(x: torch.Tensor, norm: nn.LayerNorm | None, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(norm(x), weight, bias)`` keeping ``x`` and the weight for the backward and recomputing
    the LayerNorm there; without a norm, ``F.linear(x, weight, bias)``."""
    if norm is None:
        return F.linear(x, weight, bias)
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias)
