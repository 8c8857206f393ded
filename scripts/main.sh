#!/usr/bin/env bash
# The main job: set up, fetch the built-in Shakespeare corpus, train configs/tiny.yaml, sample.
# Run it again and it resumes (or, if finished, goes straight to the sample).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh run
.venv/bin/minigpt prepare shakespeare
if [ -f runs/tiny/train_state.json ]; then
  .venv/bin/minigpt train configs/tiny.yaml --resume
else
  .venv/bin/minigpt train configs/tiny.yaml
fi
.venv/bin/minigpt generate --checkpoint runs/tiny --prompt "ROMEO:" --max-new-tokens 200 \
  --temperature 0.8 --top-p 0.95 --seed 1337
