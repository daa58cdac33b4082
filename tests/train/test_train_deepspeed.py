"""DeepSpeed on CPU (gloo): ZeRO-3 in one process, ZeRO-2 offload with DeepSpeed's own optimizer block,
and 2 processes of ZeRO-2 through the `deepspeed` launcher. Tiny model, 2–3 steps each."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, shapes: Path, name: str, **extra) -> Path:
    cfg = {
        "stage": 1,
        "output_dir": str(tmp / name),
        "model": {"preset": "tiny"},
        "data": {"root": str(shapes), "train": [{"path": "train_res.jsonl"}, {"path": "train_region_caption.jsonl"}], "batch_size": 2},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "max_steps": 3,
        "checkpoint": {"every": 2, "keep_last": 2},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False},
        "sam_cache": {"dir": str(tmp / "cache")},
        "cpu_threads": 1,
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(out: Path) -> dict[int, dict]:
    from fclm.training.tracking import read_metrics

    return read_metrics(out / "metrics.jsonl")


def _teardown_distributed() -> None:
    """Reset accelerate and DeepSpeed's cached groups between in-process runs (``end_training`` destroyed the
    world-of-one process group; the next run makes a new one)."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups
    from accelerate.state import AcceleratorState, GradientState

    ds_groups._WORLD_GROUP = None
    ds_comm.cdb = None
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.slow
def test_zero3_one_process_trains_checkpoints_resumes_and_exports(shapes_dir: Path, tmp_path: Path):
    from fclm.model import FCLM

    plain_cfg = _config(tmp_path, shapes_dir, "plain", export_at_end=False)
    assert main([str(plain_cfg)]) == 0
    _teardown_distributed()
    cfg = _config(tmp_path, shapes_dir, "z3", deepspeed="zero3")
    try:
        assert main([str(cfg)]) == 0
    finally:
        _teardown_distributed()
    out = tmp_path / "z3"
    ds_files = {p.name for p in (out / "checkpoints" / "step-00000003" / "deepspeed").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"} <= ds_files
    # resume from step 2 of the ZeRO-3 run repeats step 3
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "metrics.jsonl").rename(out / "metrics_first.jsonl")
    try:
        assert main([str(cfg), "export_at_end=false"]) == 0
    finally:
        _teardown_distributed()
    assert "resumed from" in (out / "train.log").read_text()
    first = __import__("fclm.training.tracking", fromlist=["read_metrics"]).read_metrics(out / "metrics_first.jsonl")
    assert _rows(out)[3]["total"] == pytest.approx(first[3]["total"], rel=1e-5)
    # same data, same init, same optimizer: ZeRO-3 in one process follows the plain run
    plain, z3 = _rows(tmp_path / "plain"), first
    for step in (1, 2, 3):
        assert z3[step]["total"] == pytest.approx(plain[step]["total"], rel=1e-4), step
        assert z3[step]["lr"] == pytest.approx(plain[step]["lr"])
    model = FCLM.from_pretrained(out / "export")
    assert model.backbone is model.qwen  # merged


@pytest.mark.slow
def test_zero2_offload_with_deepspeed_optimizer_block(shapes_dir: Path, tmp_path: Path):
    """The offload JSONs hand the optimizer to DeepSpeed (DummyOptim path); ``torch_adam`` skips the CPU-Adam JIT build."""
    ds = json.loads((ROOT / "train/deepspeed/zero2_offload.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    ds_path = tmp_path / "zero2_offload_torch_adam.json"
    ds_path.write_text(json.dumps(ds))
    cfg = _config(tmp_path, shapes_dir, "off", deepspeed=str(ds_path), export_at_end=False)
    try:
        assert main([str(cfg)]) == 0
    finally:
        _teardown_distributed()
    rows = _rows(tmp_path / "off")
    assert sorted(rows) == [1, 2, 3]
    assert rows[1]["lr"] == pytest.approx(1e-3) and rows[3]["lr"] < rows[2]["lr"]  # DeepSpeed steps our schedule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_zero2_through_the_deepspeed_launcher(shapes_dir: Path, tmp_path: Path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert launcher is not None, "the deepspeed launcher is installed with the deepspeed package"
    cfg = _config(tmp_path, shapes_dir, "ds2", deepspeed="zero2", max_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "train", str(cfg)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "ds2"
    ckpt = out / "checkpoints" / "step-00000002"
    files = {p.name for p in (ckpt / "deepspeed").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["world_size"] == 2
    rows = _rows(out)
    assert sorted(rows) == [1, 2] and all(r["total"] == r["total"] for r in rows.values())
    log = (out / "train.log").read_text()
    assert "step 2/2" in log and "trainable parameters:" in log
    assert (out / "export" / "fclm_config.json").is_file()
