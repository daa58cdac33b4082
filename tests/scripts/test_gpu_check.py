"""scripts/gpu_check.sh and its program: the shell part's checks, and the Python part run on CPU (tiny preset)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_shell_script_parses_and_documents_offline_wheels():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "--no-index" in text and "pip download" in text and "--python-version" in text and "--platform" in text


def test_shell_script_reuses_a_satisfying_python_and_stops_without_cuda(tmp_path):
    """This venv satisfies every pin: nothing is installed, and without a GPU it stops with a clear error."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "sees no CUDA device" in out.stderr and "installing" not in out.stdout


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system python3")
def test_shell_script_names_what_is_missing_without_wheels():
    check = subprocess.run(["/usr/bin/python3", "-c", "import torch"], capture_output=True)
    if check.returncode == 0:
        pytest.skip("the system python3 has torch")
    if (ROOT / "scripts" / ".whl").exists() or (ROOT / ".whl").exists():
        pytest.skip("a wheel folder exists here")
    env = {**os.environ, "PYTHON": "/usr/bin/python3"}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "lacks:" in out.stderr and "torch>=2.6" in out.stderr and "scripts/.whl/" in out.stderr


def test_gpu_check_program_runs_on_cpu_with_the_tiny_preset(tmp_path):
    figures = tmp_path / "gpu_check.json"
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny", "--steps", "3",
         "--warmup", "1", "--questions", "2", "--batch-size", "2", "--json", str(figures)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for line in ("built tiny", "samples/s", "MFU n/a", "peak memory", "grounding questions on one image: p50"):
        assert line in out.stdout
    f = json.loads(figures.read_text())
    assert f["finite"] and f["samples_per_s"] > 0 and f["grounded"] == 2 and f["latency_p50_ms"] > 0
    assert f["peak_memory_gib"] > 0 and f["plan_gib"] > 0 and f["flops_per_sample"] > 0
