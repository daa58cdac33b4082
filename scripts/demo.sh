#!/usr/bin/env bash
# The main job: install into .venv if needed, then build ShapesRef, train FCLM stage 1 and stage 2 on CPU,
# evaluate on the held-out split and print the summary (runs/demo/summary.json). Arguments go to scripts/demo.py.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python scripts/demo.py "$@"
