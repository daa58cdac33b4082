"""Hostile checkpoints: no pickle in a checkpoint folder runs code, neither on resume nor on ``fclm-train export``.

Every ``.pt`` of a checkpoint is read with ``torch.load(weights_only=True)`` (DeepSpeed's files with a small
allowlist of its own harmless classes); a file that would import anything else is refused with a
``CheckpointError`` naming it, before DeepSpeed or the optimizer sees it. The crafted files here pickle an
object whose ``__reduce__`` calls ``os.system("touch <marker>")``: the marker must never appear.
Real tiny runs (plain, ZeRO-2, ZeRO-3 on CPU) provide the checkpoints that are then tampered with.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import fclm.training.checkpoint as ck
from train.__main__ import main

REFUSED = r"refused: it would import \w+\.system \(only tensors and plain data are loaded\)"


class _Payload:
    """Unpickling this runs ``touch <marker>`` (what an attacker would replace by anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _craft(file: Path, marker: Path) -> None:
    """Replace ``file`` by a torch.save'd dict holding the payload (the shape of a real checkpoint file)."""
    torch.save({"module": _Payload(marker), "optimizer_state_dict": {}}, file)


def _teardown_distributed() -> None:
    """Reset accelerate's and DeepSpeed's cached state between in-process runs (as tests/train/test_train_deepspeed.py)."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups
    from accelerate.state import AcceleratorState, GradientState

    ds_groups._WORLD_GROUP = None
    ds_comm.cdb = None
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _write_config(tmp: Path, shapes: Path, name: str, **extra) -> Path:
    cfg = {
        "stage": 1,
        "output_dir": str(tmp / name),
        "model": {"preset": "tiny"},
        "data": {"root": str(shapes), "train": [{"path": "train_res.jsonl"}, {"path": "train_region_caption.jsonl"}], "batch_size": 2},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "max_steps": 2,
        "checkpoint": {"every": 2, "keep_last": 1},
        "logging": {"every": 1, "progress_bar": False, "tensorboard": False},
        "sam_cache": {"dir": str(tmp / "cache")},
        "cpu_threads": 1,
        "export_at_end": False,
        **extra,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str]) -> int:
    """``fclm-train`` in this process, environment and distributed state restored afterwards."""
    env = dict(os.environ)
    try:
        return main(args)
    finally:
        _teardown_distributed()
        os.environ.clear()
        os.environ.update(env)


@pytest.fixture(scope="module")
def runs(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-step runs (checkpoint at step 2) without DeepSpeed, with ZeRO-2 and with ZeRO-3: name → config file."""
    tmp = tmp_path_factory.mktemp("ckpt_security")
    configs = {
        "plain": _write_config(tmp, shapes_dir, "plain"),
        "zero2": _write_config(tmp, shapes_dir, "zero2", deepspeed="zero2"),
        "zero3": _write_config(tmp, shapes_dir, "zero3", deepspeed="zero3"),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cfg in configs.values():
            assert _run([str(cfg)]) == 0
    finally:
        torch.set_num_threads(threads)
    return configs


def _copy_run(runs: dict[str, Path], name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of run ``name`` (its output folder) to tamper with: (config pointing at the copy, its checkpoint)."""
    cfg = yaml.safe_load(runs[name].read_text())
    out = tmp_path / name
    shutil.copytree(cfg["output_dir"], out)
    cfg["output_dir"] = str(out)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, out / "checkpoints" / "step-00000002"


# --------------------------------------------------------------------------------------------------
# crafted files are refused, by name, and run nothing
# --------------------------------------------------------------------------------------------------

CRAFTED = [
    ("plain", "optimizer.pt"),
    ("plain", "rng_state_0.pt"),
    ("zero2", "deepspeed/mp_rank_00_model_states.pt"),
    ("zero2", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero3", "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,rel", CRAFTED, ids=[f"{n}:{Path(r).name}" for n, r in CRAFTED])
def test_export_refuses_a_crafted_checkpoint_file(runs, name: str, rel: str, tmp_path: Path, capsys):
    _, ckpt = _copy_run(runs, name, tmp_path)
    marker = tmp_path / "pwned"
    _craft(ckpt / rel, marker)
    out = tmp_path / "export"
    try:
        assert _run(["export", str(ckpt), "--out", str(out)]) == 2
    finally:  # checked first: whatever else happened, the payload must not have run
        assert not marker.exists(), "the crafted pickle ran a command"
    err = capsys.readouterr().err
    assert re.search(re.escape(str(ckpt / rel)) + ": " + REFUSED, err), err[-2000:]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name,rel", CRAFTED, ids=[f"{n}:{Path(r).name}" for n, r in CRAFTED])
def test_resume_refuses_a_crafted_checkpoint_file(runs, name: str, rel: str, tmp_path: Path):
    cfg, ckpt = _copy_run(runs, name, tmp_path)
    marker = tmp_path / "pwned"
    _craft(ckpt / rel, marker)
    try:
        with pytest.raises(ck.CheckpointError, match=re.escape(str(ckpt / rel)) + ": " + REFUSED):
            _run([str(cfg), "max_steps=3"])  # resume="auto" picks step-00000002
    finally:  # checked first: whatever else happened, the payload must not have run
        assert not marker.exists(), "the crafted pickle ran a command"


def test_deepspeed_own_loads_are_weights_only_while_it_reads_a_checkpoint(tmp_path: Path):
    """DeepSpeed calls ``torch.load(weights_only=False)`` itself; within the guard that is a restricted load too
    (so a file swapped after the check still cannot run code)."""
    marker = tmp_path / "pwned"
    _craft(tmp_path / "x.pt", marker)
    with pytest.raises(ck.CheckpointError, match=re.escape(str(tmp_path)) + ".*refused"):
        with ck.weights_only_loads(tmp_path):
            torch.load(tmp_path / "x.pt", weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is only on during the load


# --------------------------------------------------------------------------------------------------
# real checkpoints still load: the allowlist covers what DeepSpeed writes
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_real_deepspeed_checkpoints_pass_the_restricted_loader(runs, name: str):
    ckpt = Path(yaml.safe_load(runs[name].read_text())["output_dir"]) / "checkpoints" / "step-00000002"
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in ck.deepspeed_safe_globals()}
    needed: set[str] = set()
    files = sorted((ckpt / ck.DS_TAG).glob("*.pt"))
    assert files
    for f in files:
        needed |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        ck.safe_torch_load(f, allowed=ck.deepspeed_safe_globals())
    assert needed <= allowed, needed - allowed
    ck.verify_checkpoint_files(ckpt)


@pytest.mark.slow
def test_a_real_zero2_checkpoint_still_resumes_and_exports(runs, tmp_path: Path):
    from fclm.model import FCLM

    cfg, ckpt = _copy_run(runs, "zero2", tmp_path)
    assert _run(["export", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    FCLM.from_pretrained(tmp_path / "export")
    assert _run([str(cfg), "max_steps=3"]) == 0
    log = (ckpt.parent.parent / "train.log").read_text()
    assert f"resumed from {ckpt}" in log and "step 3/3" in log
