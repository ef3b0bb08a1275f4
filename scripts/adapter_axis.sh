#!/usr/bin/env bash
# Issue 7, axis 4 (the adapters themselves), on three of the ten tasks (sst2, agnews, cola: the probe):
# does norm routing get easier as adapters specialise? Same 60 dev examples per task for every library.
#   96ex-r8 : the ten-task adapters (rank 8, 1 epoch over 96 examples) - nothing retrained
#   300ex-r8: rank 8, 1 epoch over 300 examples (the probe budget)
# Usage: SEQR_TASK_DATA=../shared/data/tasks bash scripts/adapter_axis.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/adapter-axis}
DATA=${SEQR_TASK_DATA:?set SEQR_TASK_DATA to the tasks directory}
MODEL=smollm2-135m-instruct
SEQR=${SEQR:-.venv/bin/seqr}
TASKS="sst2 agnews cola"
[ -f "$OUT/96ex-r8/library/manifest.json" ] || \
  $SEQR build $(for t in $TASKS; do echo "runs/ten-task/adapters/$t"; done) -o "$OUT/96ex-r8/library"
for t in $TASKS; do
  $SEQR train --model $MODEL --task $t --data "$DATA" --out "$OUT/300ex-r8/adapters/$t" \
    --rank 8 --alpha 16 --epochs 1 --max-train 300 --lr 1e-3 --batch-size 8 --a-seed 0
  [ -f "$OUT/300ex-r8/adapters/$t/seqr_stats.json" ] || \
    $SEQR calibrate --model $MODEL --adapter "$OUT/300ex-r8/adapters/$t" --task $t --data "$DATA" --max-examples 60
done
[ -f "$OUT/300ex-r8/library/manifest.json" ] || \
  $SEQR build $(for t in $TASKS; do echo "$OUT/300ex-r8/adapters/$t"; done) -o "$OUT/300ex-r8/library"
for lib in 96ex-r8 300ex-r8; do
  $SEQR eval --library "$OUT/$lib/library" --tasks $TASKS --methods oracle seqr --max-eval 60 --noise "" \
    --data "$DATA" --out "$OUT/$lib/eval"
done
