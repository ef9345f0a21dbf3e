#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a machine with one CUDA GPU, within 7 minutes whatever
# fails (the limits below add up to 6 min 55 s, with 5 s of kill grace each, and 10 s for nvidia-smi;
# the planner's part runs beside the others, within their time):
#
#     bash benchmarks/gpu_check.sh [RESULTS] 2>&1 | tee gpu_check.log
#
#  1. benchmarks/gpu_check.py: the environment, what `auto` picks, and the fused kernel against the
#     reference (outputs and gradients of q, k, v and the bias table) at batch 16, 12 heads of 64,
#     G = 56, 4 frames, with shared and per-sample pruned positions, fp16 and bf16;
#  2. the GPU tests (`pytest -m gpu`; FlexAttention's left out: compiling them takes minutes), one row
#     per test as it ends (tests/results_rows.py);
#  3. the attention benchmark (one BEiT-B layer, batch 16, fp16, beside flash attention);
#  4. the training-step benchmark (beside a dense ViT-B/16 and the `dense` preset);
#  5. the memory planner's predictions for four of those steps, computed on the CPU (one core) while
#     parts 1-4 run, then appended beside the peaks part 4 measured (benchmarks/memory_calibration.py).
#
# Each part runs in its own process under its own time limit; every figure is printed as soon as it
# is measured and appended, one JSON line each, to RESULTS (default: gpu_results.jsonl here), with a
# row for each part that exits non-zero or runs out of time. Needs only python3, torch and Triton:
# no PyAV, no MiniLM package, no package index.
set -u
results=$(realpath -m "${1:-gpu_results.jsonl}")
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "commit $commit, results in $results"
printf '{"part": "start", "commit": "%s", "date": "%s"}\n' "$commit" "$(date -u +%FT%TZ)" >> "$results"
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# part NAME SECONDS COMMAND...: run COMMAND under its limit (then 5 s to exit before it is killed).
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@"
    local rc=$? timed_out=false
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then timed_out=true; fi
    if [ "$rc" -ne 0 ]; then
        echo "== $name: exit $rc (time limit reached: $timed_out)"
        printf '{"part": "%s", "exit": %d, "timed_out": %s}\n' "$name" "$rc" "$timed_out" >> "$results"
    fi
}

# The planner runs on the CPU beside the GPU parts, in their time; its limit ends with theirs.
part memory_plan 390 env OMP_NUM_THREADS=1 python3 benchmarks/memory_calibration.py --plan-gpu-rows "$results" &
planner=$!
part correctness 80 python3 benchmarks/gpu_check.py --results "$results"
part gpu_tests 100 env SVITT_EGO_TEST_RESULTS="$results" python3 -m pytest -q -m gpu -k "not flex" \
    -p no:cacheprovider tests/
part attention 60 python3 benchmarks/attention.py --frames 4 16 --repeats 10 --methods flash triton blocked \
    dense_bias --results "$results"
part train_step 130 python3 benchmarks/train_step.py --steps 3 --results "$results" --runs vit_b:4 dense:4 \
    svitt_ego_kr3:4 encoder:svitt_ego_kr3:4 vit_b:16 dense:16 svitt_ego_kr3:16 encoder:svitt_ego_kr3:16 \
    svitt_ego_kr5:4 svitt_ego_kr3:4:ckpt
wait "$planner"
part memory_check 10 python3 benchmarks/memory_calibration.py --compare "$results"
echo "== done: $results"
