#!/usr/bin/env bash
# Set up, lint (ruff, import-linter), and run the whole test suite. Offline, tiktoken's files come
# from TIKTOKEN_CACHE_DIR, or from ../shared/tiktoken-cache where the machine keeps them there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-browser.sh
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d ../shared/tiktoken-cache ]; then
  export TIKTOKEN_CACHE_DIR="$PWD/../shared/tiktoken-cache"
fi
.venv/bin/ruff check .
.venv/bin/lint-imports  # the layers: training and inference apart, no import circles
.venv/bin/python -m pytest "$@"
