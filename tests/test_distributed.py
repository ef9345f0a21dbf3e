"""Processes under torchrun: all-gathers with and without gradient, decisions made once on rank 0."""

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from svitt_ego.distributed import all_gather_no_grad, all_gather_with_grad
from svitt_ego.losses import ego_nce


def test_all_gather_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x
    assert all_gather_no_grad(x) is x


GLOBAL_BATCH = 4


def egonce_step(rank, world_size):
    """EgoNCE on linear-layer embeddings of this rank's slice, gathered; grads averaged like DDP."""
    torch.manual_seed(0)
    video_proj, text_proj = torch.nn.Linear(6, 3), torch.nn.Linear(5, 3)
    log_temperature = torch.nn.Parameter(torch.tensor(math.log(0.2)))
    params = [*video_proj.parameters(), *text_proj.parameters(), log_temperature]
    video_in, text_in = torch.randn(GLOBAL_BATCH, 6), torch.randn(GLOBAL_BATCH, 5)
    tags = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])

    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    video = all_gather_with_grad(video_proj(video_in[local]))
    text = all_gather_with_grad(text_proj(text_in[local]))
    all_tags = all_gather_no_grad(tags[local]).float()
    loss = ego_nce(video, text, all_tags @ all_tags.T > 0, log_temperature.exp())
    loss.backward()
    grads = [p.grad for p in params]
    if world_size > 1:
        for g in grads:
            dist.all_reduce(g)
            g /= world_size
    return loss.detach(), grads


def _distributed_worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss, grads = egonce_step(rank, world_size)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out_file)
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_all_gather_with_grad_matches_single_process(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2)
    two_procs = torch.load(out_file)
    loss, grads = egonce_step(rank=0, world_size=1)
    torch.testing.assert_close(two_procs["loss"], loss)
    for got, expected in zip(two_procs["grads"], grads):
        torch.testing.assert_close(got, expected)


def _decision_worker(rank, world_size, init_file, folder):
    from pathlib import Path

    from svitt_ego.checkpoint import CheckpointError, Checkpointer
    from svitt_ego.config import Config
    from svitt_ego.distributed import decide_on_main

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        folder = Path(folder)
        # Only rank 0 "sees" the file; every rank must take rank 0's branch.
        seen = decide_on_main(lambda: rank == 0)
        # Rank 0 cannot write (a file stands where the run folder's parent should be): every rank learns it
        # instead of waiting in the next collective.
        try:
            Checkpointer(folder / "not-a-folder" / "run", 2, {"model": torch.nn.Linear(1, 1)}).save("step-1.pt", {}, Config())
            outcome = "saved"
        except CheckpointError as err:
            outcome = str(err)
        (folder / f"rank{rank}.txt").write_text(f"{seen}\n{outcome}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank_0_decides_and_a_failed_checkpoint_stops_every_rank(tmp_path):
    (tmp_path / "not-a-folder").write_text("a file, so that no checkpoint can be written below it")
    context = mp.spawn(_decision_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):  # True once both ranks have ended
        if time.monotonic() > deadline:
            pytest.fail("a rank is still waiting: the ranks went out of step")
    for rank in range(2):
        seen, outcome = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert seen == "True" and "step-1.pt: could not write (" in outcome


def _full_disk_worker(rank, world_size, init_file, folder):
    import datetime
    from pathlib import Path

    from svitt_ego import checkpoint
    from svitt_ego.atomic import atomic_write
    from svitt_ego.config import Config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        folder = Path(folder)
        if rank == 0:  # only rank 0 writes, and its disk is full: torch.save into the file raises RuntimeError
            def disk_full(tmp):
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

            checkpoint.save_checkpoint = lambda path, state: atomic_write(path, disk_full)
        try:
            checkpointer = checkpoint.Checkpointer(folder / "run", 2, {"model": torch.nn.Linear(1, 1)})
            checkpointer.save("step-1.pt", {}, Config())
            outcome = "saved"
        except Exception as err:  # noqa: BLE001 - whatever each rank sees is the outcome
            outcome = f"{type(err).__name__}: {err}"
        (folder / f"rank{rank}.txt").write_text(outcome)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_full_disk_on_rank_0_stops_every_rank_with_the_same_checkpoint_error(tmp_path):
    context = mp.spawn(_full_disk_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            if context.join(timeout=5):
                break
        except mp.ProcessRaisedException:  # a rank's error escaped: the outcome files tell which
            break
        if time.monotonic() > deadline:
            pytest.fail("a rank is still waiting: the ranks went out of step")
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() if (tmp_path / f"rank{rank}.txt").exists() else None
                for rank in range(2)]
    expected = (f"CheckpointError: {tmp_path / 'run' / 'step-1.pt'}: could not write (PytorchStreamWriter failed "
                "writing file data/0: file write failed)")
    assert outcomes == [expected, expected]


def _egomcq_worker(rank, world_size, init_file, cfg_path, out_file):
    from svitt_ego.config import load_config
    from svitt_ego.eval.egomcq import evaluate_egomcq
    from svitt_ego.models import SViTTEgo

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        cfg = load_config(cfg_path)
        result = evaluate_egomcq(SViTTEgo(cfg.model), cfg, torch.device("cpu"))
        torch.save(result, f"{out_file}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_egomcq_with_a_rank_that_has_no_questions(tmp_path, video_root):
    """One question, two ranks: rank 1 evaluates nothing and both get the one-process result."""
    from helpers import FRAMES, SMALL_MODEL, mcq_question, write_egomcq

    from svitt_ego.config import load_config
    from svitt_ego.eval.egomcq import evaluate_egomcq
    from svitt_ego.models import SViTTEgo

    egomcq = write_egomcq(tmp_path / "egomcq.json", {"0": mcq_question(1, 1)})
    cfg = load_config("tiny", [*SMALL_MODEL, f"model.vision.num_frames={FRAMES}", f"data.video_root={video_root}",
                               "data.chunk_seconds=2.0", "data.num_workers=0", f"data.egomcq={egomcq}"])
    cfg.save(tmp_path / "config.yaml")
    mp.spawn(_egomcq_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "config.yaml"), str(tmp_path / "out")),
             nprocs=2)
    torch.manual_seed(0)
    expected = evaluate_egomcq(SViTTEgo(cfg.model), cfg, torch.device("cpu"))
    assert expected["num_inter"] == 1
    for rank in range(2):
        assert torch.load(tmp_path / f"out.{rank}") == expected
