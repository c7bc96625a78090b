#!/usr/bin/env bash
# The patient study's 300-epoch runs on a lent GPU machine (each takes 4-5 h on 2 CPU cores, longer than a session):
# both-v300 and micro-v300 from a 300-view store built there, then none-e300 with its augmentation search.
# Prepare here, once per session (neither travels by git):
#   echo /.gpu-data/ >> .git/info/exclude       # (/.whl/ is in .gitignore)
#   .venv/bin/python benchmarks/device_data.py pack configs/cifar10-10pct-patient.yaml .gpu-data/cifar10.tar.gz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
# then one device call from the repo root, carrying .gpu-data and .whl:
#   bash benchmarks/gpu_patient.sh                # STUDY_S: seconds for the study (default 500)
# What comes back under $OUT: results.tar.gz (docs/results/cifar10-10pct-patient as it stands there, with every run
# that landed, and the study's timings) and study.log. Here: tar xzf results.tar.gz, check, commit. A run that did
# not land resumes on the same machine if the next call comes while it is warm (30 s); a new machine starts it over.
set -uo pipefail
OUT=${OUT:-/tmp/libkd-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 LIBKD_CACHE_DIR=/tmp/libkd-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/study.log"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/study.log"
[ -d ../shared/data/cifar10/test ] || python3 benchmarks/device_data.py unpack .gpu-data/cifar10.tar.gz --check \
  2>&1 | tee -a "$OUT/study.log"
deadline=$((SECONDS + ${STUDY_S:-500}))
for runs in "both-v300 micro-v300" "none-e300"; do  # the method first; none-e300 searches its augmentation first
  left=$((deadline - SECONDS)); [ "$left" -gt 30 ] || break
  timeout "$left" python3 -m libkd study configs/cifar10-10pct-patient.yaml --runs $runs --set set.device=cuda \
    --workers "${WORKERS:-14}" 2>&1 | grep -v '^W[0-9]' | tee -a "$OUT/study.log"
done
tar czf "$OUT/results.tar.gz" docs/results/cifar10-10pct-patient $(ls runs/cifar10-10pct-patient/timings.json 2>/dev/null)
ls -la "$OUT"
