"""MLPProjector: LISA's Linear-ReLU-Linear layout and its output computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fclm.model.projectors import MLPProjector


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
