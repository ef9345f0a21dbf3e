"""Pretraining: EgoNCE (or InfoNCE) + VTM + MLM on EgoClip, one process or many under torchrun.

The loop, in order: set up the process group and device, build the model
(from the BEiT / BERT folders the config names), the data, AdamW with a cosine
schedule; resume from the last checkpoint if asked; then for every batch run
:class:`PretrainingObjective`, step the optimizer every ``grad_accum`` batches,
log, checkpoint every ``checkpoint_every`` steps and at the end of each epoch,
and evaluate on EgoMCQ after each epoch.

Resuming is exact: a checkpoint holds the model, optimizer, gradient scaler,
scheduler, step, epoch, how many batches of the epoch were consumed and the
RNG states; the data order of an epoch is a function of (seed, epoch) and each
clip's randomness of (seed, epoch, index), so the resumed run sees the same
batches in the same state as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from svitt_ego.config import Config
from svitt_ego.data.dataset import EgoClipDataset, collate_egoclip, epoch_indices
from svitt_ego.data.egoclip import action_positive_mask
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.losses import (IGNORE_INDEX, all_gather_no_grad, all_gather_with_grad, ego_nce, mask_tokens,
                              mlm_loss, sample_vtm_negatives, vtm_loss)
from svitt_ego.models import SViTTEgo, create_model

log = logging.getLogger(__name__)


class PretrainingObjective(nn.Module):
    """The model plus its three objectives; ``forward(batch)`` returns the losses.

    Wrapping the objective (not only the model) in DDP makes every parameter's
    gradient flow through one ``forward`` call, as DDP expects.
    """

    def __init__(self, model: SViTTEgo, cfg: Config, tokenizer):
        super().__init__()
        self.model = model
        self.loss_cfg = cfg.loss
        self.mask_token_id = tokenizer.mask_token_id
        self.special_ids = list(tokenizer.all_special_ids)
        self.vocab_size = cfg.model.text.vocab_size

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, cfg = self.model, self.loss_cfg
        ids, mask = batch["input_ids"], batch["attention_mask"]
        video = m.forward_video(batch["frames"])
        text_hidden = m.forward_text(ids, mask)
        video_emb, text_emb = m.video_embedding(video), m.text_embedding(text_hidden, mask)

        # Contrastive, over the global batch: embeddings and tags from every process.
        if cfg.contrastive == "egonce":
            positives = action_positive_mask(gather_tags(batch["nouns"]), gather_tags(batch["verbs"]))
        else:
            positives = None
        contrastive = ego_nce(all_gather_with_grad(video_emb), all_gather_with_grad(text_emb), positives,
                              m.temperature)

        # VTM, on the local batch: each video with its text, a hard negative text, and each text with a hard
        # negative video; positives (action-aware with EgoNCE) are never drawn as negatives.
        n = ids.shape[0]
        first = dist.get_rank() * n if dist.is_initialized() else 0
        local_positives = positives[first:first + n, first:first + n] if positives is not None else None
        with torch.no_grad():
            sim = video_emb @ text_emb.T / m.temperature
        neg_text, neg_video = sample_vtm_negatives(sim, local_positives)
        logits = m.vtm_logits(torch.cat([text_hidden, text_hidden[neg_text], text_hidden]),
                              torch.cat([mask, mask[neg_text], mask]),
                              torch.cat([video.tokens, video.tokens, video.tokens[neg_video]]))
        vtm = vtm_loss(logits, n)

        # MLM: masked text through the text layers, then the fusion layers with the video.
        masked_ids, labels = mask_tokens(ids, mask, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                         special_token_ids=self.special_ids, probability=cfg.mlm_probability)
        selected = labels != IGNORE_INDEX
        mlm_logits = m.mlm_logits(masked_ids, mask, video.tokens, select=selected)
        mlm = mlm_loss(mlm_logits, labels[selected])

        loss = cfg.contrastive_weight * contrastive + cfg.vtm_weight * vtm + cfg.mlm_weight * mlm
        return {"loss": loss, "contrastive": contrastive.detach(), "vtm": vtm.detach(), "mlm": mlm.detach()}


def gather_tags(tags: torch.Tensor) -> torch.Tensor:
    """All processes' padded tag tensors, padded (-1) to the widest first so that they stack."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tags
    width = torch.tensor(tags.shape[1], device=tags.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    return all_gather_no_grad(F.pad(tags, (0, int(width) - tags.shape[1]), value=-1))


class EpochSampler(Sampler):
    """This process's share of an epoch (:func:`epoch_indices`), from batch ``start_batch`` on.

    Every process gets the same number of rows (the remainder is dropped), and
    the order depends only on (seed, epoch), so a resumed run continues exactly.
    """

    def __init__(self, num_rows: int, fraction: float, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.num_rows, self.fraction, self.seed = num_rows, fraction, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        per_rank = len(epoch_indices(num_rows, fraction, 0, seed)) // world_size
        self.batches_per_epoch = per_rank // batch_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        rows = epoch_indices(self.num_rows, self.fraction, epoch, self.seed)
        mine = rows[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]
        self._indices = mine[start_batch * self.batch_size:]

    def __iter__(self):
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, layer scales, tokens, bias tables and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(("bias", "cls_token", "rel_pos_bias.table")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``; the factor applied to the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- process and checkpoints


def setup_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; initialises the process group when run under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """fp16 or bf16 autocast on CUDA as ``train.precision`` says; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.precision)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def step_checkpoints(folder: Path) -> list[Path]:
    """``step-<N>.pt`` files, oldest first."""
    return sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


# --------------------------------------------------------------------------- the loop


def pretrain(cfg: Config, resume: bool = False) -> dict:
    """Pretrain with ``cfg``; returns the last EgoMCQ accuracies (empty without evaluation)."""
    from svitt_ego.evaluate import evaluate_egomcq

    rank, world_size, device = setup_distributed()
    main = rank == 0
    out = Path(cfg.train.output_dir)
    if not resume and (out / "last.pt").exists():
        raise FileExistsError(f"{out} already holds a run ({out / 'last.pt'}); pass --resume to continue it, "
                              "or choose another train.output_dir")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    tokenizer = load_tokenizer(cfg.model.text)
    model = create_model(cfg.model).to(device)
    objective = PretrainingObjective(model, cfg, tokenizer).to(device)
    wrapped = nn.parallel.DistributedDataParallel(objective) if world_size > 1 else objective

    dataset = EgoClipDataset(cfg, train=True)
    sampler = EpochSampler(len(dataset), cfg.data.fraction_per_epoch, cfg.train.seed, cfg.train.batch_size,
                           rank, world_size)
    batches_per_epoch = sampler.batches_per_epoch
    if batches_per_epoch < cfg.train.grad_accum:
        raise ValueError(f"{cfg.data.egoclip}: {len(dataset)} clips give {batches_per_epoch} batches of "
                         f"{cfg.train.batch_size} per process, fewer than train.grad_accum={cfg.train.grad_accum}")
    steps_per_epoch = batches_per_epoch // cfg.train.grad_accum
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas))
    warmup = round(cfg.train.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, total_steps, warmup, cfg.train.min_lr_ratio))
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step, epoch, start_batch, best, nonfinite = 0, 0, 0, -math.inf, 0
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        best, nonfinite = state["best"], state["nonfinite"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", out / "last.pt", step, epoch, start_batch)
    elif resume and main:
        log.info("no checkpoint in %s; starting afresh", out)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tensorboard")
    metrics_file = open(out / "metrics.jsonl", "a") if main else None

    def checkpoint(name: str, batch_in_epoch: int, at_epoch: int) -> None:
        states = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if not main:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "epoch": at_epoch, "batch_in_epoch": batch_in_epoch, "best": best, "nonfinite": nonfinite,
                 "rng": states, "config": cfg.to_dict()}
        save_checkpoint(out / name, state)
        save_checkpoint(out / "last.pt", state)
        for old in step_checkpoints(out)[:-cfg.train.keep_checkpoints]:
            old.unlink()

    collate = collate_egoclip(tokenizer, cfg.model.text.max_length)
    results: dict = {}
    model.train()
    while epoch < cfg.train.epochs and step < total_steps:
        sampler.set_epoch(epoch, start_batch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
        progress = tqdm(loader, desc=f"epoch {epoch}", disable=not main, dynamic_ncols=True,
                        initial=start_batch, total=batches_per_epoch)
        batch_in_epoch, tic, clips, skipped = start_batch, time.perf_counter(), 0, 0
        epoch_loss = []
        for batch in progress:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            boundary = (batch_in_epoch + 1) % cfg.train.grad_accum == 0
            batch_in_epoch += 1
            clips += batch["frames"].shape[0] * world_size
            skipped += batch["skipped"]
            with contextlib.nullcontext() if boundary or world_size == 1 else wrapped.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    losses = wrapped(batch)
                finite = torch.isfinite(losses["loss"]).float()
                if world_size > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item():
                    scaler.scale(losses["loss"] / cfg.train.grad_accum).backward()
            if not finite.item():
                nonfinite += 1
                log.error("non-finite loss at step %d (epoch %d, batch %d); clip ids %s; step skipped (%d of %d "
                          "allowed)", step, epoch, batch_in_epoch - 1, batch["clip_idx"].tolist(), nonfinite,
                          cfg.train.max_nonfinite)
                optimizer.zero_grad(set_to_none=True)
                if nonfinite > cfg.train.max_nonfinite:
                    raise RuntimeError(f"{nonfinite} non-finite losses, more than train.max_nonfinite="
                                       f"{cfg.train.max_nonfinite}; stopping")
                continue
            epoch_loss.append(losses["loss"].item())
            if not boundary:
                continue
            if cfg.train.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1

            if main and (step % cfg.train.log_every == 0 or step == 1):
                elapsed = time.perf_counter() - tic
                record = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                          "clips_per_s": clips / elapsed, "temperature": model.temperature.item(),
                          "skipped_clips": skipped,
                          **{k: v.item() for k, v in losses.items()}}
                if device.type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                     clips_s=f"{record['clips_per_s']:.1f}",
                                     **({"mem": f"{record['peak_mem_gb']:.1f}G"} if "peak_mem_gb" in record else {}))
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        writer.add_scalar(f"train/{key}", value, step)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                tic, clips, skipped = time.perf_counter(), 0, 0
            if step % cfg.train.checkpoint_every == 0:
                checkpoint(f"step-{step}.pt", batch_in_epoch, epoch)
            if step >= total_steps:
                break
        progress.close()

        finished_epoch = batch_in_epoch >= batches_per_epoch - batches_per_epoch % cfg.train.grad_accum
        if finished_epoch:
            epoch, start_batch = epoch + 1, 0
        else:
            start_batch = batch_in_epoch
        if finished_epoch and cfg.train.eval_every_epoch and Path(cfg.data.egomcq).exists():
            results = evaluate_egomcq(model, cfg, device, tokenizer)
            score = (results["inter"] + results["intra"]) / 2
            if main:
                record = {"step": step, "epoch": epoch, **{f"egomcq_{k}": v for k, v in results.items()}}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                writer.add_scalar("egomcq/inter", results["inter"], step)
                writer.add_scalar("egomcq/intra", results["intra"], step)
                log.info("epoch %d: EgoMCQ inter %.1f%%, intra %.1f%%", epoch, results["inter"], results["intra"])
        else:
            score = -float(np.mean(epoch_loss)) if epoch_loss else -math.inf
        improved = score > best
        best = max(best, score)
        checkpoint(f"step-{step}.pt", start_batch, epoch)
        if main and improved:
            shutil.copyfile(out / "last.pt", out / "best.pt.tmp")
            os.replace(out / "best.pt.tmp", out / "best.pt")

    if main:
        model.save_pretrained(out / "model")
        writer.close()
        metrics_file.close()
    if world_size > 1:
        dist.barrier()
    return results
