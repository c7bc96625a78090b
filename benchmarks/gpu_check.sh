#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine from the repo root (see README, "GPU"):
#   bash benchmarks/gpu_check.sh      # writes its logs and JSON under $OUT (default /tmp/libkd-gpu)
# It runs the CUDA tests (involution in fp32/fp16/bf16, autocast, torch.compile), then the
# involution and model benchmarks. Takes about 3 minutes on one H100.
set -uo pipefail
OUT=${OUT:-/tmp/libkd-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_involution.py -k cuda 2>&1 | tee "$OUT/cuda_tests.txt"
python3 benchmarks/bench_involution.py --device cuda --dtypes fp32 bf16 fp16 --reps 20 --json "$OUT/involution_cuda.json" 2>&1 | tee "$OUT/involution_cuda.txt"
python3 benchmarks/bench_models.py --device cuda --amp bf16 --batch 256 --seconds 2 --json "$OUT/models_cuda.json" 2>&1 | tee "$OUT/models_cuda.txt"
