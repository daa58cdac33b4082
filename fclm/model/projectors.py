"""MLP projectors between the LLM hidden space and the SAM prompt space.

FCLM uses three: ``seg_projector`` (h[SEG] → z_seg), ``pos_projector`` (<pos> token → z_pos) and,
for the self-reconstruction ablation, ``mask_projector`` (<mask> token → prompt space).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLPProjector"]


class MLPProjector(nn.Module):
    """LISA-style ``text_hidden_fcs``: ``Linear → ReLU → … → Linear``, no final activation.

    Arguments:
      in_dim: input width (e.g. LLM hidden size).
      out_dim: output width (e.g. SAM prompt dim).
      num_layers: number of Linear layers (≥ 1); 2 gives LISA's ``Linear(in, in) → ReLU → Linear(in, out)``.
      hidden_dim: width of the hidden layers; defaults to ``in_dim`` as in LISA.
    """

    def __init__(self, *, in_dim: int, out_dim: int, num_layers: int = 2, hidden_dim: int | None = None) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLPProjector needs num_layers >= 1, got {num_layers}")
        hidden = in_dim if hidden_dim is None else hidden_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, in_dim) → (…, out_dim)."""
        return self.layers(x)
