#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine from the repo root (see README, "GPU"):
#   bash benchmarks/gpu_check.sh      # writes its logs and JSON under $OUT (default /tmp/libkd-gpu)
# The involution benchmark first (Triton vs unfold vs shifted views vs depthwise conv, fwd+bwd;
# the Triton forward's bandwidth against clone; RedNet-26 train steps with each path), then the
# CUDA tests (Triton kernels at RedNet shapes in fp32/bf16/fp16, a RedNet-26 bf16 train step,
# torch.compile over two sizes, the shifted path's CUDA tests). About 3 minutes on one H100.
set -uo pipefail
OUT=${OUT:-/tmp/libkd-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${BENCH_TIMEOUT:-150} python3 benchmarks/bench_involution.py --device cuda --dtypes fp32 bf16 --reps 10 --models \
  --json "$OUT/involution_cuda.json" 2>&1 | tee "$OUT/involution_cuda.txt"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_involution_triton.py \
  tests/test_involution.py -k "cuda" 2>&1 | tee "$OUT/cuda_tests.txt"
