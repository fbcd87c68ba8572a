#!/usr/bin/env bash
# Installs Ember with its test dependencies and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dashboard's browser test drives Debian's Chromium (no browser download at run time).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  echo "installing chromium for the dashboard's browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null \
    || echo "could not install chromium; the browser test will be skipped" >&2
fi
scripts/setup.sh test
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
