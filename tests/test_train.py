"""The training loop's parts: schedule, parameter groups, the objective, optimizer_step, DDP equivalence."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import SMALL_MODEL
from helpers import objective_batch as _batch

from svitt_ego.config import load_config
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.models import SViTTEgo
from svitt_ego.objective import PretrainingObjective
from svitt_ego.train import NonFiniteStep, cosine_schedule, optimizer_step, parameter_groups

SMALL = [*SMALL_MODEL, "model.vision.drop_path=0.0"]


def test_cosine_schedule_by_hand():
    assert cosine_schedule(0, 100, 10, 0.01) == pytest.approx(0.1)
    assert cosine_schedule(9, 100, 10, 0.01) == pytest.approx(1.0)
    assert cosine_schedule(10, 100, 10, 0.01) == pytest.approx(1.0)
    assert cosine_schedule(55, 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cosine_schedule(100, 100, 10, 0.01) == pytest.approx(0.01)


def test_no_weight_decay_on_biases_norms_and_tables():
    model = SViTTEgo(load_config("tiny", SMALL).model)
    decay, no_decay = parameter_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "visual.blocks.0.attn.rel_pos_bias.table" in no_decay_names
    assert "visual.blocks.0.norm1.weight" in no_decay_names and "temp" in no_decay_names
    assert "visual.blocks.0.attn.q_bias" in no_decay_names and "visual.cls_token" in no_decay_names
    assert {names[id(p)] for p in decay["params"]} >= {"visual.blocks.0.attn.qkv.weight", "text_proj.weight"}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0


def _objective(overrides=()):
    torch.manual_seed(0)
    cfg = load_config("tiny", [*SMALL, *overrides])
    model = SViTTEgo(cfg.model).eval()  # eval: no dropout, fixed block pattern -> comparable across splits
    return PretrainingObjective(model, cfg, load_tokenizer(cfg.model.text))


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_vtm_negatives_are_drawn_from_the_similarities_or_uniformly(negatives, monkeypatch):
    import svitt_ego.objective as objective_module

    seen = []
    sample = objective_module.sample_vtm_negatives
    monkeypatch.setattr(objective_module, "sample_vtm_negatives", lambda sim, pos: seen.append(sim) or sample(sim, pos))
    objective = _objective([f"loss.vtm_negatives={negatives}"])
    batch = _batch(6, 0)
    objective(batch)
    m = objective.model
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sim = (m.encode_video(batch["frames"]) @ m.encode_text(ids, mask).T / m.temperature)
    torch.testing.assert_close(seen[0], sim if negatives == "hard" else torch.zeros_like(sim))


def test_objective_gives_finite_losses_and_gradients_everywhere():
    objective = _objective()
    losses = objective(_batch(6, 0))
    assert set(losses) == {"loss", "contrastive", "vtm", "mlm"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_word_embeddings_get_no_gradient_and_no_optimizer_state(frozen):
    objective = _objective([f"model.text.freeze_word_embeddings={str(frozen).lower()}"])
    model = objective.model
    word = model.text.embeddings.word_embeddings.weight
    in_groups = any(p is word for group in parameter_groups(model, 0.02) for p in group["params"])
    objective(_batch(6, 0))["loss"].backward()
    assert in_groups is not frozen and (word.grad is None) is frozen
    assert ("trainable" in model.describe()) is frozen
    assert model.mlm_head.bias.grad is not None and model.text.embeddings.position_embeddings.weight.grad is not None


def test_model_names_its_no_weight_decay_parameters():
    model = SViTTEgo(load_config("tiny", SMALL).model)
    names = model.no_weight_decay()
    assert "visual.cls_token" in names and "visual.blocks.1.attn.rel_pos_bias.table" in names
    parameters = dict(model.named_parameters())
    assert names <= set(parameters) and all(parameters[n].ndim >= 2 for n in names)


def test_nan_embeddings_give_a_non_finite_loss_not_a_crash():
    objective = _objective()
    batch = _batch(6, 0)
    batch["frames"][2] = float("nan")  # what an fp16 overflow in the video encoder produces
    losses = objective(batch)
    assert not torch.isfinite(losses["loss"])


def _step_parts(overrides=()):
    objective = _objective(overrides)
    cfg = load_config("tiny", [*SMALL, *overrides])
    optimizer = torch.optim.AdamW(parameter_groups(objective.model, 0.02), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return objective, optimizer, torch.amp.GradScaler("cuda", enabled=False), scheduler, cfg


def _parameters(objective):
    return {n: p.detach().clone() for n, p in objective.named_parameters()}


def test_optimizer_step_updates_and_accumulates():
    objective, optimizer, scaler, scheduler, cfg = _step_parts(["train.grad_accum=2"])
    before = _parameters(objective)
    losses = optimizer_step(objective, optimizer, scaler, scheduler, _batch(4, 0), cfg, accumulate=True)
    assert set(losses) == {"loss", "contrastive", "vtm", "mlm"} and not losses["loss"].requires_grad
    assert all(torch.equal(p, before[n]) for n, p in objective.named_parameters())  # accumulated, not stepped
    optimizer_step(objective, optimizer, scaler, scheduler, _batch(4, 1), cfg)
    assert scheduler.last_epoch == 1 and not torch.equal(objective.model.text_proj.weight, before["model.text_proj.weight"])
    assert all(p.grad is None for p in objective.parameters())


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_optimizer_step_skips_non_finite_values(what):
    objective, optimizer, scaler, scheduler, cfg = _step_parts()
    before = _parameters(objective)
    if what == "loss":
        batch = _batch(4, 0)
        batch["frames"][0] = float("nan")
    else:  # a finite loss whose backward overflows
        batch = _batch(4, 0)
        objective.model.vtm_head.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteStep, match=what):
        optimizer_step(objective, optimizer, scaler, scheduler, batch, cfg)
    assert all(torch.equal(p, before[n]) for n, p in objective.named_parameters())
    assert all(p.grad is None for p in objective.parameters()) and scheduler.last_epoch == 0


ONLY_CONTRASTIVE = ["loss.vtm_weight=0", "loss.mlm_weight=0"]


def _ddp_worker(rank, world_size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    objective = _objective(ONLY_CONTRASTIVE)
    ddp = torch.nn.parallel.DistributedDataParallel(objective)
    full = _batch(4, 1)
    part = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
    loss = ddp(part)["loss"]
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in objective.named_parameters()}}, out)
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()


def test_two_processes_of_two_equal_one_process_of_four(tmp_path):
    """EgoNCE over the all-gathered batch: same loss and (DDP-averaged) gradients as one process."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    ddp = torch.load(out)
    objective = _objective(ONLY_CONTRASTIVE)
    loss = objective(_batch(4, 1))["loss"]
    loss.backward()
    assert torch.allclose(ddp["loss"], loss, atol=1e-6)
    checked = 0
    for name, p in objective.named_parameters():
        if p.grad is None or p.grad.abs().max() == 0:
            continue
        # float32 sums in another order: the error scales with the tensor's largest entry
        assert (ddp["grads"][name] - p.grad).abs().max() <= 1e-6 + 1e-5 * p.grad.abs().max(), name
        checked += 1
    assert checked > 20
