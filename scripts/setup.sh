#!/usr/bin/env bash
# Create .venv and install minigpt at the versions pinned in constraints.txt:
#   bash scripts/setup.sh        minigpt with the dev tools (tests, lint, transformers, ...)
#   bash scripts/setup.sh run    minigpt alone (what the main job needs: a faster set-up)
# Idempotent: a stamp keyed by pyproject.toml + constraints.txt + the choice skips work done.
# torch is pinned (constraints.txt) so a CPU machine never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
target=".[dev]"
[ "${1:-dev}" = run ] && target="."
key=$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()+open("constraints.txt","rb").read()+sys.argv[1].encode()).hexdigest()[:12])' "$target")
stamp=".venv/.setup-$key"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e "$target"
  touch "$stamp"
fi
