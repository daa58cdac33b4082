"""Seed 002's consistency losses: self-reconstruction of the region mask and the latent loss."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from fclm.losses._utils import graph_zero
from fclm.losses.mask import seg_loss

__all__ = ["self_recon_loss", "latent_loss"]


def self_recon_loss(
    pred_recon_masks: torch.Tensor,
    region_masks: torch.Tensor,
    *,
    bce_weight: float = 2.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """``L_self = L_seg(decode(token), M)`` (seed 002 Eq. 4): the mask decoded from a visual-prompt
    token against the input region mask, with LISA's BCE + dice.

    Arguments:
      pred_recon_masks: (R,Hl,Wl) low-res logits decoded from z_pos (or from the <mask> token).
      region_masks: (R,S,S) float {0,1} in the SAM frame.
    Returns:
      scalar, averaged over the R masks; exact 0 (in the graph) for R = 0.
    """
    if pred_recon_masks.shape[0] != region_masks.shape[0]:
        raise ValueError(
            f"self_recon_loss: {pred_recon_masks.shape[0]} reconstructed masks for {region_masks.shape[0]} region masks"
        )
    return seg_loss(pred_recon_masks, region_masks, bce_weight=bce_weight, dice_weight=dice_weight)


def latent_loss(
    z_seg: torch.Tensor,
    z_pos: torch.Tensor,
    pairs: torch.Tensor,
    kind: Literal["cosine", "mse", "kl"] = "cosine",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Pull each [SEG] embedding towards the (stop-gradient) <pos> embedding of the same object.

    Arguments:
      z_seg: (N,C) projected [SEG] embeddings.
      z_pos: (R,C) projected <pos> embeddings; detached here, so no gradient reaches them.
      pairs: (P,2) long rows ``(seg index, region index)``.
      kind: ``cosine`` → mean of ``1 − cos(z_seg, z_pos)`` (seed 002 Eq. 5, the default);
        ``mse`` → mean squared difference; ``kl`` → ``KL(softmax(z_pos/T) ‖ softmax(z_seg/T))`` per
        pair, summed over channels, mean over pairs, × T² (distillation convention).
    Returns:
      scalar; exact 0 (in the graph of ``z_seg``) when there are no pairs.
    """
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"latent_loss: pairs must be (P,2), got {tuple(pairs.shape)}")
    if pairs.shape[0] == 0:
        return graph_zero(z_seg)
    seg_idx, pos_idx = pairs[:, 0].long(), pairs[:, 1].long()
    if int(seg_idx.max()) >= z_seg.shape[0] or int(pos_idx.max()) >= z_pos.shape[0] or int(pairs.min()) < 0:
        raise ValueError(
            f"latent_loss: pairs {pairs.tolist()} index outside {z_seg.shape[0]} [SEG] and {z_pos.shape[0]} region embeddings"
        )
    a = z_seg[seg_idx].float()
    b = z_pos[pos_idx].detach().float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean()
    if kind == "mse":
        return F.mse_loss(a, b, reduction="mean")
    if kind == "kl":
        t = float(temperature)
        kl = F.kl_div(F.log_softmax(a / t, -1), F.log_softmax(b / t, -1), reduction="batchmean", log_target=True)
        return kl * t * t
    raise ValueError(f"latent_loss: unknown kind {kind!r}; choose cosine, mse or kl")
