"""MLPProjector: LISA's Linear-ReLU-Linear layout and its output computed by hand; RunningStandardize's
moving averages against a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fclm.model.projectors import MLPProjector, RunningStandardize


def test_two_layers_is_lisa_text_hidden_fcs() -> None:
    proj = MLPProjector(in_dim=128, out_dim=64, num_layers=2)
    kinds = [type(m) for m in proj.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert proj.layers[0].weight.shape == (128, 128) and proj.layers[2].weight.shape == (64, 128)
    x = torch.randn(5, 128)
    l1, l2 = proj.layers[0], proj.layers[2]
    expected = (x @ l1.weight.T + l1.bias).clamp(min=0) @ l2.weight.T + l2.bias
    torch.testing.assert_close(proj(x), expected)
    assert (proj(x) < 0).any()  # no final activation


def test_depths() -> None:
    assert [type(m) for m in MLPProjector(in_dim=8, out_dim=4, num_layers=1).layers] == [nn.Linear]
    three = MLPProjector(in_dim=8, out_dim=4, num_layers=3, hidden_dim=16)
    assert [m.weight.shape for m in three.layers if isinstance(m, nn.Linear)] == [(16, 8), (16, 16), (4, 16)]
    assert three(torch.randn(2, 7, 8)).shape == (2, 7, 4)
    with pytest.raises(ValueError, match="num_layers >= 1"):
        MLPProjector(in_dim=8, out_dim=4, num_layers=0)


def test_running_standardize_moving_average_by_hand() -> None:
    norm = RunningStandardize(3, momentum=0.25).train()
    a, b = torch.randn(6, 3) * 4 + 2, torch.randn(5, 3) * 0.5 - 1
    out_a = norm(a)
    # the first batch sets the statistics (population variance) and is normalised with them
    torch.testing.assert_close(norm.running_mean, a.mean(0))
    torch.testing.assert_close(norm.running_var, a.var(0, unbiased=False))
    torch.testing.assert_close(out_a, (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + norm.eps))
    out_b = norm(b)
    mean = 0.75 * a.mean(0) + 0.25 * b.mean(0)
    var = 0.75 * a.var(0, unbiased=False) + 0.25 * b.var(0, unbiased=False)
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    torch.testing.assert_close(out_b, (b - mean) / torch.sqrt(var + norm.eps))
    assert int(norm.num_batches) == 2


def test_running_standardize_rows_do_not_see_their_batch() -> None:
    """Unlike BatchNorm: a row's output depends on the running statistics only, not on its batch mates."""
    norm = RunningStandardize(4).train()
    norm(torch.randn(8, 4) * 3)
    frozen = copy.deepcopy(norm).eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(frozen(x)[:2], frozen(x[:2]))
    before = norm.running_mean.clone()
    frozen(torch.randn(7, 4) + 10)  # eval: no update
    torch.testing.assert_close(frozen.running_mean, before)
    norm.update_stats = False  # a frozen projector keeps its statistics in training too
    norm(torch.randn(7, 4) + 10)
    torch.testing.assert_close(norm.running_mean, before)
    with torch.no_grad():  # and so does a no-grad forward
        RunningStandardize(4).train()(torch.randn(3, 4))
    one = RunningStandardize(4).train()
    one(torch.randn(1, 4))  # one row: no variance to estimate, statistics untouched
    assert int(one.num_batches) == 0 and torch.equal(one.running_var, torch.ones(4))
    with pytest.raises(ValueError, match="momentum"):
        RunningStandardize(4, momentum=0.0)


def test_input_norm_standardises_before_the_mlp() -> None:
    proj = MLPProjector(in_dim=8, out_dim=4, input_norm=True)
    x = torch.randn(6, 8) * 5 + 3
    out = proj(x)
    torch.testing.assert_close(out, proj.layers((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)))
    assert {"norm.running_mean", "norm.running_var", "norm.num_batches"} <= set(proj.state_dict())
    assert MLPProjector(in_dim=8, out_dim=4).norm is None
