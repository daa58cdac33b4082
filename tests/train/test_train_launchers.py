"""Several processes without DeepSpeed: `torchrun` runs one DDP job over gloo on CPU (not N separate runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_is_one_ddp_job(shapes_dir: Path, tmp_path: Path):
    cfg = {
        "stage": 1,
        "output_dir": str(tmp_path / "ddp"),
        "model": {"preset": "tiny"},
        "data": {"root": str(shapes_dir), "train": [{"path": "train_res.jsonl"}, {"path": "train_region_caption.jsonl"}], "batch_size": 2},
        "max_steps": 2,
        "checkpoint": {"every": 1, "keep_last": 1},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False},
        "sam_cache": {"dir": str(tmp_path / "cache")},
        "export_at_end": False,
        "cpu_threads": 1,
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "train", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-00000002"
    assert {"rng_state_0.pt", "rng_state_1.pt", "model.safetensors", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["world_size"] == 2
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert log.count("step 2/2") == 1, "one job: only the main process logs"
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
