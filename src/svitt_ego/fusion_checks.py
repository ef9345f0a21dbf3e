"""Checks that the multimodal (fusion) encoder uses the video, on held-out clips.

- **VTM accuracy**: each held-out clip (the clips of the EgoMCQ file) is paired with its own
  narration, a narration of another action in the same video and a narration from another video;
  a pair counts as right when the VTM head's P(match) > 0.5 says match exactly for the first.
- **MLM with the true video against a shuffled one**: the content words of each narration (every
  word after the ``#C C`` prefix but the articles: the verb and the object) are all masked at once
  and predicted with the clip's own video tokens and with those of another clip whose narration
  differs; the share of masked tokens predicted right is printed for both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from svitt_ego.config import Config
from svitt_ego.data.egomcq import Clip, read_egomcq, read_eval_clip
from svitt_ego.data.transforms import eval_transform
from svitt_ego.eval.egomcq import evaluate_egomcq_scores, format_egomcq
from svitt_ego.models import SViTTEgo

MATCH, SAME_VIDEO, OTHER_VIDEO = "match", "same video", "other video"
# Narrations start with a camera-wearer tag and use articles: neither says anything about the video.
UNMASKED_WORDS = {"#c", "c", "the", "a", "an"}


@dataclass
class HeldOutPair:
    clip: int  # index into the list of held-out clips
    text: str
    kind: str  # MATCH, SAME_VIDEO or OTHER_VIDEO


def heldout_clips(egomcq: str) -> list[Clip]:
    """The narrated clips of an EgoMCQ file (queries and choices), each once, in file order."""
    seen, clips = set(), []
    for question in read_egomcq(egomcq):
        for clip in [question.query, *question.choices]:
            key = (clip.video_uid, clip.start, clip.end)
            if clip.text is not None and key not in seen:
                seen.add(key)
                clips.append(clip)
    return clips


def heldout_pairs(clips: list[Clip], seed: int = 0) -> list[HeldOutPair]:
    """For each clip: its narration, another narration of its video, a narration of another video
    (the two others drawn with ``seed`` among texts that differ from the clip's; a clip without such
    a text in its video gets no same-video pair)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i, clip in enumerate(clips):
        pairs.append(HeldOutPair(i, clip.text, MATCH))
        for kind, same in ((SAME_VIDEO, True), (OTHER_VIDEO, False)):
            texts = sorted({c.text for c in clips if (c.video_uid == clip.video_uid) == same and c.text != clip.text})
            if texts:
                pairs.append(HeldOutPair(i, texts[rng.integers(len(texts))], kind))
    return pairs


class ClipFrames(Dataset):
    """The evaluation frames ``[T, 3, S, S]`` of each clip (middle of each segment, centre crop)."""

    def __init__(self, cfg: Config, clips: list[Clip]):
        self.clips, self.cfg = clips, cfg
        self.transform = eval_transform(cfg.model.vision)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_eval_clip(self.cfg, self.clips[index]))


@torch.no_grad()
def video_tokens(model: SViTTEgo, cfg: Config, clips: list[Clip], device: torch.device) -> torch.Tensor:
    """The video encoder's output tokens of every clip, [N, 1 + k, C] (evaluation mode: a fixed count)."""
    loader = DataLoader(ClipFrames(cfg, clips), batch_size=4 * cfg.eval.batch_size,
                        num_workers=cfg.data.num_workers)
    return torch.cat([model.forward_video(frames.to(device)).tokens for frames in loader])


@torch.no_grad()
def vtm_probabilities(model: SViTTEgo, texts: list[str], tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """P(match) [N] of each text with the video tokens of the same row."""
    probs = []
    for i in range(0, len(texts), batch_size):
        enc = model.tokenize(texts[i:i + batch_size])
        hidden = model.forward_text(enc["input_ids"], enc["attention_mask"])
        logits = model.vtm_logits(hidden, enc["attention_mask"], tokens[i:i + batch_size])
        probs.append(logits.float().softmax(-1)[:, 1])
    return torch.cat(probs)


def vtm_accuracy(model: SViTTEgo, pairs: list[HeldOutPair], tokens: torch.Tensor) -> dict:
    """Accuracy (%) of P(match) > 0.5 on ``pairs`` (whose ``clip`` indexes ``tokens``): over all pairs
    and per kind, with the mean P(match) of each kind."""
    probs = vtm_probabilities(model, [p.text for p in pairs], tokens[[p.clip for p in pairs]]).cpu()
    kinds = np.array([p.kind for p in pairs])
    right = (probs > 0.5).numpy() == (kinds == MATCH)
    result = {"accuracy": 100.0 * right.mean(), "num_pairs": len(pairs)}
    for kind in (MATCH, SAME_VIDEO, OTHER_VIDEO):
        chosen = kinds == kind
        result[kind] = {"accuracy": 100.0 * right[chosen].mean(), "p_match": float(probs[chosen].mean()),
                        "num_pairs": int(chosen.sum())}
    return result


def mask_content_words(model: SViTTEgo, texts: list[str]) -> tuple[dict, torch.Tensor]:
    """Tokenized ``texts`` with every word-piece of a content word replaced by [MASK], and the labels
    (the original ids there, -100 elsewhere)."""
    enc = model.tokenizer(texts, padding="longest", truncation=True, max_length=model.config.text.max_length,
                          return_tensors="pt", return_offsets_mapping=True)
    ids = enc["input_ids"].clone()
    labels = torch.full_like(ids, -100)
    for row, text in enumerate(texts):
        for position, (start, end) in enumerate(enc["offset_mapping"][row].tolist()):
            if end > start and _word_at(text, start).lower() not in UNMASKED_WORDS:
                labels[row, position] = ids[row, position]
                ids[row, position] = model.tokenizer.mask_token_id
    device = model.text_proj.weight.device
    return {"input_ids": ids.to(device), "attention_mask": enc["attention_mask"].to(device)}, labels.to(device)


def _word_at(text: str, index: int) -> str:
    """The whitespace-delimited word of ``text`` holding character ``index``."""
    start = text.rfind(" ", 0, index) + 1
    end = text.find(" ", index)
    return text[start:end if end >= 0 else len(text)]


def shuffled_partners(clips: list[Clip], seed: int = 0) -> list[int]:
    """For each clip, another clip whose narration differs (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    partners = []
    for clip in clips:
        others = [j for j, c in enumerate(clips) if c.text != clip.text]
        partners.append(others[rng.integers(len(others))])
    return partners


@torch.no_grad()
def mlm_video_accuracy(model: SViTTEgo, clips: list[Clip], tokens: torch.Tensor, batch_size: int = 64) -> dict:
    """Accuracy (%) of MLM on the masked content words with each clip's own video tokens (``true``)
    and with those of a clip of another narration (``shuffled``)."""
    partners = shuffled_partners(clips)
    right = {"true": 0, "shuffled": 0}
    total = 0
    for i in range(0, len(clips), batch_size):
        enc, labels = mask_content_words(model, [c.text for c in clips[i:i + batch_size]])
        select = labels != -100
        total += int(select.sum())
        for name, rows in (("true", list(range(i, i + len(labels)))), ("shuffled", partners[i:i + batch_size])):
            logits = model.mlm_logits(enc["input_ids"], enc["attention_mask"], tokens[rows], select=select)
            right[name] += int((logits.argmax(-1) == labels[select]).sum())
    return {name: 100.0 * count / max(total, 1) for name, count in right.items()} | {"num_tokens": total}


def fusion_checks(model: SViTTEgo, cfg: Config, device: torch.device) -> dict:
    """VTM accuracy and MLM true / shuffled video accuracy of ``model`` on the clips of ``cfg.data.egomcq``."""
    was_training = model.training
    model.eval()
    clips = heldout_clips(cfg.data.egomcq)
    tokens = video_tokens(model, cfg, clips, device)
    result = {"vtm": vtm_accuracy(model, heldout_pairs(clips), tokens),
              "mlm": mlm_video_accuracy(model, clips, tokens)}
    model.train(was_training)
    return result


def format_fusion_checks(result: dict) -> str:
    vtm, mlm = result["vtm"], result["mlm"]
    lines = [f"VTM on {vtm['num_pairs']} held-out pairs: accuracy {vtm['accuracy']:.1f}% (P(match) > 0.5)"]
    lines += [f"  {kind:12s} {vtm[kind]['accuracy']:5.1f}% right, mean P(match) {vtm[kind]['p_match']:.3f}"
              for kind in (MATCH, SAME_VIDEO, OTHER_VIDEO)]
    lines.append(f"MLM on {mlm['num_tokens']} masked verb / object tokens: {mlm['true']:.1f}% with the true video, "
                 f"{mlm['shuffled']:.1f}% with a shuffled one")
    return "\n".join(lines)


def last_epoch_losses(run_folder: str | Path) -> dict:
    """The mean of each loss over the last epoch's records of ``metrics.jsonl``."""
    records = [json.loads(line) for line in (Path(run_folder) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "vtm" in r]
    last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
    return {"epoch": last[-1]["epoch"], **{k: sum(r[k] for r in last) / len(last) for k in ("vtm", "mlm", "contrastive")}}


def multimodal_report(model: SViTTEgo, cfg: Config, device: torch.device, run_folder: str | Path) -> dict:
    """What ``svitt-ego demo`` reports after pretraining: EgoMCQ by each score, the held-out checks of
    :func:`fusion_checks` and the losses of the run's last epoch."""
    return {"egomcq": evaluate_egomcq_scores(model, cfg, device), **fusion_checks(model, cfg, device),
            "last_epoch_losses": last_epoch_losses(run_folder)}


def format_multimodal_report(report: dict) -> str:
    losses = report["last_epoch_losses"]
    return "\n".join([
        format_egomcq({f"by {score} (%)": result for score, result in report["egomcq"].items()}),
        f"last epoch ({losses['epoch']}): VTM loss {losses['vtm']:.3f}, MLM loss {losses['mlm']:.3f}",
        format_fusion_checks(report)])
