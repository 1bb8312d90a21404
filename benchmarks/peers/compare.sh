#!/usr/bin/env bash
# The whole comparison, one system after another on this machine: brainseg (a profile run
# through `brainseg run`, then a timed `brainseg predict` on the test images), nnU-Net
# (run_nnunet.sh) and MONAI (run_monai.sh) at one training budget, repeated; then the table.
#
#   benchmarks/peers/compare.sh --out runs/peers [--params params/quick.yaml] [--minutes 15]
#       [--size 128] [--repeats 2] [--data DIR]
#
# Repeat r trains brainseg with seed 41+r (42 is the profile's own), nnU-Net as run-r and
# MONAI with seed r-1, and pairs both peers with that brainseg run. Nothing else should run
# on the machine meanwhile: every system is given the same wall-clock budget. Needs
# make_venv.sh nnunet and make_venv.sh monai first. Writes <out>/table.md (table.py).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out="" params="$root/params/quick.yaml" minutes=15 size=128 repeats=2
data=${BRAINSEG_DATA:-$root/data/brain-tumor-coco}
usage="usage: compare.sh --out DIR [--params FILE] [--minutes M] [--size PX] [--repeats N] [--data DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --params) params=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    *) echo "compare.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "compare.sh: --out is required; $usage" >&2; exit 2; }
brainseg="$root/.venv/bin/brainseg"
[ -x "$brainseg" ] || { echo "compare.sh: no $brainseg: run make run or make test first" >&2; exit 2; }
export BRAINSEG_DATA="$data"
mkdir -p "$out"
grep -o 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort | uniq -c || true

seconds_of() {  # seconds_of COMMAND...: run it quietly, print its wall-clock seconds
  local start end
  start=$(date +%s%N)
  "$@" > /dev/null
  end=$(date +%s%N)
  echo "$(( (end - start) / 1000000 ))" | awk '{ printf "%.3f", $1 / 1000 }'
}

runs=()
for r in $(seq 1 "$repeats"); do
  seed=$((41 + r))
  name="$(basename "$params" .yaml)-s$seed"
  echo "== brainseg $name"
  "$brainseg" run --params "$params" --name "$name" --set seed="$seed" \
    --set train_minutes="$minutes" --set image_size="$size"
  run=$(ls -d "$root"/runs/*-"$name" | tail -1)
  for tta in notta tta; do  # the whole command, start-up included, as for nnU-Net
    flag=(); [ "$tta" = tta ] && flag=(--tta)
    s=$(seconds_of "$brainseg" predict --model "$run" --backend torch --out "$run/predict_$tta" \
      "${flag[@]}" "$data"/test/*.jpg)
    printf 'predict_%s\t%s\n' "$tta" "$s" >> "$run/predict_timings.tsv"
  done
  runs+=("$run")
  "$here/run_nnunet.sh" --out "$out/nnunet" --minutes "$minutes" --size "$size" --repeat "$r" \
    --data "$data" --brainseg-run "$run"
  "$here/run_monai.sh" --out "$out/monai" --minutes "$minutes" --size "$size" --seed $((r - 1)) \
    --data "$data" --brainseg-run "$run"
done
"$root/.venv/bin/python" "$here/table.py" --peers "$out" --brainseg "${runs[@]}" > "$out/table.md"
echo "compare.sh: the table is $out/table.md"
