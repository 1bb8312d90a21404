#!/usr/bin/env bash
# nnU-Net v2 (2d) on brainseg's splits, for a training budget, scored by brainseg's code.
#
#   benchmarks/peers/run_nnunet.sh --out runs/peers/nnunet [--minutes 15] [--size 128]
#       [--repeat 1] [--device cpu|cuda] [--data DIR] [--brainseg-run RUN_DIR]
#
# Steps (each timed apart into <out>/run-<repeat>/timings.json):
#   1. convert our COCO splits to nnU-Net's raw format (nnunet_convert.py, project venv;
#      reused when <out>/nnUNet_raw already holds it);
#   2. nnUNetv2_plan_and_preprocess -c 2d, then our splits_final.json (fold 0 = our
#      train/valid) into the preprocessed folder; reused across repeats;
#   3. nnUNetv2_train <id> 2d 0 -tr nnUNetTrainerBudget (BRAINSEG_PEER_MINUTES = --minutes),
#      found through nnUNet_extTrainer; then nnU-Net's own final validation on valid;
#   4. nnUNetv2_predict -f 0 on imagesTs, with TTA (nnU-Net's default, mirroring) and
#      without (--disable_tta): PNG masks, one per test case;
#   5. score.py on both (project venv): pooled IoU, image Dice, fg+bg mIoU, lesion-wise,
#      full and clean test, bootstrap intervals, and paired against --brainseg-run if given.
# Needs benchmarks/peers/make_venv.sh nnunet first. On a machine without a GPU: nnU-Net's
# data augmentation in the main process (nnUNet_n_proc_DA=0) and no torch.compile
# (nnUNet_compile=f), unless set in the environment. Repeats are separate trainings on the
# same preprocessed data (nnU-Net is not deterministic; run 2 for the comparison).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv="$here/.venv-nnunet"
out="" minutes=15 size=128 repeat=1 device="" brainseg_run="" dataset_id=501
data=${BRAINSEG_DATA:-$root/data/brain-tumor-coco}
usage="usage: run_nnunet.sh --out DIR [--minutes M] [--size PX] [--repeat N] [--device cpu|cuda] [--data DIR] [--brainseg-run RUN_DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --brainseg-run) brainseg_run=$2; shift 2 ;;
    --dataset-id) dataset_id=$2; shift 2 ;;
    *) echo "run_nnunet.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "run_nnunet.sh: --out is required; $usage" >&2; exit 2; }
[ -x "$venv/bin/nnUNetv2_train" ] || {
  echo "run_nnunet.sh: $venv has no nnU-Net: run benchmarks/peers/make_venv.sh nnunet" >&2; exit 2; }
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
brainseg_python=${BRAINSEG_PYTHON:-$root/.venv/bin/python}
[ -x "$brainseg_python" ] || brainseg_python=python3

mkdir -p "$out"
out=$(cd "$out" && pwd)
run="$out/run-$repeat"
mkdir -p "$run"
export nnUNet_raw="$out/nnUNet_raw" nnUNet_preprocessed="$out/nnUNet_preprocessed"
export nnUNet_results="$run/nnUNet_results" nnUNet_extTrainer="$here/nnunet_ext"
export BRAINSEG_PEER_MINUTES="$minutes"
# n_proc_DA is set for the training only: nnU-Net 2.8.1's planner passes it to
# torch.set_num_threads, which refuses 0
proc_da=${nnUNet_n_proc_DA:-}
if [ "$device" = cpu ]; then
  proc_da=${nnUNet_n_proc_DA:-0}
  export nnUNet_compile=${nnUNet_compile:-f} nnUNet_def_n_proc=${nnUNet_def_n_proc:-$(nproc)}
fi
unset nnUNet_n_proc_DA
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
timings="$run/timings.tsv"
: > "$timings"

timed() {  # timed NAME COMMAND...: run it, append "NAME<TAB>seconds" to timings.tsv
  local name=$1 start end ms
  shift
  echo "== $name: $*"
  start=$(date +%s%N)
  "$@"
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  printf '%s\t%d.%03d\n' "$name" $(( ms / 1000 )) $(( ms % 1000 )) >> "$timings"
}

dataset=$(printf 'Dataset%03d_BrainsegTumour' "$dataset_id")
if [ -d "$nnUNet_raw/$dataset" ]; then  # reused: it must be the size asked for
  have=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["size"])' \
    "$nnUNet_raw/$dataset/case_map.json")
  want=$size; [ "$size" = 0 ] && want=source
  [ "$have" = "$want" ] || {
    echo "run_nnunet.sh: $nnUNet_raw/$dataset was converted at size $have, not $want: use another --out" >&2
    exit 2; }
else
  timed convert "$brainseg_python" "$here/nnunet_convert.py" --data "$data" \
    --out "$nnUNet_raw" --size "$size" --dataset-id "$dataset_id"
fi
if [ ! -f "$nnUNet_preprocessed/$dataset/splits_final.json" ]; then
  timed plan_and_preprocess "$venv/bin/nnUNetv2_plan_and_preprocess" -d "$dataset_id" -c 2d \
    -np "${nnUNet_def_n_proc:-$(nproc)}" -npfp "${nnUNet_def_n_proc:-$(nproc)}" \
    --verify_dataset_integrity
  cp "$nnUNet_raw/$dataset/splits_final.json" "$nnUNet_preprocessed/$dataset/splits_final.json"
fi
da_env=(); [ -n "$proc_da" ] && da_env=(env "nnUNet_n_proc_DA=$proc_da")
timed train "${da_env[@]}" "$venv/bin/nnUNetv2_train" "$dataset_id" 2d 0 -tr nnUNetTrainerBudget -device "$device"
for tta in tta notta; do
  flag=(); [ "$tta" = notta ] && flag=(--disable_tta)
  timed "predict_$tta" "$venv/bin/nnUNetv2_predict" -i "$nnUNet_raw/$dataset/imagesTs" \
    -o "$run/pred_$tta" -d "$dataset_id" -c 2d -f 0 -tr nnUNetTrainerBudget \
    -device "$device" "${flag[@]}"
done

fold="$nnUNet_results/$dataset/nnUNetTrainerBudget__nnUNetPlans__2d/fold_0"
"$venv/bin/python" - "$run" "$fold" "$nnUNet_preprocessed/$dataset/nnUNetPlans.json" "$device" <<'EOF'
import json, sys, importlib.metadata as md
from pathlib import Path
run, fold, plans, device = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
seconds = dict(line.split("\t") for line in (run / "timings.tsv").read_text().splitlines())
n_test = len(list((run / "pred_notta").glob("*.png")))
record = {"peer": "nnunet", "device": device,
          "versions": {p: md.version(p) for p in ("nnunetv2", "torch", "numpy",
                                                  "dynamic_network_architectures")},
          "seconds": {k: float(v) for k, v in seconds.items()}, "test_images": n_test,
          "budget": json.loads((fold / "budget.json").read_text()),
          "plan_2d": json.loads(plans.read_text())["configurations"]["2d"]}
for tta in ("tta", "notta"):
    record[f"predict_{tta}_images_per_s"] = n_test / record["seconds"][f"predict_{tta}"]
(run / "timings.json").write_text(json.dumps(record, indent=2))
print(f"timings: {run / 'timings.json'}")
EOF

score_size=$size; [ "$size" = 0 ] && score_size=${BRAINSEG_PEER_SCORE_SIZE:-128}
paired=(); [ -n "$brainseg_run" ] && paired=(--brainseg-run "$brainseg_run")
for tta in tta notta; do
  "$brainseg_python" "$here/score.py" --peer "nnunet ($tta)" --pred "$run/pred_$tta" \
    --case-map "$nnUNet_raw/$dataset/case_map.json" --data "$data" --size "$score_size" \
    --timings "$run/timings.json" --out "$run/score_$tta" "${paired[@]}"
done
