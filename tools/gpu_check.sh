#!/usr/bin/env bash
# GPU smoke check (>= 1 GPU, under 8 minutes): CUDA vLLM generation, IPC weight sync through vLLM's
# engine with the log-prob check, sleep/wake, and one tiny RL step (TransformerEngine spec when TE is
# installed). Prints a table; exit 0 when every row passed. Without a GPU: one line, exit 0.
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python}"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
   || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: skipped (no CUDA GPU visible)"
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" tools/gpu_check.py "$@"
