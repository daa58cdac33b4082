"""Checkpoints: atomic (a save killed half-way leaves the previous one usable), last K kept, keys checked, RNG restored."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import fclm.training.checkpoint as ck


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.frozen.requires_grad_(False)


def _setup(seed: int = 0):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    acc = Accelerator(cpu=True)
    model = Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model, opt = acc.prepare(model, opt)
    return acc, model, opt, sched


def _step(model, opt, sched) -> None:
    loss = model.head(model.frozen(torch.ones(4, 3))).pow(2).sum()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_keep_last_k_and_latest(tmp_path: Path):
    acc, model, opt, sched = _setup()
    for step in range(1, 6):
        _step(model, opt, sched)
        ck.save_checkpoint(acc, model, opt, sched, tmp_path, step, {"sampler": {"position": step}}, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"
    files = {p.name for p in (tmp_path / "step-00000005").iterdir()}
    assert files == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json"}
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "step-00000005" / "model.safetensors"))) == {"head.weight", "head.bias"}


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    acc, model, opt, sched = _setup()
    _step(model, opt, sched)
    ck.save_checkpoint(acc, model, opt, sched, tmp_path, 1, {"sampler": {}}, keep_last=3)
    saved_head = model.head.weight.detach().clone()
    _step(model, opt, sched)
    real_save = torch.save

    def killed(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(acc, model, opt, sched, tmp_path, 2, {"sampler": {}}, keep_last=3)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert (tmp_path / ".tmp-step-00000002").is_dir(), "the half-written checkpoint stays under its temporary name"
    assert ck.latest_checkpoint(tmp_path).name == "step-00000001"
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    # resuming reads the complete one
    acc2, model2, opt2, sched2 = _setup(seed=5)
    state = ck.load_checkpoint(acc2, model2, opt2, sched2, ck.latest_checkpoint(tmp_path))
    assert state["step"] == 1 and torch.equal(model2.head.weight, saved_head)
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == 1
    # the next save clears the leftover
    ck.save_checkpoint(acc2, model2, opt2, sched2, tmp_path, 2, {"sampler": {}}, keep_last=3)
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]


def test_loading_checks_missing_and_unexpected_keys(tmp_path: Path):
    acc, model, opt, sched = _setup()
    ck.save_checkpoint(acc, model, opt, sched, tmp_path, 1, {"sampler": {}}, keep_last=1)
    acc2, model2, opt2, sched2 = _setup()
    model2.frozen.requires_grad_(True)  # another trainability policy: more trainable parameters
    with pytest.raises(ck.CheckpointError, match=r"2 missing \['frozen.bias', 'frozen.weight'\], 0 unexpected"):
        ck.load_checkpoint(acc2, model2, opt2, sched2, tmp_path / "step-00000001")
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.read_trainer_state(tmp_path)


def test_rng_round_trip():
    state = ck.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ck.restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    # what torch.load(weights_only=True) can read
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
