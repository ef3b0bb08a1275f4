#!/usr/bin/env bash
# The paper-budget ten-task library (issue 28), built into git piece by piece, in one resumable command:
#   SEQR_TASK_DATA=../shared/data/tasks bash scripts/build_paper_library.sh [--device cuda]
# 1. scripts/paper_library.py trains, calibrates and adds each task not yet in artifacts/paper-library/ and
#    commits it at once (then the snapshot libraries any task still lacks);
# 2. once all ten are in, scripts/paper_eval.py runs every evaluation pass not yet in docs/results/paper_library/
#    (float32, one commit per pass);
# 3. then the unique-A library (ordinary LoRA, same recipe) into artifacts/paper-library-unique/, one commit per
#    task, and its evaluation stage (the paper's Table 2).
# On a fresh clone it continues from what main holds; an interruption loses at most the piece in progress.
# Logs: runs/paper-logs/ (kept out of git). PYTHON overrides the interpreter (default .venv/bin/python).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
: "${SEQR_TASK_DATA:?set SEQR_TASK_DATA to the tasks directory}"
LOGS=runs/paper-logs
mkdir -p "$LOGS"
say() { echo "== $(date -u +%FT%TZ) $*" | tee -a "$LOGS/build.log"; }
# one process per task: a training process's heap grows from task to task (15.7 GB resident after two tasks of
# the unique-A build in one process, 5 GB in a fresh one), and a committed task is skipped before any model loads
TASKS="agnews cola dbpedia hellaswag mnli mrpc qnli qqp rte sst2"
say "train"
for t in $TASKS; do "$PY" scripts/paper_library.py --commit --tasks "$t" "$@" 2>&1 | tee -a "$LOGS/train.log"; done
say "snapshots"
"$PY" scripts/paper_library.py --commit --snapshots-only "$@" 2>&1 | tee -a "$LOGS/train.log"
say "eval"
"$PY" scripts/paper_eval.py --commit "$@" 2>&1 | tee -a "$LOGS/eval.log"
say "unique-A library"
for t in $TASKS; do "$PY" scripts/paper_library.py --unique-a --commit --tasks "$t" "$@" 2>&1 | tee -a "$LOGS/train.log"; done
"$PY" scripts/paper_eval.py --stage unique --commit "$@" 2>&1 | tee -a "$LOGS/eval.log"
"$PY" -m seqr.cli info artifacts/paper-library | tee -a "$LOGS/build.log"
