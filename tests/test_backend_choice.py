"""Which attention backend runs: ``auto`` takes the fused kernel only where it is meant to run and after
its self-check (a CUDA device simulated on the CPU), ``triton`` refuses loudly, rank 0 decides for all."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from svitt_ego.config import ConfigError, VisionConfig
from svitt_ego.models import attention
from svitt_ego.models.attention import blocked_attention, reference_attention, resolve_backend
from svitt_ego.models.video import VideoEncoder

CUDA = torch.device("cuda")
HALF = torch.float16


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(attention, "_fused_problems", {})


@pytest.fixture
def gpu(monkeypatch):
    """A simulated CUDA device of compute capability 9.0 whose self-checks run on the CPU, with a fused
    kernel that equals the reference. Returns the self-checks made, as (dtype, head dim, block size)."""
    checks, real = [], attention.self_check

    def on_cpu(backend, device, dtype, head_dim, block_size):
        checks.append((dtype, head_dim, block_size))
        return real(backend, torch.device("cpu"), dtype, head_dim, block_size)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "self_check", on_cpu)
    monkeypatch.setitem(attention.BACKENDS, "triton", lambda *args: reference_attention(*args))
    return checks


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_auto_off_cuda_is_blocked_without_a_check(gpu, caplog):
    assert resolve_backend("auto", torch.device("cpu"), HALF, 64, 8) is blocked_attention
    assert gpu == [] and warnings_of(caplog) == []
    assert resolve_backend("reference", CUDA, torch.float32, 64, 8) is reference_attention


def test_auto_takes_the_fused_kernel_after_one_self_check_per_dtype_and_head_dim(gpu, caplog):
    calls = [(HALF, 64), (HALF, 64), (torch.bfloat16, 64), (HALF, 32), (torch.bfloat16, 64)]
    for dtype, head_dim in calls:
        assert resolve_backend("auto", CUDA, dtype, head_dim, 8) is attention.BACKENDS["triton"]
    assert gpu == [(HALF, 64, 8), (torch.bfloat16, 64, 8), (HALF, 32, 8)]
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("capability,dtype,head_dim,reason", [
    ((7, 5), HALF, 64, "needs compute capability >= 8.0, this GPU has 7.5"),
    ((8, 0), torch.float32, 64, "runs fp16 / bf16 activations, not float32 (train.precision=fp16 or bf16)"),
    ((9, 0), torch.bfloat16, 256, "takes head dims up to 128, not 256"),
])
def test_where_the_kernel_is_not_meant_to_run_auto_warns_once_and_triton_refuses(
        gpu, caplog, monkeypatch, capability, dtype, head_dim, reason):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for _ in range(3):
        assert resolve_backend("auto", CUDA, dtype, head_dim, 8) is blocked_attention
    assert warnings_of(caplog) == [f"model.vision.backend=auto: the fused Triton kernel {reason}; "
                                   "using the blocked backend"]
    with pytest.raises(ConfigError, match=re.escape(f"model.vision.backend=triton: the fused Triton kernel {reason}; use")) as err:
        resolve_backend("triton", CUDA, dtype, head_dim, 8)
    assert err.value.key == "model.vision.backend"
    assert gpu == []  # decided without running the kernel


def _compile_error():
    from triton.compiler.errors import CompilationError

    return CompilationError("sparse_attention_triton.py", None, "tl.dot: incompatible shapes")


def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(262144, 232448, "shared memory")


@pytest.mark.parametrize("make_error,name", [(_compile_error, "CompilationError"),
                                             (_out_of_resources, "OutOfResources"),
                                             (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory"),
                                              "OutOfMemoryError")])
def test_a_kernel_that_fails_its_self_check_falls_back_to_blocked(gpu, caplog, monkeypatch, make_error, name):
    import triton  # noqa: F401 - the test extra installs it: missing, the test fails

    def failing(*args):
        raise make_error()

    monkeypatch.setitem(attention.BACKENDS, "triton", failing)
    assert resolve_backend("auto", CUDA, HALF, 64, 8) is blocked_attention
    assert resolve_backend("auto", CUDA, HALF, 64, 8) is blocked_attention
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"model.vision.backend=auto: the fused Triton kernel failed its self-check: {name}")
    with pytest.raises(ConfigError, match=f"failed its self-check: {name}"):
        resolve_backend("triton", CUDA, HALF, 64, 8)
    assert gpu == [(HALF, 64, 8)]


@pytest.mark.parametrize("damage", [lambda out: out * 1.05, lambda out: out.clone().fill_(float("nan"))])
def test_a_kernel_that_differs_from_the_reference_falls_back_to_blocked(gpu, caplog, monkeypatch, damage):
    def wrong(*args):
        out, cls_probs = reference_attention(*args)
        return damage(out), cls_probs

    monkeypatch.setitem(attention.BACKENDS, "triton", wrong)
    assert resolve_backend("auto", CUDA, HALF, 64, 8) is blocked_attention
    [warning] = warnings_of(caplog)
    assert "self-check differs from the reference by" in warning and "(tolerance 0.02) in float16, head dim 64" in warning
    with pytest.raises(ConfigError, match="differs from the reference"):
        resolve_backend("triton", CUDA, HALF, 64, 8)


def test_self_check_passes_the_real_kernel_in_the_interpreter():
    """The real fused kernel (Triton's interpreter on the CPU) passes the check that guards ``auto``."""
    import triton  # noqa: F401 - the test extra installs it: missing, the test fails
    code = ("import torch; from svitt_ego.models.attention import self_check, triton_attention; "
            "print(self_check(triton_attention, torch.device('cpu'), torch.float16, 64, 16))")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stdout + result.stderr[-2000:]


def test_the_self_check_runs_inside_an_activation_checkpointed_forward():
    """The first forward decides, and may be a checkpointed block's: the check's own backward must
    neither trigger the recomputation nor add to the tensors the block saves."""
    problems = []

    def block(x):
        if not problems:
            problems.append(attention.self_check(blocked_attention, torch.device("cpu"), HALF, 16, 4))
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert problems == [None] and torch.allclose(x.grad, x.detach().cos())


def test_the_encoder_resolves_with_the_dtype_it_runs_in(monkeypatch):
    """The video encoder asks for its backend with the activations' dtype (autocast's), head dim and G."""
    seen = []

    def recording(name, device, dtype, head_dim, block_size):
        seen.append((name, device.type, dtype, head_dim, block_size))
        return blocked_attention

    monkeypatch.setattr("svitt_ego.models.video.resolve_backend", recording)
    cfg = VisionConfig(image_size=32, width=32, depth=1, num_heads=2, num_frames=2, block_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        VideoEncoder(cfg)(torch.randn(1, 2, 3, 32, 32))
    assert seen == [("auto", "cpu", torch.bfloat16, 16, 4)]


def _decision_worker(rank, world_size, init_file, out_folder):
    """Rank 0's self-check fails for head dim 64 and passes for 32; rank 1's would do the opposite."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        checks = []

        def self_check(backend, device, dtype, head_dim, block_size):
            checks.append(head_dim)
            return f"mismatch on rank {rank}" if (head_dim == 64) == (rank == 0) else None

        torch.cuda.get_device_capability = lambda device=None: (9, 0)
        attention.self_check = self_check
        chosen = {d: attention.resolve_backend("auto", CUDA, HALF, d, 8).__name__ for d in (64, 32, 64)}
        with open(f"{out_folder}/rank{rank}.json", "w") as f:
            json.dump({"chosen": chosen, "checks": checks}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_rank_0_decides_for_every_rank(tmp_path):
    mp.spawn(_decision_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["chosen"] == {"64": "blocked_attention", "32": "triton_attention"}
    assert ranks[0]["checks"] == [64, 32] and ranks[1]["checks"] == []
