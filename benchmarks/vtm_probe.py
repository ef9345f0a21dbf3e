"""Why VTM does not learn: short fine-tunes of the fusion layers + VTM head from a trained checkpoint.

The video and text encoders stay frozen: their outputs on ``--batches`` training batches (anchors
and their scene-aware negatives, as in pretraining) are computed once, then each candidate fix
fine-tunes a fresh copy of the fusion layers and the VTM head for ``--steps`` steps on them. The
anchor is the unchanged setting (``cls``, the pretraining learning rate, hard negatives). Printed
per candidate: the VTM loss over the last fifth of the steps and the held-out VTM accuracy
(:mod:`svitt_ego.fusion_checks`). Also printed: how alike the fusion input's [CLS] states of
different narrations are, against their mean-pooled states.

    PYTHONPATH=src python benchmarks/vtm_probe.py demo_run/run/last.pt demo_run/toy_data
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from svitt_ego.data.dataset import EgoClipDataset, EpochSampler, collate_egoclip
from svitt_ego.data.egoclip import action_positive_mask
from svitt_ego.models.loading import load_for_eval
from svitt_ego.fusion_checks import heldout_clips, heldout_pairs, video_tokens, vtm_accuracy
from svitt_ego.losses import sample_vtm_negatives, vtm_loss, vtm_pairs

# name: (fusion_pooling, learning-rate factor, hard negatives)
CANDIDATES = {
    "cls (anchor)": ("cls", 1.0, True),
    "cls, lr x10": ("cls", 10.0, True),
    "cls, random negatives": ("cls", 1.0, False),
    "mean": ("mean", 1.0, True),
    "mean, random negatives": ("mean", 1.0, False),
}


@torch.no_grad()
def encode_batches(model, cfg, num_batches: int) -> list[dict]:
    dataset = EgoClipDataset(cfg, train=True)
    sampler = EpochSampler(len(dataset), 1.0, cfg.train.seed, cfg.train.batch_size)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        collate_fn=collate_egoclip(model.tokenizer, cfg.model.text.max_length), drop_last=True)
    batches = []
    for batch in itertools.islice(loader, num_batches):
        video = model.forward_video(batch["frames"])
        text = model.forward_text(batch["input_ids"], batch["attention_mask"])
        sim = model.video_embedding(video) @ model.text_embedding(text, batch["attention_mask"]).T / model.temperature
        batches.append({"video": video.tokens, "text": text, "mask": batch["attention_mask"], "sim": sim,
                        "positives": action_positive_mask(batch["nouns"], batch["verbs"])})
    return batches


def cls_spread(batches: list[dict]) -> tuple[float, float]:
    """Mean cosine similarity between the fusion input's [CLS] states of different narrations, and
    between their mean-pooled states."""
    def mean_offdiagonal_cosine(x):
        x = F.normalize(x, dim=-1)
        sim = x @ x.T
        n = len(x)
        return float((sim.sum() - n) / (n * (n - 1)))

    text = torch.cat([b["text"][:, 0] for b in batches])
    mean = torch.cat([(b["text"] * b["mask"][..., None]).sum(1) / b["mask"].sum(1, keepdim=True) for b in batches])
    return mean_offdiagonal_cosine(text), mean_offdiagonal_cosine(mean)


def fine_tune(model, batches, steps: int, lr: float, hard: bool) -> float:
    """Train the fusion layers and VTM head; the mean VTM loss of the last fifth of the steps."""
    params = [*model.fusion.parameters(), *model.vtm_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.02)
    model.fusion.train()
    losses = []
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        b = batches[step % len(batches)]
        sim = b["sim"] if hard else torch.zeros_like(b["sim"])
        neg_text, neg_video = sample_vtm_negatives(sim, b["positives"], generator)
        loss = vtm_loss(model.vtm_logits(*vtm_pairs(b["text"], b["mask"], b["video"], neg_text, neg_video)),
                        len(sim))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 5):]
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("toy_data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = [f"data.egoclip={args.toy_data}/egoclip.csv", f"data.egomcq={args.toy_data}/egomcq.json",
            f"data.video_root={args.toy_data}/videos"]
    base, cfg = load_for_eval(args.checkpoint, None, data)
    base.eval()
    batches = encode_batches(base, cfg, args.batches)
    print("mean cosine between narrations at the fusion input: [CLS] %.3f, mean-pooled %.3f" % cls_spread(batches))
    clips = heldout_clips(cfg.data.egomcq)
    tokens = video_tokens(base, cfg, clips, torch.device("cpu"))
    pairs = heldout_pairs(clips)
    print(f"{'candidate':24s} {'VTM loss':>9s} {'held-out acc %':>15s} {'match':>6s} {'same v.':>8s} {'other v.':>9s}")
    for name in args.candidates:
        pooling, lr_factor, hard = CANDIDATES[name]
        model = copy.deepcopy(base)
        model.config.text.fusion_pooling = model.fusion.pooling = pooling
        loss = fine_tune(model, batches, args.steps, cfg.train.lr * lr_factor, hard)
        acc = vtm_accuracy(model, pairs, tokens)
        print(f"{name:24s} {loss:9.3f} {acc['accuracy']:15.1f} {acc['match']['accuracy']:6.1f} "
              f"{acc['same video']['accuracy']:8.1f} {acc['other video']['accuracy']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
