"""The memory planner: hand-worked bytes, CUDA's autocast policy, the tiny preset, the batch search, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_benchmark
from torch import nn

from svitt_ego import memory
from svitt_ego.cli import main
from svitt_ego.config import ConfigError
from svitt_ego.memory_engine import StepParts, _CastCache, block_bytes, cuda_autocast, measure_step
from svitt_ego.sharding import shard_sizes

MB = 1000 * 1000 * 4  # a 1000 x 1000 fp32 weight


def test_block_bytes_rounds_as_the_cuda_allocator():
    assert [block_bytes(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, 4096]


def test_cuda_autocast_policy_not_cpus():
    """Matrix products in fp16; layer norm, softmax and sums in fp32 (CPU autocast keeps those in fp16)."""
    x, w = torch.randn(4, 8, dtype=torch.float16), torch.randn(8, 8)
    with cuda_autocast(_CastCache()), torch.autocast("cpu", dtype=torch.float16):
        assert (x.float() @ w).dtype == torch.float16
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
        assert x.softmax(-1).dtype == torch.float32
        assert x.sum().dtype == torch.float32
        assert torch.cat([x, x.float()]).dtype == torch.float32  # not on CUDA's lists: as it is
    with torch.autocast("cpu", dtype=torch.float16):  # the registrations are gone again
        assert x.softmax(-1).dtype == torch.float16


def _linear_step(dtype):
    with torch.device("meta"):
        model = nn.Linear(1000, 1000)

    def build(context):
        model.to_empty(device="cpu")
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        x = torch.zeros(64, 1000)

        def step():
            with context.forward_autocast(dtype):
                loss = model(x).float().sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return StepParts(model, optimizer, [x], step)

    return measure_step(build, (0, 0))


def test_hand_worked_linear_step():
    """nn.Linear(1000, 1000), fused AdamW, fp16 autocast, 64 rows: every part worked out by hand."""
    step = _linear_step(torch.float16)
    weight, bias = block_bytes(MB), block_bytes(4000)  # 4000256 and 4096 bytes
    assert step.parts["parameters"] == weight + bias
    # exp_avg and exp_avg_sq of each parameter, and each parameter's fp32 step count (one block each).
    assert step.parts["optimizer state"] == 2 * (weight + bias) + 2 * 512
    assert step.parts["inputs"] == block_bytes(64 * 1000 * 4)
    # addmm keeps the fp16 input [64, 1000] for the weight's gradient; the fp16 weight is a weight copy.
    assert step.saved_bytes == 64 * 1000 * 2
    assert step.peak_bytes == sum(step.parts.values())
    assert step.flops == 2 * 2 * 64 * 1000 * 1000  # forward and the weight gradient (the input needs none)


def test_hand_worked_gradients_in_fp32():
    """In fp32 the input itself is kept (no copy); the peak comes as the last gradient is made: parameters,
    optimizer state, input, both gradients (not yet handed over), the loss and its seed gradient."""
    step = _linear_step(None)
    weight, bias = block_bytes(MB), block_bytes(4000)
    assert step.parts["autocast weight copies"] == 0 and step.saved_bytes == 0
    assert step.where == "backward"
    # parameters + two state tensors + gradient, each (weight + bias); two step counts; the loss and its seed
    assert step.peak_bytes == 4 * (weight + bias) + 2 * 512 + block_bytes(64 * 1000 * 4) + 2 * 512


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = memory.load_plan_config("tiny", ["train.batch_size=2", "train.precision=fp16"])
    return cfg, memory.plan_memory(cfg)


def test_tiny_preset_plan(tiny_plan):
    cfg, plan = tiny_plan
    with torch.device("meta"):
        model = memory.SViTTEgo(cfg.model)
    params = [p for p in model.parameters()]
    assert plan.parts["parameters"] == sum(block_bytes(t.numel() * t.element_size())
                                           for t in [*params, *model.buffers()])
    trained = sum(block_bytes(p.numel() * 4) for p in params if p.requires_grad)
    assert plan.parts["optimizer state"] == 2 * trained + 512 * sum(p.requires_grad for p in params)
    assert plan.parts["autocast weight copies"] > 0 and plan.parts["activations kept for backward"] > 0
    assert plan.peak_bytes == sum(plan.parts.values()) and plan.clips == 4
    assert 0 < plan.video_flops_per_clip < plan.dense_flops_per_clip < plan.flops_per_clip


def test_world_size_keeps_gradients_in_ddp_buckets_and_shards_the_optimizer(tiny_plan):
    """Under torchrun every trained parameter's gradient is in DDP's buckets all along; sharding keeps the
    largest share of ZeroRedundancyOptimizer's partition (two fp32 moments an element)."""
    cfg, plan = tiny_plan
    model = _meta_model(cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    parts = dict(plan.parts)
    peak8, _ = memory._distributed(cfg, parts, plan.peak_bytes, 8, model, [])
    assert parts["gradients"] == sum(block_bytes(p.numel() * 4) for p in trained)
    assert peak8 == plan.peak_bytes - plan.parts["gradients"] + parts["gradients"]
    sharded, parts8 = memory._with(cfg, "train", shard_optimizer=True), dict(plan.parts)
    peak8s, notes = memory._distributed(sharded, parts8, plan.peak_bytes, 8, model, [])
    share = max(shard_sizes(memory.parameter_groups(model, cfg.train.weight_decay), 8))
    assert parts8["optimizer state"] == 8 * share < plan.parts["optimizer state"] / 4
    assert peak8s == peak8 - plan.parts["optimizer state"] + 8 * share and len(notes) == 2


def _meta_model(cfg):
    with torch.device("meta"):
        return memory.SViTTEgo(cfg.model)


def test_largest_batch_search_monotonic(monkeypatch):
    """Against a slightly convex memory curve: the search finds exactly the largest fitting batch."""
    calls = []

    def plan(cfg, world_size=1, flops=True):
        calls.append(cfg.train.batch_size)
        b = cfg.train.batch_size
        return type("P", (), {"needed_bytes": lambda self: 2e9 + 0.5e9 * b + 0.004e9 * b * b})()

    monkeypatch.setattr(memory, "plan_memory", plan)
    cfg = memory.load_plan_config("tiny", [])
    answers = [memory.largest_batch(cfg, int(g * 1e9)) for g in (1, 2.6, 5, 12, 24, 80)]
    brute = [max([b for b in range(1, 500) if 2e9 + 0.5e9 * b + 0.004e9 * b * b <= g * 1e9], default=0)
             for g in (1, 2.6, 5, 12, 24, 80)]
    assert answers == brute and answers == sorted(answers) and answers[0] == 0


@pytest.mark.parametrize("text,expected", [("12GB", 12 * 10**9), ("11.5GiB", int(11.5 * 2**30)),
                                           ("24000MiB", 24000 * 2**20), ("12", 12 * 2**30)])
def test_parse_memory(text, expected):
    assert memory.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "-3GB", "0GB", "GB", "1e3GB"])
def test_parse_memory_refuses(text):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        memory.parse_memory(text)


def test_triton_without_its_operator_is_one_line(monkeypatch):
    monkeypatch.setattr(memory, "kernel_operator_registered", lambda: False)
    cfg = memory.load_plan_config("tiny", ["model.vision.backend=triton"])
    with pytest.raises(ConfigError, match="not registered as a PyTorch operator"):
        memory.planning_backend(cfg)
    auto = memory.load_plan_config("tiny", ["model.vision.backend=auto", "train.precision=fp16"])
    assert memory.planning_backend(auto)[0] == "blocked"
    monkeypatch.setattr(memory, "kernel_operator_registered", lambda: True)
    assert memory.planning_backend(auto)[0] == "triton"
    fp32 = memory.load_plan_config("tiny", ["model.vision.backend=auto", "train.precision=fp32"])
    assert memory.planning_backend(fp32)[0] == "blocked"  # as the GPU's auto: the kernel takes fp16 / bf16


def test_cli_json(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan-memory", "--config", "tiny", "train.batch_size=1", "--json", "--gpu-memory", "1.5GiB",
                 "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert report["largest_batch"] >= 1 and report["peak_gib"] == pytest.approx(sum(report["parts"].values()))
    assert set(report["parts"]) >= {"parameters", "gradients", "optimizer state", "autocast weight copies",
                                    "activations kept for backward", "transient"}


@pytest.mark.parametrize("args,message", [
    (["--config", "no_such_preset"], "no_such_preset"),
    (["--config", "tiny", "train.batch_size=-2"], "train.batch_size"),
    (["--config", "tiny", "train.batch_size=100000"], "train.batch_size"),
    (["--config", "tiny", "--gpu-memory", "12XB"], "--gpu-memory"),
    (["--config", "tiny", "--world-size", "0"], "--world-size")])
def test_cli_bad_input_is_one_line(args, message, capsys):
    assert main(["plan-memory", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_gpu_check_compares_the_last_runs_predictions_with_its_measurements(tmp_path):
    """The GPU check's last part: each prediction of the last check beside train_step.py's peak of the same run."""
    results = tmp_path / "gpu_results.jsonl"
    rows = [{"part": "start"}, {"part": "memory_plan", "run": "svitt_ego_kr3:4", "predicted_gib": 9.0, "backend": "b"},
            {"part": "start"}, {"part": "memory_plan", "run": "svitt_ego_kr3:4", "predicted_gib": 6.0, "backend": "t"},
            {"part": "memory_plan", "run": "svitt_ego_kr3:16", "error": "RuntimeError: x"},
            {"part": "train_step", "run": "svitt_ego_kr3:4", "peak_gb": 2**30 * 5 / 1e9},
            {"part": "train_step", "run": "dense:4", "peak_gb": 15.0}]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_benchmark("memory_calibration").compare(str(results))
    added = [json.loads(line) for line in results.read_text().splitlines()][len(rows):]
    assert added == [{"part": "memory_check", "run": "svitt_ego_kr3:4", "backend": "t", "predicted_gib": 6.0,
                      "measured_gib": pytest.approx(5.0), "error": pytest.approx(0.2)}]
