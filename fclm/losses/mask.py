"""Mask losses with LISA's conventions (``sigmoid_ce_loss`` / ``dice_loss`` in LISA's ``model/LISA.py``).

Both take logits and {0,1} targets of the same (N,H,W) shape, compute one value per mask, sum them
and divide by the number of masks. ``transformers.loss.loss_for_object_detection.dice_loss`` uses a
+1 smoothing without LISA's 1/1000 scale, so the dice here is written out to keep LISA's numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mask_bce_loss", "mask_dice_loss", "upsample_logits", "seg_loss"]


def _check(pred_logits: torch.Tensor, targets: torch.Tensor) -> None:
    if pred_logits.shape != targets.shape or pred_logits.ndim != 3:
        raise ValueError(f"mask logits and targets must both be (N,H,W), got {tuple(pred_logits.shape)} and {tuple(targets.shape)}")


def _num(num_masks: float | None, n: int) -> float:
    return float(n if num_masks is None else num_masks)


def mask_bce_loss(pred_logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """Σ over masks of the per-mask mean sigmoid BCE, ÷ ``num_masks`` (default N; 0 masks → exact 0).

    Arguments:
      pred_logits: (N,H,W) mask logits.
      targets: (N,H,W) float {0,1}.
    """
    _check(pred_logits, targets)
    loss = F.binary_cross_entropy_with_logits(pred_logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(1).sum() / max(_num(num_masks, pred_logits.shape[0]), 1.0)


def mask_dice_loss(
    pred_logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float | None = None,
    scale: float = 1000.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Σ over masks of ``1 − (2·Σ(p·t)/scale + eps) / ((Σp + Σt)/scale + eps)``, ÷ ``num_masks``.

    ``p = sigmoid(logits)``; ``scale`` 1000 and ``eps`` 1e-6 as LISA (an empty target and an all-zero
    prediction give ≈ 0; an empty target with a non-empty prediction is penalised).
    """
    _check(pred_logits, targets)
    p = pred_logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    numerator = 2 * (p / scale * t).sum(-1)
    denominator = (p / scale).sum(-1) + (t / scale).sum(-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    return loss.sum() / max(_num(num_masks, pred_logits.shape[0]), 1.0)


def upsample_logits(low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,Hl,Wl) → (N,H,W) bilinear, ``align_corners=False`` (SAM's upsampling to its frame)."""
    if tuple(low_res.shape[-2:]) == tuple(size):
        return low_res
    return F.interpolate(low_res.unsqueeze(1), size, mode="bilinear", align_corners=False).squeeze(1)


def seg_loss(
    pred_low_res: torch.Tensor,
    target_masks: torch.Tensor,
    *,
    bce_weight: float = 2.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """``L_seg = bce_weight·BCE + dice_weight·dice`` of low-res logits upsampled to the targets' size."""
    pred = upsample_logits(pred_low_res, tuple(target_masks.shape[-2:]))
    return bce_weight * mask_bce_loss(pred, target_masks) + dice_weight * mask_dice_loss(pred, target_masks)
