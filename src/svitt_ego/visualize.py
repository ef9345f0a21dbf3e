"""What node sparsity keeps, drawn and measured (the paper's Figure 1).

:func:`kept_masks` runs the model on one clip and returns, for every video
pruning layer (and, given a text, for the first fusion layer's text-conditioned
pruning), which patches of which frame survive. :func:`draw_figure` draws the
frames as the model sees them, then one row per pruning step with the pruned
patches darkened; ``svitt-ego visualize`` does both for a checkpoint and a video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from svitt_ego.atomic import atomic_save_png
from svitt_ego.config import Config, VisionConfig
from svitt_ego.data.transforms import center_crop_box, eval_transform
from svitt_ego.data.video import read_chunk_frames, read_clip_frames, sample_times
from svitt_ego.models import SViTTEgo
from svitt_ego.models.video import VideoOutput

DARKEN = 0.25  # a pruned patch's pixels are multiplied by this
MIN_FRAME_PIXELS = 160  # small frames are enlarged (by a whole factor, nearest neighbour) to at least this
GAP = 6  # pixels between frames and around the figure
LABEL_HEIGHT = 22  # the band above each row that holds its label
FONT_SIZE = 14
BACKGROUND = (255, 255, 255)



# ---------------------------------------------------------------- frames

def read_video(video: str | Path, start: float, end: float, num_frames: int,
               chunk_seconds: float = 600.0) -> torch.Tensor:
    """``num_frames`` frames of ``[start, end]`` sampled as in evaluation, uint8 ``[T, H, W, 3]``:
    from a prepared chunk folder ``<root>/<video_uid>/`` (times from the video's start) or from
    any one file PyAV reads."""
    path = Path(video)
    if path.is_dir():
        return read_clip_frames(path.parent, path.name, start, end, num_frames, "uniform", chunk_seconds)
    times = sample_times(start, end, num_frames, "uniform")
    return torch.from_numpy(np.stack(read_chunk_frames(path, times)))


def as_seen(frames: torch.Tensor, vision: VisionConfig) -> np.ndarray:
    """Normalised model input ``[T, 3, S, S]`` back to the uint8 ``[T, S, S, 3]`` pixels it encodes."""
    mean = torch.tensor(vision.mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.std).view(1, 3, 1, 1)
    pixels = ((frames * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- what the model keeps

@dataclass
class KeptRow:
    label: str
    mask: torch.Tensor  # bool [B, T, h, w]: True where the patch survives


def position_mask(positions: torch.Tensor, num_frames: int, grid: int) -> torch.Tensor:
    """``[B, k]`` frame-major patch positions -> bool ``[B, T, grid, grid]``, True at those positions."""
    mask = torch.zeros(positions.shape[0], num_frames * grid * grid, dtype=torch.bool, device=positions.device)
    mask.scatter_(1, positions, True)
    return mask.view(-1, num_frames, grid, grid)


@torch.no_grad()
def kept_masks(model: SViTTEgo, frames: torch.Tensor, texts: list[str] | None = None) -> list[KeptRow]:
    """The patches each pruning step keeps for normalised clips ``[B, T, 3, S, S]``.

    One row per video pruning layer and, with ``texts`` (one per clip), one for the first fusion
    layer, which keeps the video tokens its text [CLS] attends to most (q_m). The model runs in
    evaluation mode (its random attention blocks fixed by ``eval_seed``).
    """
    vision = model.config.vision
    was_training = model.training
    model.eval()
    video = model.forward_video(frames.to(model.vision_proj.weight.device))
    T, grid = vision.num_frames, vision.grid_size
    total = T * grid * grid
    rows = []
    for layer, positions in zip(vision.prune_layers, video.kept_positions):
        rows.append(KeptRow(f"after video layer {layer}: {positions.shape[1]} of {total} patches kept "
                            f"(q_v = {vision.keep_rate:g})", position_mask(positions.cpu(), T, grid)))
    if texts is not None:
        rows.append(fusion_row(model, video, texts, total))
    model.train(was_training)
    return rows


def fusion_row(model: SViTTEgo, video: VideoOutput, texts: list[str], total: int) -> KeptRow:
    """The video patches the first fusion layer keeps for ``texts`` (all of them when q_m = 1)."""
    enc = {k: v.to(video.tokens.device) for k, v in model.tokenize(texts).items()}
    fused = model.fusion(model.forward_text(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"],
                         video.tokens)
    kept = fused.kept_video_tokens
    B, n = video.tokens.shape[0], video.tokens.shape[1] - 1
    kept = kept[:, 1:] if kept is not None else torch.arange(1, n + 1, device=video.tokens.device).expand(B, -1)
    video_layers = video.kept_positions
    positions = video_layers[-1] if video_layers else torch.arange(total, device=video.tokens.device).expand(B, -1)
    vision, text = model.config.vision, model.config.text
    label = (f"first fusion layer: {kept.shape[1]} of {n} video tokens kept for the text "
             f"(q_m = {text.keep_rate:g})")
    return KeptRow(label, position_mask(positions.gather(1, kept - 1).cpu(), vision.num_frames, vision.grid_size))


# ---------------------------------------------------------------- drawing

@dataclass
class Layout:
    """Where a figure puts each frame: row ``r`` (0 = the frames), frame ``t``."""

    num_frames: int
    image_size: int

    @property
    def scale(self) -> int:
        return max(1, math.ceil(MIN_FRAME_PIXELS / self.image_size))

    @property
    def cell(self) -> int:
        return self.image_size * self.scale

    def origin(self, row: int, frame: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of frame ``frame`` in row ``row``."""
        return GAP + frame * (self.cell + GAP), row * (LABEL_HEIGHT + self.cell) + LABEL_HEIGHT

    def size(self, num_rows: int) -> tuple[int, int]:
        return GAP + self.num_frames * (self.cell + GAP), num_rows * (LABEL_HEIGHT + self.cell) + GAP


def darken_pruned(frames: np.ndarray, mask: torch.Tensor, patch_size: int) -> np.ndarray:
    """uint8 ``[T, S, S, 3]`` frames with the patches where ``mask`` (bool ``[T, h, w]``) is False darkened."""
    keep = mask.numpy().repeat(patch_size, axis=1).repeat(patch_size, axis=2)[..., None]
    return np.where(keep, frames, (frames * DARKEN).astype(np.uint8))


def draw_figure(frames: np.ndarray, rows: list[tuple[str, torch.Tensor]], patch_size: int,
                title: str = "input frames (as the model sees them)") -> Image.Image:
    """Row 0: the uint8 frames ``[T, S, S, 3]`` under ``title``; then each ``(label, mask [T, h, w])``
    row with its pruned patches darkened. Laid out by :class:`Layout`."""
    layout = Layout(frames.shape[0], frames.shape[1])
    image = Image.new("RGB", layout.size(1 + len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    panels = [(title, frames)] + [(label, darken_pruned(frames, mask, patch_size)) for label, mask in rows]
    for r, (label, pixels) in enumerate(panels):
        x, y = layout.origin(r, 0)
        draw.text((x, y - LABEL_HEIGHT + 3), label, fill=(0, 0, 0), font=font)
        for t, frame in enumerate(pixels):
            big = frame.repeat(layout.scale, axis=0).repeat(layout.scale, axis=1)
            image.paste(Image.fromarray(np.ascontiguousarray(big)), layout.origin(r, t))
    return image


def side_by_side(images: list[Image.Image], titles: list[str]) -> Image.Image:
    """Figures next to each other, each under its title."""
    width = sum(im.width for im in images) + GAP * (len(images) - 1)
    out = Image.new("RGB", (width, LABEL_HEIGHT + max(im.height for im in images)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=FONT_SIZE + 2)
    x = 0
    for im, title in zip(images, titles):
        draw.text((x + GAP, 3), title, fill=(0, 0, 0), font=font)
        out.paste(im, (x, LABEL_HEIGHT))
        x += im.width + GAP
    return out


# ---------------------------------------------------------------- one clip, end to end

def clip_figure(model: SViTTEgo, frames: torch.Tensor, text: str | None = None) -> Image.Image:
    """The figure of one clip, uint8 frames ``[T, H, W, 3]`` as read from the video."""
    vision = model.config.vision
    clip = eval_transform(vision)(frames)
    rows = kept_masks(model, clip[None], [text] if text is not None else None)
    title = "input frames (as the model sees them)" + (f'; text: "{text}"' if text is not None else "")
    return draw_figure(as_seen(clip, vision), [(row.label, row.mask[0]) for row in rows], vision.patch_size, title)


def visualize(checkpoint: str | Path, video: str | Path, start: float, end: float, text: str | None = None,
              out: str | Path = "figure.png", chunk_seconds: float = 600.0, device: str | None = None) -> Path:
    """``svitt-ego visualize``: the figure of the clip ``[start, end]`` of ``video`` for a checkpoint, run on
    ``device`` (:func:`~svitt_ego.device.pick_device`)."""
    from svitt_ego.device import pick_device
    from svitt_ego.models.loading import load_for_eval

    if not end > start >= 0:
        raise ValueError(f"expected 0 <= --start < --end, got start={start}, end={end}")
    model, _ = load_for_eval(checkpoint)
    model.to(pick_device(device))
    frames = read_video(video, start, end, model.config.vision.num_frames, chunk_seconds)
    return atomic_save_png(clip_figure(model, frames, text), out)


def demo_figure(untrained: SViTTEgo, pretrained: SViTTEgo, cfg: Config, path: str | Path) -> Path:
    """``svitt-ego demo``'s Figure 1: the first EgoMCQ question's clip (a held-out video) with its
    narration, before and after pretraining, side by side."""
    from svitt_ego.data.egomcq import read_egomcq, read_eval_clip

    clip = read_egomcq(cfg.data.egomcq)[0].query
    frames = read_eval_clip(cfg, clip)
    figures = [clip_figure(model, frames, clip.text) for model in (untrained, pretrained)]
    return atomic_save_png(side_by_side(figures, ["before pretraining", "after pretraining"]), path)


# ---------------------------------------------------------------- measuring

def patch_coverage(masks: np.ndarray, vision: VisionConfig) -> torch.Tensor:
    """Share of each patch the True pixels of bool ``[T, H, W]`` masks cover, ``[T, h, w]``, after the
    evaluation transform's centre crop and resize to the model's input."""
    top, left, h, w = center_crop_box(*masks.shape[1:3])
    crop = torch.from_numpy(masks[:, top:top + h, left:left + w]).float()[:, None]
    grid = vision.grid_size
    return F.interpolate(crop, size=(grid, grid), mode="area")[:, 0]


def survival(kept: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """``(kept weight, total weight)``: how much of ``weight`` (patch coverage, any shape) lies in
    the patches where the bool ``kept`` (same shape) is True."""
    weight = weight.double()
    return float((weight * kept).sum()), float(weight.sum())
