"""Processes under torchrun: the process group, rank / world size, all-gathers and decisions made once.

Every helper here also works in a single process without a process group (it
is then the identity, or rank 0 of a world of 1), so the library never needs
to ask whether it runs distributed.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and the device to run on: ``device`` (:func:`svitt_ego.device.pick_device`), on CUDA
    without an index the local rank's GPU; initialises the process group when run under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if device.index is None else device.index)
        torch.cuda.set_device(device)
    if size > 1 and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", 0)), size, device


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if world_size() > 1:
        dist.barrier()


def decide_on_main(decision: Callable[[], Any]) -> Any:
    """Run ``decision`` on rank 0 only and give every rank its result (a picklable value).

    For checks of files that only rank 0 may see (``last.pt`` exists, the EgoMCQ
    file exists): ranks that decided separately could take different branches
    and then wait for each other in different collectives forever.
    """
    value = [decision() if is_main() else None]
    if world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def gather_objects(obj: Any) -> list:
    """``obj`` from every rank, in rank order (a list of one without a process group)."""
    if world_size() == 1:
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums the gradient over ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.local_size = dist.get_rank(), tensor.shape[0]
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, ctx.rank * ctx.local_size, ctx.local_size)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, rank order; the local slice keeps its gradient.

    Every rank must pass the same shape. Every rank then computes the same loss ``L``
    on the global batch. The backward all-reduces (sums) the incoming gradient and
    returns this rank's slice, i.e. ``world_size * dL/dx_local``. DDP then averages
    parameter gradients over ``world_size``, which gives exactly the gradient of one
    process that computed ``L`` on the global batch.

    Identity when ``torch.distributed`` is not initialised or the world size is 1.
    """
    if world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (for tags, masks, ids); no gradient.

    Every rank must pass the same shape (pad variable-length data first).
    Identity when ``torch.distributed`` is not initialised or the world size is 1.
    """
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def gather_tags(tags: torch.Tensor) -> torch.Tensor:
    """All processes' padded tag tensors, padded (-1) to the widest first so that they stack."""
    if world_size() == 1:
        return tags
    width = torch.tensor(tags.shape[1], device=tags.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return all_gather_no_grad(F.pad(tags, (0, int(width) - tags.shape[1]), value=-1))


def true_on_every_rank(flags: torch.Tensor) -> list[bool]:
    """Whether each flag is true on every rank: one host-device sync for all of them."""
    flags = flags.to(torch.int32)
    if world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [bool(f) for f in flags.tolist()]
