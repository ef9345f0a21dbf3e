#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a machine with one CUDA GPU (about 8 minutes on one H100):
# the GPU tests, then the attention and the training-step benchmarks, each beside its dense anchor.
#
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
#
# Each part has its own time limit, so a hang in one still leaves the others' figures.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
git rev-parse --short HEAD 2>/dev/null || echo "(no git metadata)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

echo "== GPU tests: the Triton backend against the reference (fp32 / fp16 / bf16), the no-sync encoder step"
timeout 240 python -m pytest -q -m gpu -k "not flex" -p no:cacheprovider tests/ || echo "GPU tests: exit $?"

echo "== One attention layer of BEiT-B, batch 16, fp16, forward + backward (anchor: flash)"
timeout 150 python benchmarks/attention.py --frames 4 8 16 --repeats 20 --methods flash triton blocked dense_bias \
    || echo "attention benchmark: exit $?"

echo "== Training steps and encoders (anchor: dense ViT-B/16 in the same run)"
timeout 330 python benchmarks/train_step.py --steps 5 || echo "train-step benchmark: exit $?"
