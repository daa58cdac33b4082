"""What a grounding head's criterion receives: :class:`HeadTargets`, and the ``sam`` head's criterion.

A head criterion is called as ``criterion(preds, targets)`` with the head's outputs (``pred_*`` rows of
the n ``[SEG]`` tokens routed to it, see :mod:`fclm.model.heads.base`) and the targets of those same
n queries, and returns every ``loss_*`` name it declared when registering (an exact graph zero where it
has nothing to learn from) plus optional detached ``metric_*`` diagnostics.

Coordinates: masks are in the S × S SAM frame (the resized image at the top-left, zero padding
bottom/right, as :class:`fclm.processor.FCLMProcessor` builds them); boxes are normalised xyxy of that
frame, so a box and a mask of the same object line up on the frame grid that heads see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fclm.losses._utils import graph_zero
from fclm.losses.mask import mask_bce_loss, mask_dice_loss, upsample_logits

__all__ = ["HeadTargets", "head_targets", "mask_frame_boxes", "SamCriterion", "SAM_LOSS_WEIGHTS"]


@dataclass
class HeadTargets:
    """Targets of the n queries routed to one head, row-aligned with its outputs.

    Attributes:
      masks: (n,S,S) float {0,1}, the union of each query's instances (empty for a no-target query).
      exists: (n,) bool, whether the query refers to anything.
      instance_masks: n tensors (k_i,S,S), one mask per target instance (k_i = 0: no target).
      instance_boxes: n tensors (k_i,4), normalised xyxy of the S × S frame.
      valid_hw: (n,2) long, size (h, w) of the query's resized image inside the frame.
    """

    masks: torch.Tensor
    exists: torch.Tensor
    instance_masks: list[torch.Tensor]
    instance_boxes: list[torch.Tensor]
    valid_hw: torch.Tensor

    def __post_init__(self) -> None:
        n = self.masks.shape[0]
        if self.masks.ndim != 3 or self.exists.shape != (n,) or len(self.instance_masks) != n or len(self.instance_boxes) != n:
            raise ValueError(
                f"HeadTargets rows disagree: masks {tuple(self.masks.shape)}, exists {tuple(self.exists.shape)}, "
                f"{len(self.instance_masks)} instance mask sets, {len(self.instance_boxes)} instance box sets"
            )
        for i, (m, b) in enumerate(zip(self.instance_masks, self.instance_boxes)):
            if m.ndim != 3 or b.shape != (m.shape[0], 4):
                raise ValueError(f"HeadTargets query {i}: instance masks {tuple(m.shape)} and boxes {tuple(b.shape)} disagree")

    @property
    def frame_size(self) -> int:
        return int(self.masks.shape[-1])

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def head_targets(batch: Mapping[str, Any], query_index: torch.Tensor) -> HeadTargets:
    """The :class:`HeadTargets` of the queries ``query_index`` (into the batch's N ``[SEG]`` s).

    Record boxes are normalised to the original image; the image fills ``sam_valid_hw`` of the S × S
    frame, so a frame box is the image box scaled by ``valid / S`` per axis (a batch without
    ``sam_valid_hw`` / ``seg_batch_index`` is taken to fill the whole frame).
    """
    target_masks = batch.get("target_masks")
    if target_masks is None:
        raise ValueError("the head has predictions but the batch has no target_masks")
    device = target_masks.device
    qi = query_index.to(device).long()
    if qi.numel() and int(qi.max()) >= target_masks.shape[0]:
        raise ValueError(f"query_index {qi.tolist()} outside the batch's {target_masks.shape[0]} targets")
    s = int(target_masks.shape[-1])
    if batch.get("sam_valid_hw") is not None and batch.get("seg_batch_index") is not None:
        images = batch["seg_batch_index"].to(device).long()[qi]
        valid_hw = batch["sam_valid_hw"].to(device).long()[images]
    else:
        valid_hw = torch.full((qi.shape[0], 2), s, dtype=torch.long, device=device)
    inst_masks = batch.get("target_instance_masks")
    inst_boxes = batch.get("target_instance_boxes")
    masks_out, boxes_out = [], []
    for row, q in enumerate(qi.tolist()):
        if inst_masks is not None and inst_boxes is not None:
            scale = torch.stack([valid_hw[row, 1], valid_hw[row, 0], valid_hw[row, 1], valid_hw[row, 0]]).float() / s
            masks_out.append(inst_masks[q].to(device).float())
            boxes_out.append((inst_boxes[q].to(device).float() * scale).reshape(-1, 4))
        else:  # a hand-made batch without instance lists: its union mask is the one instance
            m = target_masks[q][None].float()[: int(bool(target_masks[q].any()))]
            masks_out.append(m)
            boxes_out.append(mask_frame_boxes(m))
    return HeadTargets(
        masks=target_masks[qi].float(),
        exists=(batch["target_exists"].to(device).bool() if batch.get("target_exists") is not None
                else target_masks.flatten(1).any(1))[qi],
        instance_masks=masks_out,
        instance_boxes=boxes_out,
        valid_hw=valid_hw,
    )


def mask_frame_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(k,S,S) {0,1} masks → (k,4) tight boxes, normalised xyxy of the frame (pixel edges; empty → zeros)."""
    k, h, w = masks.shape
    out = masks.new_zeros((k, 4), dtype=torch.float32)
    for i in range(k):
        ys, xs = torch.nonzero(masks[i] > 0.5, as_tuple=True)
        if ys.numel():
            out[i] = torch.stack([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]).float()
    return out


SAM_LOSS_WEIGHTS: dict[str, float] = {"loss_mask_bce": 2.0, "loss_mask_dice": 1.0}
"""The ``sam`` head's loss names and LISA's weights (λ_bce 2, λ_dice 1)."""


class SamCriterion:
    """The ``sam`` head: BCE + dice of its one mask per query (logits upsampled to the frame) vs the union target.

    A no-target query keeps its empty target: the head learns to predict an empty mask for it.
    """

    loss_weights = SAM_LOSS_WEIGHTS

    def __call__(self, preds: Mapping[str, torch.Tensor], targets: HeadTargets) -> dict[str, torch.Tensor]:
        pred = preds["pred_masks"]
        if pred.shape[0] == 0:
            zero = graph_zero(pred)
            return {"loss_mask_bce": zero, "loss_mask_dice": zero.clone()}
        if pred.ndim != 3 or pred.shape[0] != len(targets):
            raise ValueError(f"sam head pred_masks {tuple(pred.shape)} do not match the {len(targets)} routed targets")
        t = targets.masks.to(pred.device)
        pred = upsample_logits(pred, tuple(t.shape[-2:]))
        return {"loss_mask_bce": mask_bce_loss(pred, t), "loss_mask_dice": mask_dice_loss(pred, t)}
