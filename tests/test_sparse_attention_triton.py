"""The fused Triton backend: the interpreter cases on the CPU, the same checks and the no-sync step on CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_helpers import attention_inputs, max_relative_error, outputs_and_grads

from svitt_ego.config import VisionConfig
from svitt_ego.models.attention import blocked_attention, reference_attention, resolve_backend, triton_attention
from svitt_ego.models.block_pattern import BlockPattern, sample_block_pattern
from svitt_ego.models.video import VideoEncoder

pytest.importorskip("triton")
TESTS = Path(__file__).resolve().parent
cuda_only = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_interpreter_cases():
    """``triton_interpreter_cases.py`` in a fresh process: the interpreter is chosen when Triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(TESTS / "triton_interpreter_cases.py")],
                            cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_kernel_pattern_by_hand():
    """Valid key tiles first with their count; the transposed pattern lists each key tile's visitors."""
    from svitt_ego.models.sparse_attention_triton import kernel_pattern

    pattern = BlockPattern(key_blocks=torch.tensor([[2, 0], [1, 0], [0, 2]]),
                           valid=torch.tensor([[False, True], [True, True], [True, False]]), block_size=2)
    key_blocks, key_count, query_blocks, query_count = kernel_pattern(pattern)
    assert key_count.tolist() == [1, 2, 1]
    assert [key_blocks[b, :c].tolist() for b, c in enumerate(key_count.tolist())] == [[0], [1, 0], [0]]
    assert query_count.tolist() == [3, 1, 0]  # key tile 0: query tiles 0, 1, 2; tile 1: 1; tile 2: none
    assert sorted(query_blocks[0].tolist()) == [0, 1, 2] and query_blocks[1, 0].item() == 1


def test_auto_picks_triton_on_cuda_and_blocked_elsewhere():
    assert resolve_backend("auto", torch.device("cuda")) is triton_attention
    assert resolve_backend("auto", torch.device("cpu")) is blocked_attention
    assert resolve_backend("triton", torch.device("cpu")) is triton_attention


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
