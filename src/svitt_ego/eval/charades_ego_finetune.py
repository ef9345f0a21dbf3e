"""Charades-Ego action recognition, fine-tuned as LaViLa fine-tunes it: the dual encoder on the
training split's action segments, each a clip whose text is its class name, with InfoNCE over the
(global) batch; recognition stays the cosine of a whole video with each class name, scored by the
multi-label mAP of ``eval-charades-ego`` (docs/downstream.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from svitt_ego.eval.charades_ego import (CLASSES_TXT, CharadesAnnotations, VideoReader, charades_ego_map,
                                         evaluate_charades_ego, read_charades_annotations)
from svitt_ego.data.errors import MetadataError
from svitt_ego.device import pick_device
from svitt_ego.distributed import all_gather_with_grad, is_main, setup_distributed
from svitt_ego.eval.finetune import Recipe, Task, TrainingClip, finetune, held_out, load_model
from svitt_ego.losses import info_nce
from svitt_ego.models import SViTTEgo
from svitt_ego.eval.embed import embed_clips, embed_texts

TRAIN_CSV = "CharadesEgo_v1_train_only1st.csv"
NUM_CLASSES = 157


class ContrastiveObjective(nn.Module):
    """The dual encoder's symmetric InfoNCE over the batch of every process (LaViLa's ``CLIPLoss``)."""

    def __init__(self, model: SViTTEgo):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, mask = self.model, batch["attention_mask"]
        video = m.encode_video(batch["frames"])
        text = m.text_embedding(m.forward_text(batch["input_ids"], mask), mask)
        return {"loss": info_nce(all_gather_with_grad(video), all_gather_with_grad(text), m.temperature)}


def held_out_map(model: SViTTEgo, annotations: CharadesAnnotations, reader: VideoReader, cfg, device,
                 batch_size: int) -> dict:
    """The mAP of whole held-out videos over the classes they show (a class without a video has no AP)."""
    videos, _ = embed_clips(model, annotations.videos, reader, cfg, device, batch_size, "fail", "held-out videos")
    scores = (videos @ embed_texts(model, annotations.class_names, cfg, device).T).double().numpy()
    labels = annotations.labels()
    shown = labels.any(axis=0)
    value = charades_ego_map(scores[:, shown], labels[:, shown])
    return {"mAP": value, "videos": len(annotations.videos), "classes": int(shown.sum()), "score": value}


def charades_task(annotations: str | Path, videos: str | Path, recipe: Recipe, num_classes: int, cfg,
                  device) -> Task:
    """The fine-tuning task: the action segments of the training videos not held out; validation on the
    held-out ones; the test split scored as ``eval-charades-ego`` scores it."""
    annotations, videos = Path(annotations), Path(videos)
    train, test = read_charades_annotations(annotations, TRAIN_CSV), read_charades_annotations(annotations)
    if len(train.class_ids) != num_classes:
        raise MetadataError(f"{annotations / CLASSES_TXT}: {len(train.class_ids)} classes, expected {num_classes} "
                            "(--num-classes)")
    val_ids = held_out([v.video_id for v in train.videos], recipe.val_fraction, recipe.seed)
    val = CharadesAnnotations(train.class_ids, train.class_names, [v for v in train.videos if v.video_id in val_ids])
    clips = [TrainingClip(videos / f"{v.video_id}.mp4", start, min(end, v.length), train.class_names[c])
             for v in train.videos if v.video_id not in val_ids for c, start, end in v.segments
             if min(end, v.length) > start]
    reader = VideoReader(videos, recipe.num_frames)
    return Task("finetune-charades-ego", clips, ContrastiveObjective,
                lambda model: held_out_map(model, val, reader, cfg, device, recipe.batch_size),
                lambda model: evaluate_charades_ego(model, cfg, device, test, reader, recipe.batch_size),
                {"annotations": str(annotations), "videos": str(videos), "held_out": sorted(val_ids),
                 "classes": train.class_names})


def run_finetune_charades_ego(model: str | Path, annotations: str | Path, videos: str | Path, output: str | Path,
                              recipe: Recipe, num_classes: int = NUM_CLASSES, device: str | None = None,
                              resume: bool = False, allow_config_change: bool = False) -> dict:
    """``svitt-ego finetune-charades-ego``: fine-tune, print the test split's mAP of the last epoch."""
    _, _, device = setup_distributed(pick_device(device))
    net, cfg = load_model(model, recipe, output)
    result = finetune(charades_task(annotations, videos, recipe, num_classes, cfg, device), net, cfg, device,
                      resume, allow_config_change)
    if is_main():
        print(f"Charades-Ego, fine-tuned {recipe.epochs} epochs, {recipe.num_frames} frames; the test split, last "
              f"epoch: mAP {result['mAP']:.1f} over {result['videos']} videos ({Path(output) / 'test.json'})")
    return result
