"""AdamW with its state sharded over the ranks under torchrun (ZeRO stage 1): ``train.shard_optimizer``.

A module of its own because ``torch.distributed.optim`` takes seconds to import: only a run that
shards imports it. docs/training.md says what is sharded and why this mechanism.
"""

from __future__ import annotations

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from svitt_ego.distributed import is_main


class ShardedAdamW(ZeroRedundancyOptimizer):
    """AdamW whose state each rank keeps for its share of the parameters only; needs a process group.

    Parameters and gradients stay whole on every rank (DDP averages the gradients as before); each rank
    steps its share of the parameters, whole tensors assigned largest first to the least loaded rank,
    and then broadcasts them to the others. :meth:`full_state_dict` gathers the whole state on rank 0,
    in the format of an unsharded AdamW's ``state_dict()``, which :meth:`load_state_dict` takes back,
    each rank keeping its share: a checkpoint is the same file with or without sharding.
    """

    def __init__(self, param_groups: list[dict], **adamw):
        super().__init__(param_groups, optimizer_class=torch.optim.AdamW, **adamw)

    def full_state_dict(self) -> dict | None:
        """The whole state on rank 0 (on the CPU), None elsewhere; every rank must call it."""
        self.consolidate_state_dict(to=0)
        if not is_main():
            return None
        state, self._all_state_dicts = self.state_dict(), []  # not kept: a host copy of all of the state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The wrapper's own copy of the loaded state is never read again (full_state_dict gathers the
        # shards); on a GPU it would be a second copy of this rank's share.
        self.state.clear()
        # ZeroRedundancyOptimizer puts each "step" on the CPU, where fused AdamW refuses it on CUDA.
        if self.optim.defaults.get("fused"):
            for param, state in self.optim.state.items():
                state["step"] = state["step"].to(param.device)


def shard_sizes(param_groups: list[dict], world_size: int) -> list[int]:
    """The parameter elements whose AdamW state each rank keeps, by rank, without a process group (meta
    tensors will do): :class:`ShardedAdamW`'s partition, group by group, largest tensor first, each to
    the rank with the fewest elements so far (the lowest such rank). Two fp32 moments an element."""
    sizes = [0] * world_size
    for group in param_groups:
        for param in sorted(group["params"], key=lambda p: p.numel(), reverse=True):
            sizes[sizes.index(min(sizes))] += param.numel()
    return sizes
