#!/usr/bin/env bash
# Train, calibrate and build the ten-task shared-A library on SmolLM2-135M-Instruct (issue 4's real run).
# Budget for a 2-core CPU: rank 8, alpha 16, 1 epoch over 96 training examples per task, stats from
# 60 training examples per silo. Each silo only ever reads its own task's files.
# Usage: SEQR_TASK_DATA=../shared/data/tasks bash scripts/build_ten_task_library.sh [OUT_DIR] [EXTRA TRAIN FLAGS]
#   e.g. ... build_ten_task_library.sh runs/ten-task-unique --unique-a   (the unique-A baseline library)
set -euo pipefail
OUT=${1:-runs/ten-task}
shift || true
DATA=${SEQR_TASK_DATA:?set SEQR_TASK_DATA to the tasks directory}
MODEL=smollm2-135m-instruct
SEQR=${SEQR:-.venv/bin/seqr}
TASKS="agnews cola dbpedia hellaswag mnli mrpc qnli qqp rte sst2"
for t in $TASKS; do
  $SEQR train --model $MODEL --task $t --data "$DATA" --out "$OUT/adapters/$t" \
    --rank 8 --alpha 16 --epochs 1 --max-train 96 --lr 1e-3 --batch-size 8 --a-seed 0 "$@"
  [ -f "$OUT/adapters/$t/seqr_stats.json" ] || \
    $SEQR calibrate --model $MODEL --adapter "$OUT/adapters/$t" --task $t --data "$DATA" --max-examples 60
done
$SEQR build $(for t in $TASKS; do echo "$OUT/adapters/$t"; done) -o "$OUT/library"
$SEQR info "$OUT/library"
