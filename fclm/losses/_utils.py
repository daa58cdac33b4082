"""Small helpers shared by the loss modules."""

from __future__ import annotations

import torch


def graph_zero(*candidates: torch.Tensor | None) -> torch.Tensor:
    """An exact scalar 0 that is part of the autograd graph of the first tensor given.

    Summing an empty slice keeps the value exactly 0 (even if the tensor holds inf/NaN, unlike
    ``0 * x.sum()``) while ``backward()`` still works and sends zero gradients. With no tensor
    given, a plain CPU 0.
    """
    for t in candidates:
        if t is not None:
            return t.reshape(-1)[:0].float().sum()
    return torch.zeros(())
