"""MLPProjector: LISA's Linear-ReLU-Linear layout and its output computed by hand; FeatureStandardize's
statistics against a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fclm.model.projectors import MLPProjector, FeatureStandardize


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


def _standardized(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (x - mean) / torch.sqrt(var + eps)


def test_feature_standardize_moving_average_by_hand() -> None:
    norm = FeatureStandardize(3, momentum=0.25).train()
    a, b = torch.randn(6, 3) * 4 + 2, torch.randn(5, 3) * 0.5 - 1
    # the first batch sets the statistics (population variance) and is normalised with them
    torch.testing.assert_close(norm(a), _standardized(a, a.mean(0), a.var(0, unbiased=False)))
    torch.testing.assert_close(norm.running_mean, a.mean(0))
    torch.testing.assert_close(norm.running_var, a.var(0, unbiased=False))
    # a later batch is blended in first, then normalised with the blend
    mean = 0.75 * a.mean(0) + 0.25 * b.mean(0)
    var = 0.75 * a.var(0, unbiased=False) + 0.25 * b.var(0, unbiased=False)
    torch.testing.assert_close(norm(b), _standardized(b, mean, var))
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)
    assert int(norm.num_batches) == 2
    # inference uses the same statistics, row by row: a row's output does not depend on its batch mates
    norm.eval()
    x = torch.randn(5, 3)
    torch.testing.assert_close(norm(x), _standardized(x, mean, var))
    torch.testing.assert_close(norm(x)[:2], norm(x[:2]))


def test_feature_standardize_keeps_precision_for_a_tiny_spread() -> None:
    """h[SEG] of a random LLM: a spread ~1e-3 around a mean of ~1 (E[x²] − E[x]² in float32 would lose it)."""
    x = (1.0 + 1e-3 * torch.randn(64, 8, dtype=torch.float64)).float()
    norm = FeatureStandardize(8).train()
    norm(x)
    torch.testing.assert_close(norm.running_var, x.double().var(0, unbiased=False).float(), rtol=1e-4, atol=0)


def test_feature_standardize_frozen_and_no_grad_keep_statistics() -> None:
    norm = FeatureStandardize(4).train()
    norm(torch.randn(8, 4) * 3)
    before = norm.running_mean.clone()
    norm.update_stats = False  # a frozen projector keeps its statistics and uses them
    many = torch.randn(7, 4) + 10
    torch.testing.assert_close(norm(many), _standardized(many, before, norm.running_var))
    torch.testing.assert_close(norm.running_mean, before)
    norm.update_stats = True
    with torch.no_grad():  # a no-grad forward (generation, probes) changes nothing
        norm(many)
    torch.testing.assert_close(norm.running_mean, before)
    one = FeatureStandardize(4).train()
    one(torch.randn(1, 4))  # one row: no variance to estimate, statistics untouched
    assert int(one.num_batches) == 0 and torch.equal(one.running_var, torch.ones(4))
    # the statistics are detached: the gradient is that of a fixed affine map
    x = torch.randn(6, 4, requires_grad=True)
    FeatureStandardize(4).train()(x).sum().backward()
    torch.testing.assert_close(x.grad, (1.0 / torch.sqrt(x.detach().var(0, unbiased=False) + 1e-5)).expand(6, 4))
    with pytest.raises(ValueError, match="momentum"):
        FeatureStandardize(4, momentum=0.0)


def test_input_norm_standardises_before_the_mlp() -> None:
    proj = MLPProjector(in_dim=8, out_dim=4, input_norm=True)
    x = torch.randn(6, 8) * 5 + 3
    out = proj(x)
    torch.testing.assert_close(out, proj.layers((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)))
    assert {"norm.running_mean", "norm.running_var", "norm.num_batches"} <= set(proj.state_dict())
    assert MLPProjector(in_dim=8, out_dim=4).norm is None
