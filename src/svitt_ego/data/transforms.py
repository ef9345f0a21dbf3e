"""Clip transforms on uint8 frames: one crop (and flip) for every frame of a clip.

Training: RandomResizedCrop(size, scale, ratio) + horizontal flip with p = 0.5. Evaluation:
resize the short side to ``size`` and take the centre ``size x size``, done as one crop of the
centre square followed by one resize (the same pixels up to rounding, and half the work).
Then float, /255, normalise. The resize runs on uint8 (torch has a fast antialiased bilinear
kernel for it), so only ``size x size`` pixels are ever converted to float.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop covering ``scale`` of the area with aspect ``ratio``
    (log-uniform), as torchvision draws it: 10 tries, then the centre crop with the ratio
    clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The centre square, which resizing to ``size`` equals short-side resize + centre crop."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


class ClipTransform:
    """uint8 ``[T, H, W, 3]`` -> normalised float ``[T, 3, size, size]``."""

    def __init__(self, size: int, train: bool, mean: list[float], std: list[float],
                 scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = True):
        self.size, self.train, self.flip = size, train, flip
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        std_ = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add.
        self.multiplier = 1.0 / (255.0 * std_)
        self.offset = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        height, width = frames.shape[1:3]
        if self.train:
            if rng is None:
                raise ValueError("the training transform needs an rng")
            top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
            flip = self.flip and rng.random() < 0.5
        else:
            (top, left, h, w), flip = center_crop_box(height, width), False
        crop = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2)
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                            align_corners=False)
        if flip:
            out = out.flip(-1)
        return out.float().mul_(self.multiplier).add_(self.offset).contiguous()


def eval_transform(vision) -> ClipTransform:
    """The evaluation transform of a model's ``VisionConfig``: resize, centre crop, normalise."""
    return ClipTransform(vision.image_size, False, vision.mean, vision.std)
