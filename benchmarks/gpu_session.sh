#!/usr/bin/env bash
# One GPU-machine session (see README "Running on a GPU"): benchmark, then train the
# reference recipe, a variant of it and the seed method side by side on a 256 px copy of
# the data, evaluate them, and pack the results (and the best reference checkpoint in fp16
# chunks, under the transfer limits) into $OUT.
#   carried: .whl (smp + pycocotools wheels for Python 3.12), .gpu/data256 (brainseg data resize)
# DRY=1 runs the same steps tiny on the CPU to check the script before spending GPU time.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import segmentation_models_pytorch" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
export BRAINSEG_DATA=$PWD/.gpu/data256 BRAINSEG_CACHE=/tmp/brainseg-cache
RUNS=/tmp/gpu-runs; L=$RUNS/logs; mkdir -p "$L"
CAP=${CAP:-5.5}; SEEDCAP=${SEEDCAP:-4}
EXTRA=(--set runs_dir=$RUNS)
BENCH=(--device cuda --steps 40 --threads 4)
if [ "${DRY:-0}" = 1 ]; then
  EXTRA+=(--set device=cpu --set epochs=2 --set limit_train_images=32 --set image_size=64
          --set num_workers=0 --set bootstrap=50)
  BENCH=(--device cpu --steps 2 --size 64); CAP=0.3; SEEDCAP=0.3
fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
log "start"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/session.log"
python3 -c "import torch, segmentation_models_pytorch as s; print('torch', torch.__version__, 'smp', s.__version__)" 2>&1 | tee -a "$OUT/session.log"
python3 -c "from brainseg_lib.dataset import load_dataset; import os; load_dataset(os.environ['BRAINSEG_DATA'], 256)" 2>&1 | tail -2
log "bench"
timeout 90 python3 benchmarks/bench_train.py "${BENCH[@]}" > "$L/bench.log" 2>&1; tail -4 "$L/bench.log"
timeout 90 python3 benchmarks/bench_train.py "${BENCH[@]}" --augment > "$L/bench_augment.log" 2>&1; tail -3 "$L/bench_augment.log"
log "train"
B=(--set aug_rotate_deg=15 --set aug_scale=0.15 --set aug_shift=0.08 --set aug_vflip=0.5
   --set batch_size=32 --set lr=0.002 --set epochs=150)
python3 -m brainseg_lib.cli train --params params/reference.yaml --run-id ref-a --no-progress \
  "${EXTRA[@]}" --set max_train_minutes=$CAP > "$L/train_ref_a.log" 2>&1 &
python3 -m brainseg_lib.cli train --params params/reference.yaml --run-id ref-b --no-progress \
  "${B[@]}" "${EXTRA[@]}" --set max_train_minutes=$CAP > "$L/train_ref_b.log" 2>&1 &
python3 -m brainseg_lib.cli train --params params/seed.yaml --run-id seed --no-progress \
  "${EXTRA[@]}" --set max_train_minutes=$SEEDCAP > "$L/train_seed.log" 2>&1 &
wait
log "evaluate"
for r in ref-a ref-b seed; do
  tail -2 "$L/train_$(echo $r | tr - _).log"
  python3 -m brainseg_lib.cli evaluate $RUNS/$r > "$L/eval_$r.log" 2>&1; tail -2 "$L/eval_$r.log"
done
log "pack"
python3 - "$RUNS" "$OUT" <<'PY'
import json, sys, torch
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
best = max((r for r in ("ref-a", "ref-b") if (runs / r / "train.json").exists()),
           key=lambda r: json.loads((runs / r / "train.json").read_text())["best_val_iou"] or 0)
print("reference winner on validation IoU:", best)
(runs / "logs" / "winner.txt").write_text(best)
state = torch.load(runs / best / "best.pt", map_location="cpu", weights_only=False)
state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
state["stored_as"] = "fp16 weights (transfer); load as fp32"
blob = out / "best_fp16.pt"
torch.save(state, blob)
data = blob.read_bytes(); blob.unlink()
chunk = 15 * 2**20
for i in range(0, len(data), chunk):
    (out / f"best_fp16.pt.part{i // chunk}").write_bytes(data[i:i + chunk])
PY
tar czf "$OUT/runs.tgz" --exclude='*.pt' -C "$RUNS" . 2>/dev/null
log "done"; ls -la "$OUT"
