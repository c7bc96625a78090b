#!/usr/bin/env bash
# The CIFAR-10 10 % teachers at the field's level, trained side by side on one lent GPU: every recipe variant twice,
# once on 4,000 of the 5,000 study images scored on the other 1,000 (the held-out trial that chooses the recipe) and
# once on all 5,000 scored on the test split (the teacher a study then uses). Each is a plain `libkd train-teacher`
# run of configs/cifar10-10pct-teacher-{conv,inv}.yaml with the variant's --set overrides (listed below).
# Prepare here, once per checkout (neither travels by git):
#   echo /.gpu-data/ >> .git/info/exclude       # (/.whl/ is in .gitignore)
#   .venv/bin/python benchmarks/device_data.py pack configs/cifar10-10pct-study.yaml .gpu-data/cifar10.tar.gz
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
# then one device call from the repo root, carrying .gpu-data and .whl:
#   bash benchmarks/gpu_teachers.sh             # TEACHERS_S: seconds the runs may take (default 450)
# On a CPU, a smoke run of the same steps: DEVICE=cpu EXTRA="--set train.epochs=2 --set train.max_steps_per_epoch=2"
# What comes back under $OUT: teachers.tar.gz (every run's metrics.jsonl, teacher.json, config.yaml and log, the
# GPU's utilisation, chosen.txt with the held-out rule's choice per family, and the chosen 5,000-image runs' weights)
# and, for a chosen run that did not finish, its resume state (state-NAME.pt): put it at
# runs/cifar10-10pct-teachers/NAME/last_state.pt and rerun that run's train-teacher command to go on from there.
set -uo pipefail
OUT=${OUT:-/tmp/libkd-gpu}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import pydantic" 2>/dev/null; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export LIBKD_CACHE_DIR=${LIBKD_CACHE_DIR:-/tmp/libkd-cache}
T=runs/cifar10-10pct-teachers
mkdir -p "$T"
LOG="$OUT/teachers.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"; nproc --all
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } | tee "$LOG"
[ -d ../shared/data/cifar10/test ] || python3 benchmarks/device_data.py unpack .gpu-data/cifar10.tar.gz --check 2>&1 | tee -a "$LOG"
# Decode and hash the images once, before ten processes would each do it.
python3 -c "
from libkd.config import load_config
from libkd.data import load_splits
cfg = load_config('configs/cifar10-10pct-teacher-conv.yaml')
for holdout in (None, 100):
    train, val = load_splits(cfg.model_copy(update={'data': cfg.data.model_copy(update={'holdout': holdout})}))
    print('data', holdout, len(train), len(val))" 2>&1 | tee -a "$LOG" || exit 1
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 > "$T/gpu-utilisation.csv" 2>/dev/null &
  SMI=$!
fi
deadline=$((SECONDS + ${TEACHERS_S:-450}))

run() {  # NAME CONFIG [--set ...]: the 5,000-image run NAME and its held-out trial NAME-holdout, in the background
  local name=$1 config=$2; shift 2
  for variant in "$name" "$name-holdout"; do
    local holdout=(); [ "$variant" = "$name" ] || holdout=(--set data.holdout=100 --set train.eval_every=10)
    timeout $((deadline - SECONDS)) python3 -m libkd train-teacher -c "$config" --device "$DEVICE" --out "$T/$variant" \
      "$@" "${holdout[@]}" $EXTRA > "$T/$variant.log" 2>&1 &
  done
}
CONV=configs/cifar10-10pct-teacher-conv.yaml
INV=configs/cifar10-10pct-teacher-inv.yaml
run conv-crop-flip "$CONV" --set augment.replay=false --set train.workers=1   # pad-4 crop + flip, no RandAugment
run conv-ra "$CONV"                                                            # the config as it is: RandAugment m9 + erasing
run conv-ra-cutmix "$CONV" --set replay.cutmix_alpha=1.0 --set replay.mix_prob=0.5   # + CutMix on half the images
run inv-ra "$INV"
run inv-ra-cutmix "$INV" --set replay.cutmix_alpha=1.0 --set replay.mix_prob=0.5
wait $(jobs -p | grep -v "^${SMI:-x}$") 2>/dev/null
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
for log in "$T"/*.log; do echo "== $log"; grep -v "^W[0-9]" "$log" | tail -4; done | tee -a "$LOG"
# The held-out rule: per family, the variant whose trial scored highest on the 1,000 held-out images at its last
# scored epoch; its 5,000-image run's weights come back (the others' metrics, configs and logs too, not their weights).
python3 - "$T" <<'PY' | tee -a "$LOG" > "$T/chosen.txt"
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
for family in ("conv", "inv"):
    trials = {}
    for folder in sorted(runs.glob(f"{family}-*-holdout")):
        scored = [h for h in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if h.get("val_top1") is not None] \
            if (folder / "metrics.jsonl").is_file() else []
        if scored:
            trials[folder.name[: -len("-holdout")]] = (scored[-1]["val_top1"], scored[-1]["epoch"])
    if trials:
        best = max(trials, key=lambda name: trials[name][0])
        print(best, " ".join(f"{name}={top1:.2f}@{epoch}" for name, (top1, epoch) in trials.items()))
PY
chosen=$(cut -d' ' -f1 "$T/chosen.txt")
{ find "$T" -type f ! -name last_state.pt ! -name teacher.safetensors ! -path "*/tensorboard/*"
  for name in $chosen; do ls "$T/$name/teacher.safetensors" 2>/dev/null; done; } > "$OUT/files.txt"
tar czf "$OUT/teachers.tar.gz" -T "$OUT/files.txt" && rm "$OUT/files.txt"
for name in $chosen; do  # a chosen run that did not finish comes back with its state, to go on elsewhere
  folder="$T/$name"
  [ -f "$folder/last_state.pt" ] || continue
  python3 -c "import sys, torch, yaml; s = torch.load(sys.argv[1], map_location='cpu', weights_only=True); \
e = yaml.safe_load(open(sys.argv[2]))['train']['epochs']; sys.exit(0 if s['epoch'] < e else 1)" \
    "$folder/last_state.pt" "$folder/config.yaml" && cp "$folder/last_state.pt" "$OUT/state-$name.pt"
done
ls -la "$OUT"
