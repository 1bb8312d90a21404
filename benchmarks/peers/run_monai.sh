#!/usr/bin/env bash
# The MONAI peer (BasicUNet 2D + DiceCELoss, monai_unet.py) on brainseg's arrays for a
# training budget, then scored by brainseg's code (score.py, project venv).
#
#   benchmarks/peers/run_monai.sh --out runs/peers/monai [--minutes 15] [--size 128]
#       [--seed 0] [--threads N] [--data DIR] [--brainseg-run RUN_DIR]
#
# Writes <out>/seed-<seed>/: pred_notta/, pred_tta/, model.pt, timings.json, and
# score_notta/, score_tta/ (per_image.csv, summary.json). Needs make_venv.sh monai first.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv="$here/.venv-monai"
out="" minutes=15 size=128 seed=0 threads=$(nproc) brainseg_run=""
data=${BRAINSEG_DATA:-$root/data/brain-tumor-coco}
usage="usage: run_monai.sh --out DIR [--minutes M] [--size PX] [--seed N] [--threads N] [--data DIR] [--brainseg-run RUN_DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --brainseg-run) brainseg_run=$2; shift 2 ;;
    *) echo "run_monai.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "run_monai.sh: --out is required; $usage" >&2; exit 2; }
[ -x "$venv/bin/python" ] || {
  echo "run_monai.sh: no $venv: run benchmarks/peers/make_venv.sh monai" >&2; exit 2; }
brainseg_python=${BRAINSEG_PYTHON:-$root/.venv/bin/python}
[ -x "$brainseg_python" ] || brainseg_python=python3
run="$out/seed-$seed"

PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" "$here/monai_unet.py" \
  --data "$data" --out "$run" --minutes "$minutes" --size "$size" --seed "$seed" \
  --threads "$threads"
paired=(); [ -n "$brainseg_run" ] && paired=(--brainseg-run "$brainseg_run")
for tta in tta notta; do
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$brainseg_python" "$here/score.py" \
    --peer "monai ($tta)" --pred "$run/pred_$tta" --data "$data" --size "$size" \
    --timings "$run/timings.json" --out "$run/score_$tta" "${paired[@]}"
done
