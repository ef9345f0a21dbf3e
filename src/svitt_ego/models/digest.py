"""One digest of a model's weights, whatever file they were read from.

The digest covers the tensors of a state dict in name order: each name, dtype, shape and the
tensor's bytes. A training checkpoint (``.pt``) and the ``save_pretrained`` folder of the same
weights therefore have the same digest, while the bytes of the two files differ.
"""

from __future__ import annotations

import hashlib

import torch


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over ``state_dict``'s tensors in name order (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"
