"""Inputs and gradients shared by the attention tests (the backends against ``reference_attention``)."""

import torch

from svitt_ego.models.position_bias import RelativePositionBias3D


def attention_inputs(batch, heads, num_patches, dim, frames, grid, per_sample, dtype=torch.float64,
                     device="cpu"):
    """q, k, v (leaves) for [CLS] + ``num_patches`` tokens whose positions are a (per-sample) subset of the
    grid, the positions, and a bias module with a unit-variance table (fp64 on the CPU, else fp32)."""
    total = frames * grid * grid
    if per_sample:
        pos = torch.stack([torch.randperm(total)[:num_patches].sort().values for _ in range(batch)])
    else:
        pos = torch.arange(num_patches)[None]
    positions = torch.cat([torch.full((pos.shape[0], 1), -1), pos], dim=1).to(device)
    q, k, v = (torch.randn(batch, heads, num_patches + 1, dim, dtype=torch.float64).to(device, dtype)
               .requires_grad_() for _ in range(3))
    bias = RelativePositionBias3D(frames, grid, heads).to(device, torch.float64 if dtype == torch.float64
                                                          else torch.float32)
    torch.nn.init.normal_(bias.table, std=1.0)
    return q, k, v, positions, bias


def outputs_and_grads(fn, q, k, v, positions, bias, pattern):
    """Output, [CLS] probabilities and the gradients of q, k, v and the bias table of a fixed scalar loss."""
    for t in (q, k, v, bias.table):
        t.grad = None
    out, cls_probs = fn(q, k, v, positions, bias, pattern)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    ((out * weights).sum() + cls_probs.float().square().sum()).backward()
    return out.detach(), cls_probs.detach(), [t.grad.clone() for t in (q, k, v, bias.table)]


def max_relative_error(got, ref) -> float:
    """Largest |got - ref| over the output, [CLS] probabilities and all gradients, each relative to
    max(1, max |ref|)."""
    pairs = zip((*got[:2], *got[2]), (*ref[:2], *ref[2]))
    return max(((a.double() - b.double()).abs().max() / max(1.0, b.double().abs().max().item())).item()
               for a, b in pairs)
