"""optim.fused: which AdamW implementation a run gets, and that the fused one takes the same steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fclm.training.config import OptimConfig, TrainConfig, train_config_from_dict
from fclm.training.loop import build_optimizer


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_build_optimizer_follows_optim_fused():
    model = _net()
    off, _ = build_optimizer(TrainConfig(), model, None)
    on, _ = build_optimizer(TrainConfig(optim=OptimConfig(fused=True)), model, None)
    assert on.defaults["fused"] is True
    # off = torch's own choice (None), not an explicit False, which would also switch off foreach on GPU
    assert off.defaults["fused"] is None and off.defaults["foreach"] is None


def test_fused_steps_match_the_per_tensor_loop():
    """Ten AdamW steps (weight decay, two groups) with fused=True and with torch's per-tensor loop
    (foreach=False, its CPU default) end at the same weights."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    start = torch.cat([p.detach().flatten() for p in _net().parameters()])
    ends = []
    for kwargs in ({"fused": True}, {"foreach": False}):
        net = _net()
        groups = [{"params": [net[0].weight, net[2].weight], "weight_decay": 0.01},
                  {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **kwargs)
        for _ in range(10):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        ends.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert (ends[0] - start).abs().max() > 1e-2  # the steps moved the weights
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [True, False])
def test_optim_fused_reads_from_the_yaml(value):
    assert train_config_from_dict({"optim": {"fused": value}}, check_files=False).optim.fused is value
