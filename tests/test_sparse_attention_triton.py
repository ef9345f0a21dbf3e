"""The fused Triton backend: the interpreter cases on the CPU, the same checks and the no-sync step on CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # the test extra installs it (and the GPU image has it): missing, collection fails
from attention_helpers import attention_inputs, max_relative_error, outputs_and_grads

from svitt_ego.config import VisionConfig
from svitt_ego.models.attention import reference_attention, triton_attention
from svitt_ego.models.block_pattern import sample_block_pattern
from svitt_ego.models.video import VideoEncoder

TESTS = Path(__file__).resolve().parent
cuda_only = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


TRITON_36 = TESTS.parent / ".triton-3.6.0"  # the README's test command installs Triton 3.6.0 there


@pytest.mark.parametrize("triton_path", ["default", "3.6.0"])
def test_interpreter_cases(triton_path):
    """``triton_interpreter_cases.py`` in a fresh process (the interpreter is chosen when Triton is
    imported), under the installed Triton and under Triton 3.6.0 (the GPU image's)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "EXPECTED_TRITON": triton.__version__}
    if triton_path == "3.6.0":
        if not TRITON_36.is_dir():
            pytest.skip(f"{TRITON_36} is missing (pip install --no-deps --target .triton-3.6.0 triton==3.6.0)")
        path = os.pathsep.join(p for p in (str(TRITON_36), env.get("PYTHONPATH")) if p)
        env.update(PYTHONPATH=path, EXPECTED_TRITON="3.6.0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(TESTS / "triton_interpreter_cases.py")],
                            cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("num_patches,block_size,k_local,k_random", [(784, 56, 1, 3), (549, 56, 1, 5),
                                                                      (45, 8, 3, 9), (270, 56, 3, 3)])
def test_triton_equals_reference_on_cuda(dtype, tol, num_patches, block_size, k_local, k_random):
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, positions, bias = attention_inputs(2, 4, num_patches, 64, frames=4, grid=14, per_sample=True,
                                                dtype=dtype, device="cuda")
    pattern = sample_block_pattern(num_patches, block_size, k_local, k_random,
                                   generator=torch.Generator().manual_seed(0), device="cuda")
    ref = outputs_and_grads(reference_attention, q, k, v, positions, bias, pattern)
    got = outputs_and_grads(triton_attention, q, k, v, positions, bias, pattern)
    assert max_relative_error(got, ref) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_video_encoder_training_step_does_not_synchronise():
    """Forward and backward of a sparse, pruning encoder (fp16 autocast) without one host-device sync."""
    cfg = VisionConfig(image_size=112, width=128, depth=4, num_heads=2, prune_layers=[1, 2])
    model = VideoEncoder(cfg).cuda().train()
    frames = torch.randn(4, cfg.num_frames, 3, 112, 112, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(frames)
        (out.pooled.float().square().sum() + out.tokens.float().mean()).backward()
        return out

    step()  # the first call compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [p.shape[1] for p in out.kept_positions] == [138, 97]
    assert all(p.grad is not None for p in model.parameters())
