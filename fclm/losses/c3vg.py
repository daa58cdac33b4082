"""The ``c3vg`` head's criterion (seed 000): box L1 + GIoU and mask BCE + dice at both stages, and the
bidirectional mask↔box consistency terms, made differentiable in both directions.

Predictions (from :class:`fclm.model.heads.c3vg.C3VGHead`), n rows, one per routed ``[SEG]``:
``pred_masks`` / ``pred_coarse_masks`` (n,Hl,Wl) low-res logits in the S × S SAM frame and
``pred_boxes`` / ``pred_coarse_boxes`` (n,4) normalised xyxy of that frame.

Targets (:class:`fclm.losses.heads.HeadTargets`): C3VG grounds one target per query, so a query's
target mask is the union mask and its target box the box enclosing all its instance boxes (a REC/RES
sample has one instance). A no-target query (``exists`` False, no instance) keeps the mask losses toward
the empty mask and is left out of the box and consistency terms (its box means nothing).

Consistency (both computed on the low-res grid, which covers the same frame as the boxes):

* mask→box, :func:`mask_to_box_consistency`: the box should contain the mask's mass,
  ``1 − Σ p·cov(box) / Σ p`` with ``p = sigmoid(mask)`` and ``cov`` each cell's covered fraction.
* box→mask, :func:`box_to_mask_consistency`: the mask's extent should match the box: the mask's
  max-projections on the x and y axes against the box's coverage of each column / row, by a squared
  dice (BoxInst's projection term; 0 exactly when the projections agree).

The public C3VG code thresholds the mask (``sigmoid > 0.5``) and rounds the box to integer pixels
before both terms: its mask-in-box ratio carries no gradient at all, and its box-vs-mask-outer-box
term reaches only the box. Here the mask enters as probabilities and the box through the exact
fractional coverage of each cell (piecewise linear in the box edges), so each term sends gradients to
the mask *and* to the box; on a binary mask and a pixel-aligned box the values equal the hard ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, TYPE_CHECKING

import torch
from torchvision.ops import box_iou, generalized_box_iou_loss

from fclm.losses._utils import graph_zero
from fclm.losses.heads import HeadTargets, mask_frame_boxes
from fclm.losses.mask import mask_bce_loss, mask_dice_loss, upsample_logits

if TYPE_CHECKING:
    from fclm.config import FCLMConfig

__all__ = [
    "C3VGCriterion", "C3VG_LOSS_WEIGHTS", "build_c3vg_criterion", "box_axis_coverage", "box_coverage",
    "mask_to_box_consistency", "box_to_mask_consistency", "union_boxes",
]

C3VG_LOSS_WEIGHTS: dict[str, float] = {
    "loss_c3vg_box_l1": 5.0,
    "loss_c3vg_box_giou": 2.0,
    "loss_c3vg_mask_bce": 2.0,
    "loss_c3vg_mask_dice": 1.0,
    "loss_c3vg_coarse_box_l1": 1.5,
    "loss_c3vg_coarse_box_giou": 0.6,
    "loss_c3vg_coarse_mask_bce": 0.6,
    "loss_c3vg_coarse_mask_dice": 0.3,
    "loss_c3vg_cons_mask_to_box": 0.5,
    "loss_c3vg_cons_box_to_mask": 0.5,
}
"""Default weights. Refined stage: DETR's box L1 5 / GIoU 2 and LISA's mask BCE 2 / dice 1 (the ``sam``
head's); the coarse stage at 0.3 of those (the public code's stage weights: first 0.3, second 1.0).
Consistency 0.5 each (our choice: the public weights do not transfer, its mask-in-box term has no
gradient and its box term is a 5·L1 + 2·GIoU box loss; ours are in [0, 1])."""

_EPS = 1e-6


def box_axis_coverage(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Covered fraction of each row and column of a ``height × width`` grid over [0,1]² by each box.

    Arguments:
      boxes: (n,4) normalised xyxy.
    Returns:
      rows (n,height), cols (n,width), each in [0, 1]; cell (i, j) is covered ``rows[i]·cols[j]``.
      Piecewise linear in the box edges: an edge inside a cell moves that cell's fraction.
    """
    boxes = boxes.float()
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    y1, y2 = boxes[:, 1:2] * height, boxes[:, 3:4] * height
    x1, x2 = boxes[:, 0:1] * width, boxes[:, 2:3] * width
    rows = (torch.minimum(y2, ys + 1) - torch.maximum(y1, ys)).clamp(min=0)
    cols = (torch.minimum(x2, xs + 1) - torch.maximum(x1, xs)).clamp(min=0)
    return rows, cols


def box_coverage(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n,4) normalised xyxy → (n,height,width) covered fraction of each grid cell (a soft box raster)."""
    rows, cols = box_axis_coverage(boxes, height, width)
    return rows[:, :, None] * cols[:, None, :]


def mask_to_box_consistency(mask_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per query, the share of the mask's mass outside its box: ``1 − Σ p·cov / Σ p`` (n,), in [0, 1].

    Arguments:
      mask_logits: (n,h,w) logits on a grid over the whole frame.
      boxes: (n,4) normalised xyxy of the same frame.
    """
    p = mask_logits.float().sigmoid()
    cov = box_coverage(boxes, p.shape[-2], p.shape[-1])
    inside = (p * cov).flatten(1).sum(1)
    return 1 - (inside + _EPS) / (p.flatten(1).sum(1) + _EPS)


def _squared_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − 2Σab / (Σa² + Σb²)`` over the last dim; 0 exactly when ``a == b`` (also for fractional b)."""
    return 1 - (2 * (a * b).sum(-1) + _EPS) / ((a * a).sum(-1) + (b * b).sum(-1) + _EPS)


def box_to_mask_consistency(mask_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per query, how far the mask's extent is from its box (n,), in [0, 1].

    The mask's column occupancy ``max_rows p`` against the box's column coverage, and the same for rows,
    each by :func:`_squared_dice`; the mean of the two.
    """
    p = mask_logits.float().sigmoid()
    rows, cols = box_axis_coverage(boxes, p.shape[-2], p.shape[-1])
    return 0.5 * (_squared_dice(p.amax(dim=-2), cols) + _squared_dice(p.amax(dim=-1), rows))


def union_boxes(instance_boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the box enclosing all its instance boxes: (n,4) xyxy and (n,) bool "has a box"."""
    n = len(instance_boxes)
    device = instance_boxes[0].device if n else torch.device("cpu")
    out = torch.zeros((n, 4), device=device)
    has = torch.zeros(n, dtype=torch.bool, device=device)
    for i, b in enumerate(instance_boxes):
        if b.shape[0]:
            b = b.to(device).float()
            out[i] = torch.cat([b[:, :2].amin(0), b[:, 2:].amax(0)])
            has[i] = True
    return out, has


class C3VGCriterion:
    """Box, mask and consistency losses of the ``c3vg`` head, coarse and refined stages.

    Normalisation: mask terms as :mod:`fclm.losses.mask` (per-mask values summed ÷ n, all n queries,
    no-target queries toward the empty mask); box L1 (summed over the 4 coordinates) and 1 − GIoU
    summed ÷ the number of queries with a target box (DETR's ``num_boxes``); consistency terms the
    mean over those queries of the mean over the two stages (each stage's mask with its own box).

    Arguments:
      consistency: compute the two consistency terms (``heads.c3vg.consistency``); off, they are exact
        graph zeros and nothing of them reaches the gradients.
    """

    LOSS_WEIGHTS: ClassVar[dict[str, float]] = C3VG_LOSS_WEIGHTS

    def __init__(self, *, consistency: bool = True) -> None:
        self.consistency = consistency
        self.loss_weights: dict[str, float] = dict(self.LOSS_WEIGHTS)

    def __call__(self, preds: Mapping[str, torch.Tensor], targets: HeadTargets) -> dict[str, torch.Tensor]:
        masks, coarse_masks = preds["pred_masks"], preds["pred_coarse_masks"]
        boxes, coarse_boxes = preds["pred_boxes"], preds["pred_coarse_boxes"]
        n = masks.shape[0]
        if n == 0:
            zero = graph_zero(masks, boxes)
            return {k: zero.clone() for k in self.loss_weights}
        for name, t, shape in (("pred_masks", masks, 3), ("pred_coarse_masks", coarse_masks, 3),
                               ("pred_boxes", boxes, 2), ("pred_coarse_boxes", coarse_boxes, 2)):
            if t.ndim != shape or t.shape[0] != len(targets):
                raise ValueError(f"c3vg head {name} {tuple(t.shape)} do not match the {len(targets)} routed targets")

        target_masks = targets.masks.to(masks.device).float()
        target_boxes, has_box = union_boxes(targets.instance_boxes)
        has_box = has_box.to(boxes.device) & targets.exists.to(boxes.device).bool()
        target_boxes = target_boxes.to(boxes.device)
        num_boxes = int(has_box.sum())

        losses: dict[str, torch.Tensor] = {}
        # Terms with nothing to learn from are exact zeros on the graph of the predictions they would
        # use, so every head parameter still receives a (zero) gradient.
        for stage, m, b in (("", masks, boxes), ("coarse_", coarse_masks, coarse_boxes)):
            up = upsample_logits(m.float(), tuple(target_masks.shape[-2:]))
            losses[f"loss_c3vg_{stage}mask_bce"] = mask_bce_loss(up, target_masks)
            losses[f"loss_c3vg_{stage}mask_dice"] = mask_dice_loss(up, target_masks)
            if num_boxes:
                pb, tb = b[has_box].float(), target_boxes[has_box]
                losses[f"loss_c3vg_{stage}box_l1"] = (pb - tb).abs().sum() / num_boxes
                losses[f"loss_c3vg_{stage}box_giou"] = generalized_box_iou_loss(pb, tb, reduction="sum") / num_boxes
            else:
                losses[f"loss_c3vg_{stage}box_l1"] = graph_zero(b)
                losses[f"loss_c3vg_{stage}box_giou"] = graph_zero(b)

        if self.consistency and num_boxes:
            pairs = ((masks[has_box], boxes[has_box]), (coarse_masks[has_box], coarse_boxes[has_box]))
            for name, term in (("mask_to_box", mask_to_box_consistency), ("box_to_mask", box_to_mask_consistency)):
                losses[f"loss_c3vg_cons_{name}"] = sum(term(m, b).sum() for m, b in pairs) / (2 * num_boxes)
        else:
            zero = graph_zero(masks) + graph_zero(boxes) + graph_zero(coarse_masks) + graph_zero(coarse_boxes)
            losses["loss_c3vg_cons_mask_to_box"] = zero
            losses["loss_c3vg_cons_box_to_mask"] = zero.clone()

        losses.update(self._metrics(masks, boxes, coarse_boxes, target_masks, target_boxes, has_box))
        metrics = {k: v for k, v in losses.items() if k.startswith("metric_")}
        return {**{k: losses[k] for k in self.loss_weights}, **metrics}

    @torch.no_grad()
    def _metrics(
        self,
        masks: torch.Tensor,
        boxes: torch.Tensor,
        coarse_boxes: torch.Tensor,
        target_masks: torch.Tensor,
        target_boxes: torch.Tensor,
        has_box: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Detached diagnostics over the queries with a target box (none when there are none)."""
        if not bool(has_box.any()):
            return {}
        out: dict[str, torch.Tensor] = {}
        tb = target_boxes[has_box]
        for stage, b in (("", boxes), ("coarse_", coarse_boxes)):
            out[f"metric_c3vg_{stage}box_iou"] = box_iou(b[has_box].float(), tb).diagonal().nan_to_num(0.0).mean()
        pred = upsample_logits(masks[has_box].float(), tuple(target_masks.shape[-2:])) > 0
        t = target_masks[has_box] > 0.5
        inter = (pred & t).flatten(1).sum(1).float()
        union = (pred | t).flatten(1).sum(1).float()
        out["metric_c3vg_mask_iou"] = (inter / union.clamp(min=1)).mean()
        # The hard agreement the consistency terms aim at: refined box vs the refined mask's tight box.
        mask_boxes = mask_frame_boxes(pred.float())
        out["metric_c3vg_mask_box_iou"] = box_iou(mask_boxes, boxes[has_box].float()).diagonal().nan_to_num(0.0).mean()
        return out


def build_c3vg_criterion(*, cfg: "FCLMConfig") -> C3VGCriterion:
    """The criterion of the ``c3vg`` head, with ``heads.c3vg.consistency`` from the model config."""
    return C3VGCriterion(consistency=cfg.heads.c3vg.consistency)
