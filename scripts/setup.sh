#!/usr/bin/env bash
# Create .venv and install minigpt (with dev tools) at the versions pinned in constraints.txt.
# Idempotent: a stamp keyed by pyproject.toml + constraints.txt skips work already done.
# torch is pinned (constraints.txt) so a CPU machine never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
key=$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()+open("constraints.txt","rb").read()).hexdigest()[:12])')
stamp=".venv/.setup-$key"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt -e ".[dev]"
  rm -f .venv/.setup-* && touch "$stamp"
fi
