"""EPIC-Kitchens-100 multi-instance retrieval, fine-tuned: the dual encoder on the training split with
the max-margin ranking loss weighted by the relevancy of the (global) batch's pairs (docs/downstream.md).

The relevancy of two training clips is the benchmark's own, (verb match + IoU of the noun-class
sets) / 2 (:func:`svitt_ego.eval.epic_mir.build_relevancy`), computed inside each batch from the CSV's
``verb_class`` and ``all_noun_classes``: never a dense matrix of the whole training split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from svitt_ego.data.errors import MetadataError
from svitt_ego.device import pick_device
from svitt_ego.distributed import all_gather_no_grad, all_gather_with_grad, gather_tags, is_main, setup_distributed
from svitt_ego.eval.epic_mir import (TEST_COLUMNS, ClipReader, MIRAnnotations, MIRClip, build_relevancy,
                                     evaluate_epic_mir, format_epic_mir, load_relevancy, mir_clip,
                                     read_mir_annotations, video_path)
from svitt_ego.eval.finetune import Recipe, Task, TrainingClip, finetune, held_out, load_model
from svitt_ego.losses import max_margin_ranking
from svitt_ego.models import SViTTEgo
from svitt_ego.eval.embed import read_csv_rows

TRAIN_CSV = "EPIC_100_retrieval_train.csv"
MARGIN = 0.2  # LaViLa's and EgoVLP's


def read_mir_clips(path: str | Path) -> list[MIRClip]:
    """The clips of an EK-100 MIR CSV (``EPIC_100_retrieval_train.csv``: the test CSV's columns)."""
    clips = [mir_clip(Path(path), line, row) for line, row in read_csv_rows(Path(path), TEST_COLUMNS)]
    if not clips:
        raise MetadataError(f"{path}: holds no clips")
    return clips


def as_retrieval(clips: list[MIRClip]) -> MIRAnnotations:
    """``clips`` as a retrieval benchmark: one text per distinct (narration, verb, nouns), the first
    clip's, so that every clip has a text of relevancy 1."""
    first: dict = {}
    for i, clip in enumerate(clips):
        first.setdefault((clip.narration, clip.verb_class, frozenset(clip.noun_classes)), i)
    return MIRAnnotations(clips, list(first.values()))


def pair_relevancy(verbs: torch.Tensor, nouns: torch.Tensor) -> torch.Tensor:
    """[N, N] (verb match + IoU of the noun-class sets) / 2 of N clips: ``verbs`` [N], ``nouns`` [N, K]
    padded with -1 (:func:`~svitt_ego.data.egoclip.pad_tags`); :func:`build_relevancy`'s value."""
    same = (nouns[:, None, :, None] == nouns[None, :, None, :]) & (nouns[:, None, :, None] >= 0)
    intersection = same.any(dim=3).sum(dim=2).double()  # the noun lists hold no repeats
    sizes = (nouns >= 0).sum(dim=1).double()
    iou = intersection / (sizes[:, None] + sizes[None, :] - intersection).clamp(min=1)
    return ((verbs[:, None] == verbs[None, :]).double() + iou) / 2


class MaxMarginObjective(nn.Module):
    """The dual encoder's :func:`~svitt_ego.losses.max_margin_ranking` over the batch of every process."""

    def __init__(self, model: SViTTEgo, margin: float = MARGIN):
        super().__init__()
        self.model, self.margin = model, margin

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, mask = self.model, batch["attention_mask"]
        video = m.encode_video(batch["frames"])
        text = m.text_embedding(m.forward_text(batch["input_ids"], mask), mask)
        relevancy = pair_relevancy(all_gather_no_grad(batch["verb"]), gather_tags(batch["nouns"]))
        return {"loss": max_margin_ranking(all_gather_with_grad(video), all_gather_with_grad(text), relevancy,
                                           self.margin)}


def training_clip(videos: Path, clip: MIRClip) -> TrainingClip:
    return TrainingClip(video_path(videos, clip), clip.start, clip.stop, clip.narration,
                        {"verb": clip.verb_class, "nouns": list(clip.noun_classes)})


def mir_task(annotations: str | Path, videos: str | Path, recipe: Recipe, relevancy: str | Path | None,
             cfg, device) -> Task:
    """The fine-tuning task: training clips of the videos not held out, validation on those held out
    (mean of avg mAP and avg nDCG), the test split scored as ``eval-epic-mir`` scores it."""
    annotations, videos = Path(annotations), Path(videos)
    clips = read_mir_clips(annotations / TRAIN_CSV)
    test = read_mir_annotations(annotations)
    shape = (len(test.clips), len(test.columns))
    test_relevancy = build_relevancy(test) if relevancy is None else load_relevancy(relevancy, shape)
    val_videos = held_out([c.video_id for c in clips], recipe.val_fraction, recipe.seed)
    val = as_retrieval([c for c in clips if c.video_id in val_videos])
    val_relevancy = build_relevancy(val)
    reader = ClipReader(videos, "videos", recipe.num_frames)

    def validate(model: SViTTEgo) -> dict:
        result = evaluate_epic_mir(model, cfg, device, val, val_relevancy, reader, recipe.batch_size)
        return {**result, "score": (result["mAP avg"] + result["nDCG avg"]) / 2}

    def score_test(model: SViTTEgo) -> dict:
        return evaluate_epic_mir(model, cfg, device, test, test_relevancy, reader, recipe.batch_size)

    return Task("finetune-epic-mir", [training_clip(videos, c) for c in clips if c.video_id not in val_videos],
                MaxMarginObjective, validate, score_test,
                {"annotations": str(annotations), "videos": str(videos), "held_out": sorted(val_videos),
                 "margin": MARGIN, "relevancy": str(relevancy) if relevancy is not None else "built from the CSVs"})


def run_finetune_epic_mir(model: str | Path, annotations: str | Path, videos: str | Path, output: str | Path,
                          recipe: Recipe, relevancy: str | Path | None = None, device: str | None = None,
                          resume: bool = False, allow_config_change: bool = False) -> dict:
    """``svitt-ego finetune-epic-mir``: fine-tune, print the test split's table of the last epoch."""
    _, _, device = setup_distributed(pick_device(device))
    net, cfg = load_model(model, recipe, output)
    result = finetune(mir_task(annotations, videos, recipe, relevancy, cfg, device), net, cfg, device, resume,
                      allow_config_change)
    if is_main():
        print(f"EK-100 MIR, fine-tuned {recipe.epochs} epochs, {recipe.num_frames} frames; the test split, last "
              f"epoch ({Path(output) / 'test.json'}; best.pt chosen on {recipe.val_fraction:.0%} of the training "
              "videos)")
        print(format_epic_mir({"score (%)": result}))
    return result
