#!/usr/bin/env bash
# The GPU check, one call on a lent GPU machine from the repo root (docs/gpu.md): the CUDA tests, then a 300-epoch
# run of the 2.7M student with its 300-view store (the strong study's both-v300, seed 0), then gpu.json from both:
# gpu, torch, cuda_tests_passed/failed, train_img_s, store_views_s, run_300_min, top1 (benchmarks/gpu_summary.py).
# Prepare here, once per checkout (neither travels by git; the same as benchmarks/gpu_study.sh):
#   echo /.gpu-data/ >> .git/info/exclude
#   .venv/bin/python benchmarks/device_data.py pack configs/cifar10-10pct-strong.yaml .gpu-data/cifar10.tar.gz
#   python3 -m pip download ... -d .whl pydantic==2.14.4 ...   # the wheels the GPU image lacks (gpu_study.sh's header)
# then one device call carrying .gpu-data and .whl, with a limit above TOTAL_S:
#   bash benchmarks/gpu_check.sh            # TOTAL_S=560 by default: the whole check, tests included
# What comes back under $OUT: gpu.json (copy it to docs/benchmarks/gpu.json), gpu.txt, replay.json, cuda_tests.txt, study.log and
# results.tar.gz (the study's results folder: a run that landed is issue-ready, commit it). A run the time limit cut
# is recorded as such in gpu.json (run_300_min and top1 null, epochs_reached), never estimated.
# DEVICE=cpu STUDY=configs/digits-demo.yaml RUN=both tries the plumbing on a CPU. INVOLUTION_BENCH=1 adds the involution kernel benchmark first (about 2 minutes; docs/gpu.md has its last figures).
set -uo pipefail
start=$SECONDS
OUT=${OUT:-/tmp/libkd-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 LIBKD_CACHE_DIR=/tmp/libkd-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${INVOLUTION_BENCH:-0}" = 1 ]; then
  timeout 150 python3 benchmarks/bench_involution.py --device cuda --dtypes fp32 bf16 --reps 10 --models \
    --json "$OUT/involution_cuda.json" 2>&1 | tee "$OUT/involution_cuda.txt"
fi
timeout 60 python3 benchmarks/bench_replay.py --device "${DEVICE:-cuda}" --batch 512 --json "$OUT/replay.json" 2>&1 \
  | tee "$OUT/replay.txt"  # the views rendered in batches on the device, against PIL on one core
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -p no:logging tests -k cuda 2>&1 \
  | tee "$OUT/cuda_tests.txt"

STUDY=${STUDY:-configs/cifar10-10pct-strong.yaml}
RUN=${RUN:-both-v300}
[ -d ../shared/data/cifar10/test ] || python3 benchmarks/device_data.py unpack .gpu-data/cifar10.tar.gz --check \
  2>&1 | tee "$OUT/study.log"
RESULTS=$(python3 -c "import sys; from libkd.study import load_study; print(load_study(sys.argv[1]).results)" "$STUDY")
OUTDIR=$(python3 -c "import sys; from libkd.study import load_study; print(load_study(sys.argv[1]).out)" "$STUDY")
cp "$RESULTS/timings.json" "$OUT/timings_before.json" 2>/dev/null || echo '{}' > "$OUT/timings_before.json"
left=$(( ${TOTAL_S:-560} - (SECONDS - start) - 25 ))  # 25 s for the summary and the archive
if [ "$left" -gt 60 ]; then
  # seed 0 first; the time limit stops the study in seed 1, which is not part of the check
  timeout "$left" python3 -m libkd study "$STUDY" --runs "$RUN" --set base.device="${DEVICE:-cuda}" --set base.replay.backend="${BACKEND:-tensor}" --workers "${WORKERS:-14}" \
    2>&1 | grep -v '^W[0-9]' | tee -a "$OUT/study.log"
fi
cp "$OUTDIR/timings.json" "$OUT/timings_after.json" 2>/dev/null || echo '{}' > "$OUT/timings_after.json"
python3 benchmarks/gpu_summary.py --out-dir "$OUT" --results "$RESULTS" --study-out "$OUTDIR" --run "$RUN-s0" \
  --json "$OUT/gpu.json"
[ "$RESULTS" = None ] || tar czf "$OUT/results.tar.gz" "$RESULTS"
ls -la "$OUT"
