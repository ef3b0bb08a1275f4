#!/usr/bin/env bash
# The paper-budget ten-task library (issue 14) on SmolLM2-135M-Instruct, in one resumable command:
#   SEQR_TASK_DATA=../shared/data/tasks bash scripts/build_paper_library.sh OUT
# Stages (scripts/paper_library.py documents the recipe): per task a 3-rate sweep and the full shared-A run
# (with checkpoints), then the unique-A runs, then the libraries OUT/{shared,unique,checkpoints/step-N}/library.
# Rerun the same command after an interruption: finished pieces are skipped, a cut training run continues from
# its last saved state. Logs: OUT/logs/<stage>.log (appended). The built library stays out of git.
set -euo pipefail
OUT=${1:?usage: build_paper_library.sh OUT}
PY=${PYTHON:-.venv/bin/python}
: "${SEQR_TASK_DATA:?set SEQR_TASK_DATA to the tasks directory}"
mkdir -p "$OUT/logs"
for stage in shared unique build; do
  echo "== $(date -u +%FT%TZ) stage $stage" | tee -a "$OUT/logs/$stage.log"
  "$PY" scripts/paper_library.py "$OUT" --stage "$stage" >>"$OUT/logs/$stage.log" 2>&1
done
"$PY" -m seqr.cli info "$OUT/shared/library" | tee -a "$OUT/logs/build.log"
