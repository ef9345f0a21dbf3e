"""train.shard_optimizer on 2 gloo processes: the same steps as without it, one checkpoint file either way,
exact resumes with the setting toggled, and a sharded checkpoint resumed by one process."""

import copy
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SMALL_MODEL, objective_batch, toy_config

from svitt_ego import train
from svitt_ego.checkpoint import load_checkpoint
from svitt_ego.config import ConfigError, load_config
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.data.toy import make_toy_data
from svitt_ego.models import SViTTEgo
from svitt_ego.objective import PretrainingObjective
from svitt_ego.sharding import ShardedAdamW, shard_sizes

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

# Accumulation and clipping (to a norm small enough to clip) on the way, as a real run takes them.
STEPS = ["train.grad_accum=2", "train.grad_clip=0.05", "train.lr=1e-3"]
RUN = [*STEPS, "train.max_steps=4", "train.checkpoint_every=2", "train.epochs=2"]


class Killed(Exception):
    """Stands for a kill right after a checkpoint: what survives is the folder."""


# --------------------------------------------------------------------------- in the two processes


def _three_steps(rank: int, shard: bool, scaled: bool) -> dict:
    """Three optimizer steps (six batches, each rank its own) through the trainer's own parts."""
    cfg = load_config("tiny", [*SMALL_MODEL, *STEPS, f"train.shard_optimizer={str(shard).lower()}"])
    torch.manual_seed(0)
    model = SViTTEgo(cfg.model)
    objective = PretrainingObjective(model, cfg, load_tokenizer(cfg.model.text))
    objective = torch.nn.parallel.DistributedDataParallel(objective)
    optimizer, scheduler, scaler = train.build_optimizer(model, cfg, torch.device("cpu"), 3, 3)
    if scaled:  # fp16's path on a GPU: unscale the gradients, clip, step unless they overflowed
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.manual_seed(1 + rank)
    for i in range(6):
        train.optimizer_step(objective, optimizer, scaler, scheduler, objective_batch(2, 10 * i + rank), cfg,
                             accumulate=i % 2 == 0)
    whole = optimizer.full_state_dict() if shard else optimizer.state_dict()
    local = optimizer.optim.state if shard else optimizer.state
    return {"type": type(optimizer).__name__, "optimizer": whole,
            "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state_numel": sum(v.numel() for s in local.values() for k, v in s.items() if k != "step"),
            "predicted_share": shard_sizes(train.parameter_groups(model, 0.02), 2)[rank]}


def _load_into_sharded(whole: dict) -> dict:
    """A sharded optimizer given an unsharded one's state: what each rank keeps, and the state gathered again."""
    cfg = load_config("tiny", [*SMALL_MODEL, *STEPS, "train.shard_optimizer=true"])
    optimizer, _, _ = train.build_optimizer(SViTTEgo(cfg.model), cfg, torch.device("cpu"), 3, 3)
    optimizer.load_state_dict(copy.deepcopy(whole))  # it writes into what it is given
    return {"wrapper_state": len(optimizer.state), "shares": len(optimizer.optim.state),
            "optimizer": optimizer.full_state_dict()}


def _pretrain(toy, out, shard: bool, resume: bool = False, kill_at: int | None = None) -> None:
    save = train.save_state

    def save_then_die(run, state):
        save(run, state)
        if state.step == kill_at:
            raise Killed

    train.save_state = save_then_die
    try:
        train.pretrain(toy_config(toy, out, *RUN, f"train.shard_optimizer={str(shard).lower()}"), resume=resume)
    except Killed:
        pass
    finally:
        train.save_state = save


def _worker(rank, world_size, init_file, toy, folder):
    from pathlib import Path

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        folder = Path(folder)
        steps = {f"{shard}-{scaled}": _three_steps(rank, shard, scaled) for shard in (False, True)
                 for scaled in (False, True)}
        torch.save(steps, folder / f"steps.{rank}.pt")
        torch.save(_load_into_sharded(steps["False-False"]["optimizer"]), folder / f"loaded.{rank}.pt")
        _pretrain(toy, folder / "whole", shard=False)
        _pretrain(toy, folder / "sharded-then-not", shard=True, kill_at=2)
        _pretrain(toy, folder / "sharded-then-not", shard=False, resume=True)
        _pretrain(toy, folder / "not-then-sharded", shard=False, kill_at=2)
        _pretrain(toy, folder / "not-then-sharded", shard=True, resume=True)
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy"), seed=1, num_videos=3)


@pytest.fixture(scope="module")
def two_ranks(toy, tmp_path_factory):
    """The folder the two processes wrote: ``steps.<rank>.pt`` and three pretraining runs."""
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=(2, str(folder / "init"), str(toy), str(folder)), nprocs=2)
    return folder


def assert_same(a, b, atol=0.0, where="") -> None:
    """Nested dicts / lists of tensors and plain values: equal (tensors within ``atol``)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], atol, f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and (a - b).abs().max() <= atol, where
    else:
        assert a == b, where


@pytest.mark.parametrize("scaled", [False, True])
def test_three_sharded_steps_equal_three_unsharded_ones(two_ranks, scaled):
    ranks = [torch.load(two_ranks / f"steps.{rank}.pt") for rank in range(2)]
    plain, sharded = ranks[0][f"False-{scaled}"], ranks[0][f"True-{scaled}"]
    assert (plain["type"], sharded["type"]) == ("AdamW", "ShardedAdamW")
    assert_same(sharded["parameters"], plain["parameters"], atol=1e-6)
    assert_same(ranks[1][f"True-{scaled}"]["parameters"], sharded["parameters"])  # broadcast to every rank
    # Gathered on rank 0, the state is an unsharded AdamW's state_dict, so it loads on any world size.
    assert_same(sharded["optimizer"], plain["optimizer"], atol=1e-6)
    assert ranks[1][f"True-{scaled}"]["optimizer"] is None
    # Each rank keeps a share of the state (two moments an element): together the whole, neither more
    # than 60% of it, each as shard_sizes predicts.
    whole, shares = plain["state_numel"], [r[f"True-{scaled}"]["state_numel"] for r in ranks]
    assert sum(shares) == whole and max(shares) <= 0.6 * whole
    assert shares == [2 * r[f"True-{scaled}"]["predicted_share"] for r in ranks]


def test_an_unsharded_state_loads_into_a_sharded_optimizer_each_rank_keeping_its_share(two_ranks):
    plain = torch.load(two_ranks / "steps.0.pt")["False-False"]["optimizer"]
    loaded = [torch.load(two_ranks / f"loaded.{rank}.pt") for rank in range(2)]
    assert_same(loaded[0]["optimizer"], plain)
    shares = [r["shares"] for r in loaded]
    assert sum(shares) == len(plain["state"]) and min(shares) > 0
    assert [r["wrapper_state"] for r in loaded] == [0, 0]  # no second copy of the loaded state


@pytest.mark.parametrize("run", ["sharded-then-not", "not-then-sharded"])
def test_a_killed_run_resumes_exactly_with_the_setting_toggled(two_ranks, run):
    whole, resumed = (load_checkpoint(two_ranks / name / "last.pt") for name in ("whole", run))
    assert whole["step"] == resumed["step"] == 4 and resumed["config"]["train"]["shard_optimizer"] == (run[0] == "n")
    for key in ("model", "optimizer", "scheduler", "rng"):
        assert_same(resumed[key], whole[key], where=key)
    # The sharded run's checkpoint before the kill: one file, the same as the unsharded run's.
    sharded_step_2 = load_checkpoint(two_ranks / "sharded-then-not" / "step-2.pt")
    assert sharded_step_2["config"]["train"]["shard_optimizer"]
    for key in ("model", "optimizer"):
        assert_same(sharded_step_2[key], load_checkpoint(two_ranks / "whole" / "step-2.pt")[key], where=key)


def test_a_sharded_checkpoint_resumes_in_one_process(two_ranks, toy, tmp_path, caplog):
    (tmp_path / "run").mkdir()
    shutil.copy(two_ranks / "sharded-then-not" / "step-2.pt", tmp_path / "run" / "last.pt")
    cfg = toy_config(toy, tmp_path / "run", *RUN, "train.shard_optimizer=true")
    with pytest.raises(ConfigError, match=r"last\.pt was saved with other settings: world size 2 -> 1; "):
        train.pretrain(cfg, resume=True)
    with caplog.at_level("WARNING"):
        train.pretrain(cfg, resume=True, allow_config_change=True)
    assert "changed settings (allowed): world size 2 -> 1" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


def test_one_process_ignores_the_setting():
    cfg = load_config("tiny", [*SMALL_MODEL, "train.shard_optimizer=true"])
    optimizer, _, _ = train.build_optimizer(SViTTEgo(cfg.model), cfg, torch.device("cpu"), 3, 3)
    assert type(optimizer) is torch.optim.AdamW and not isinstance(optimizer, ShardedAdamW)
    with pytest.raises(ConfigError, match=r"^train\.shard_optimizer: expected bool, got 'yes please'$"):
        load_config("tiny", ["train.shard_optimizer=yes please"])
