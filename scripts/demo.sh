#!/usr/bin/env bash
# The main job: install into .venv if needed, then build ShapesRef, train FCLM stage 1 and stage 2 on CPU,
# evaluate on the held-out split and print the summary (runs/demo/summary.json); and train the C3VG and
# IGVG heads as specialists on the same data and print theirs (runs/demo/heads_summary.json).
# Arguments go to scripts/demo.py, and those it shares (--out, --quick, --threads, --n-train, --n-val) to
# scripts/demo_heads.py, which demo.py starts (--heads, with --c3vg-ablation): at one torch thread (the
# default) beside itself, one process per core, and prints its summary at the end (log: runs/demo/heads_demo.log).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
python scripts/demo.py --heads "$@"
