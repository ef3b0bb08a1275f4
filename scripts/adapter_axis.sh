#!/usr/bin/env bash
# Issue 7, axis 4 (the adapters themselves), on three of the ten tasks (sst2, agnews, cola: the issue's probe):
# does norm routing get easier as adapters specialise? Same 60 dev examples per task for every library.
#   96ex-r8     : the ten-task adapters (rank 8, 1 epoch over 96 examples) - nothing retrained
#   300ex-r8    : rank 8, 1 epoch over 300 examples (the issue's probe budget)
#   96ex-r32    : rank 32 (alpha 64: the same alpha / r), 1 epoch over the ten-task adapters' 96 examples
#   96ex-r8-2ep : rank 8, 2 epochs over those 96 examples
# Each library is evaluated with its oracle, paper-default SEQR and ARROW. Resumable: finished steps are skipped.
# Usage: SEQR_TASK_DATA=../shared/data/tasks bash scripts/adapter_axis.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/adapter-axis}
DATA=${SEQR_TASK_DATA:?set SEQR_TASK_DATA to the tasks directory}
MODEL=smollm2-135m-instruct
SEQR=${SEQR:-.venv/bin/seqr}
TASKS="sst2 agnews cola"
[ -f "$OUT/96ex-r8/library/manifest.json" ] || \
  $SEQR build $(for t in $TASKS; do echo "runs/ten-task/adapters/$t"; done) -o "$OUT/96ex-r8/library"
# name max_train rank alpha epochs
for spec in "300ex-r8 300 8 16 1" "96ex-r32 96 32 64 1" "96ex-r8-2ep 96 8 16 2"; do
  read -r name n rank alpha epochs <<< "$spec"
  for t in $TASKS; do
    $SEQR train --model $MODEL --task $t --data "$DATA" --out "$OUT/$name/adapters/$t" \
      --rank "$rank" --alpha "$alpha" --epochs "$epochs" --max-train "$n" --lr 1e-3 --batch-size 8 --a-seed 0
    [ -f "$OUT/$name/adapters/$t/seqr_stats.json" ] || \
      $SEQR calibrate --model $MODEL --adapter "$OUT/$name/adapters/$t" --task $t --data "$DATA" --max-examples 60
  done
  [ -f "$OUT/$name/library/manifest.json" ] || \
    $SEQR build $(for t in $TASKS; do echo "$OUT/$name/adapters/$t"; done) -o "$OUT/$name/library"
done
for lib in 96ex-r8 300ex-r8 96ex-r32 96ex-r8-2ep; do
  $SEQR eval --library "$OUT/$lib/library" --tasks $TASKS --methods oracle seqr arrow --max-eval 60 --noise "" \
    --data "$DATA" --out "$OUT/$lib/eval"
done
