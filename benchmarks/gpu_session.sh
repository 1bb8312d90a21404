#!/usr/bin/env bash
# One GPU session, unattended, in under 10 minutes (docs/how-to/gpu-machine.md). Phases (PHASES="bench ddp sweep cv" by default; "ref" is
# 150 epochs of params/gpu_resnet34.yaml alone on the card, ~4 min, for a session with time to spare):
#   1. bench: bare vs trainer step, eager at batch 32/64 and compiled at 32
#      (which also fills the compile cache the runs below reuse), and the trainer on
#      batches streamed from host memory beside the device-resident split;
#   ddp: torchrun with NCCL (one process per visible GPU) on the smoke profile: the
#      data-parallel path on CUDA, SyncBatchNorm included;
#   ref: params/gpu_resnet34.yaml for 150 epochs, no budget, alone: its wall time;
#   2. the accuracy sweep of params/grids/gpu_session.yaml (an Optuna study in the sweep
#      folder), its variants side by side under one time budget, selected on validation IoU
#      by the sweep itself, the selected one scored on test;
#   3. 5-fold grouped cross-validation of the selected recipe, folds side by side, then the
#      out-of-fold scores and the fold ensemble on test (full and clean);
#   4. pack: logs, tables and metrics in results.tgz, the selected model exported in smp's
#      format with its weights split into <16 MiB parts.
# Inputs (git-ignored): the data, $BRAINSEG_DATA or .gpu/data (brainseg data resize ...
# --size 384 --grey: at least the grid's largest image_size); .gpu/cache (its near-duplicate groups, so the GPU machine needs no
# imagehash); optionally .whl (smp, pycocotools and optuna wheels, with optuna's
# dependencies, for a machine without PyPI).
# Output: everything in $OUT (default /tmp/gpu-out).
# DRY=1 runs every step tiny on the CPU, to check the script before spending GPU time.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
ROOT=$PWD
if [ -d .whl ] && ! python3 -c "import segmentation_models_pytorch, pycocotools, optuna" 2>/dev/null
then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
export BRAINSEG_DATA=${BRAINSEG_DATA:-$ROOT/.gpu/data} BRAINSEG_CACHE=/tmp/brainseg-cache
mkdir -p "$BRAINSEG_CACHE"
cp .gpu/cache/duplicates-*.json "$BRAINSEG_CACHE"/ 2>/dev/null || \
  echo "warning: no .gpu/cache/duplicates-*.json: test evaluations will need imagehash" \
  | tee -a "$OUT/session.log"
RUNS=/tmp/gpu-runs; mkdir -p "$RUNS"
WINNER_SETS=""
GRID=params/grids/gpu_session.yaml
SWEEP_MIN=${SWEEP_MIN:-2.8}; CV_MIN=${CV_MIN:-1.5}
PHASES=${PHASES:-bench ddp sweep cv}
T_BENCH=150; T_DDP=60; T_REF=260; T_SWEEP=230; T_CV=170
NGPU=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
DDPSET=()
BENCH=(--device cuda --batches 32 64 --compile-batch 32 --steps 20 --threads 4 --streamed)
CVSET=()
if [ "${DRY:-0}" = 1 ]; then  # tiny, on the CPU
  BENCH=(--device cpu --batches 4 --steps 2 --size 64 --encoder resnet18 --streamed)
  sed -e 's/train_minutes: 3.0/train_minutes: 0.05/' -e 's/epochs: 1000/epochs: 2/' \
      -e 's#base: ../gpu_resnet34.yaml#base: ../smoke.yaml#' -e 's/image_size: 384/image_size: 64/' \
      -e 's/crop_size: 1[29][28]/crop_size: 32/' $GRID > params/grids/_dry.yaml
  GRID=params/grids/_dry.yaml; SWEEP_MIN=0.05; CV_MIN=0.05
  CVSET=(--set synthetic=true --set image_size=64 --set encoder=resnet18 --set device=cpu)
  DDPSET=(--set device=cpu --set epochs=2); NGPU=2
  T_BENCH=200; T_DDP=300; T_REF=60; T_SWEEP=400; T_CV=400
fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
want() { [[ " $PHASES " == *" $1 "* ]]; }
log "start"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/session.log"
python3 -c "import torch, segmentation_models_pytorch as s; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'smp', s.__version__)" 2>&1 | tee -a "$OUT/session.log"
python3 -c "
import os; from brainseg_lib.data.arrays import load_dataset
load_dataset(os.environ['BRAINSEG_DATA'], 256)" 2>&1 | tail -2

if want bench; then
  log "bench"
  timeout $T_BENCH python3 benchmarks/bench_train.py "${BENCH[@]}" --json "$RUNS/bench.json" \
    > "$RUNS/bench.log" 2>&1; tail -8 "$RUNS/bench.log" | tee -a "$OUT/session.log"
fi

if want ddp; then
  log "ddp: torchrun --nproc_per_node=$NGPU, smoke profile"
  timeout $T_DDP python3 -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
    -m brainseg_lib.cli train --params params/smoke.yaml --run-id ddp --no-progress \
    --set runs_dir=$RUNS "${DDPSET[@]}" > "$RUNS/ddp.log" 2>&1
  echo "exit $?" >> "$RUNS/ddp.log"; grep -E "epoch|stopped|exit|Error" "$RUNS/ddp.log" \
    | tail -5 | tee -a "$OUT/session.log"
fi

if want ref; then
  log "ref: params/gpu_resnet34.yaml, 150 epochs, no budget, alone on the card"
  T0=$(date +%s)
  timeout $T_REF python3 -m brainseg_lib.cli train --params params/gpu_resnet34.yaml \
    --run-id ref150 --no-progress --set runs_dir=$RUNS \
    --set train_minutes=0 --set epochs=150 --set patience=0 "${CVSET[@]}" \
    > "$RUNS/ref150.log" 2>&1
  log "ref: exit $?, $(( $(date +%s) - T0 )) s wall; $(tail -2 "$RUNS/ref150.log" | head -1)"
fi


if want sweep; then
log "sweep ($SWEEP_MIN min per variant)"
if [ "${DRY:-0}" != 1 ]; then
  sed -e "s/train_minutes: 3.0/train_minutes: $SWEEP_MIN/" $GRID > params/grids/_session.yaml
  GRID=params/grids/_session.yaml
fi
timeout $T_SWEEP python3 -m brainseg_lib.cli sweep --grid $GRID --out "$RUNS/sweep" \
  > "$RUNS/sweep.log" 2>&1; tail -9 "$RUNS/sweep.log" | tee -a "$OUT/session.log"

# the selected variant: the sweep's own table (validation IoU), also when it was cut short
WINNER_SETS=$(python3 - "$RUNS/sweep" "$GRID" <<'PY'
import json, sys
from pathlib import Path
from brainseg_lib.experiments.sweep import read_grid, sweep_table
sweep, grid = Path(sys.argv[1]), read_grid(Path(sys.argv[2]))
table = sweep_table(grid, sweep)
if not table.selected.any():  # cut short: the best validation score so far
    table = table.dropna(subset=[grid["select_on"]]).sort_values(grid["select_on"])
    table["selected"] = table.index == table.index[-1 if grid["select_on"] != "val_loss" else 0]
best = table[table.selected].variant.iloc[0]
(sweep / "winner.txt").write_text(best + "\n")
sets = {k: v for k, v in grid["variants"][best].items() if k != "compile"}
print(" ".join(f"--set {k}={json.dumps(v)}" for k, v in sets.items()))
PY
)
log "winner: $(cat $RUNS/sweep/winner.txt 2>/dev/null) [$WINNER_SETS]"

log "export the selected model"
W=$(cat "$RUNS/sweep/winner.txt" 2>/dev/null)
python3 -m brainseg_lib.cli export "$RUNS/sweep/$W" --out "$RUNS/model" 2>&1 | tail -1
if [ -f "$RUNS/model/model.safetensors" ]; then
  split -b 15M -d "$RUNS/model/model.safetensors" "$OUT/model.safetensors.part"
  mv "$RUNS/model/model.safetensors" "$RUNS/model.safetensors.full"
  sha256sum "$RUNS/model.safetensors.full" | tee -a "$OUT/session.log"
fi
tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.full' -C "$RUNS" . 2>/dev/null
fi

if want cv; then
log "cv (5 folds, $CV_MIN min each)"
# shellcheck disable=SC2086
timeout $T_CV python3 -m brainseg_lib.cli cv --params params/gpu_resnet34.yaml --folds 5 \
  --parallel 5 --run-id cv5 --set runs_dir=$RUNS --set train_minutes=$CV_MIN \
  --set epochs=1000 --set eval_original_size=false --set bootstrap=200 \
  $WINNER_SETS "${CVSET[@]}" > "$RUNS/cv.log" 2>&1
tail -4 "$RUNS/cv.log" | tee -a "$OUT/session.log"
fi

log "pack"
tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.full' -C "$RUNS" . 2>/dev/null
rm -f params/grids/_session.yaml params/grids/_dry.yaml
log "done"; ls -la "$OUT"
