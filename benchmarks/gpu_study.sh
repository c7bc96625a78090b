#!/usr/bin/env bash
# A study's long runs on a lent GPU machine (each takes hours on 2 CPU cores): the stores they read, built there, then
# the runs, in the order given; whatever lands comes back to be committed.
# Prepare here, once per checkout (neither travels by git):
#   echo /.gpu-data/ >> .git/info/exclude       # (/.whl/ is in .gitignore)
#   .venv/bin/python benchmarks/device_data.py pack configs/cifar10-10pct-study.yaml .gpu-data/cifar10.tar.gz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
# then one device call from the repo root, carrying .gpu-data and .whl:
#   STUDY=configs/cifar10-10pct-strong.yaml RUNS="both-v300;micro-v300" bash benchmarks/gpu_study.sh
#   (RUNS: groups of runs separated by ';', each one `libkd study --runs` invocation; STUDY_S: seconds for all of
#   them, default 500; defaults: the patient study's "both-v300 micro-v300;none-e300")
# What comes back under $OUT: results.tar.gz (the study's results folder as it stands there, with every run that
# landed, and its timings) and study.log. Here: tar xzf results.tar.gz, check, commit. A run that did not land
# resumes on the same machine if the next call comes while it is warm (30 s); a new machine starts it over.
set -uo pipefail
OUT=${OUT:-/tmp/libkd-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 LIBKD_CACHE_DIR=/tmp/libkd-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/study.log"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/study.log"
[ -d ../shared/data/cifar10/test ] || python3 benchmarks/device_data.py unpack .gpu-data/cifar10.tar.gz --check \
  2>&1 | tee -a "$OUT/study.log"
STUDY=${STUDY:-configs/cifar10-10pct-patient.yaml}
RESULTS=$(python3 -c "import sys; from libkd.study import load_study; print(load_study(sys.argv[1]).results or '')" "$STUDY")
OUTDIR=$(python3 -c "import sys; from libkd.study import load_study; print(load_study(sys.argv[1]).out)" "$STUDY")
deadline=$((SECONDS + ${STUDY_S:-500}))
IFS=';' read -ra GROUPS_OF_RUNS <<< "${RUNS:-both-v300 micro-v300;none-e300}"
for runs in "${GROUPS_OF_RUNS[@]}"; do
  left=$((deadline - SECONDS)); [ "$left" -gt 30 ] || break
  timeout "$left" python3 -m libkd study "$STUDY" --runs $runs --set set.device=cuda \
    --workers "${WORKERS:-14}" 2>&1 | grep -v '^W[0-9]' | tee -a "$OUT/study.log"
done
tar czf "$OUT/results.tar.gz" $RESULTS $(ls "$OUTDIR/timings.json" 2>/dev/null)
ls -la "$OUT"
