"""The ``igvg`` head's criterion (seed 001 §3.1.2 and §3.2): point-guided Hungarian matching and Eq. 5–6.

* :func:`igvg_match_costs` / :func:`point_guided_match`: Eq. 4, ``C = λ_cls·(−p_obj) + λ_L1·L1(box) +
  λ_giou·(−GIoU) + λ_point·L1(point, box centre)`` (the class cost as DETR's ``−p`` of the object class,
  boxes in cx,cy,w,h for L1 as DETR does), solved per row (expression) with ``scipy.optimize.linear_sum_assignment``.
  Query → instance matching is the query → box matching (the i-th box and i-th instance mask are one object).
* :class:`IGVGCriterion`: detection (class CE with a no-object weight, box L1, GIoU; summed over the
  decoder layers, each matched on its own as DETR's auxiliary losses), global segmentation (BCE + dice),
  instance segmentation (Eq. 6: matched queries vs their instances, the others vs an empty mask ×
  ``neg_weight``), text→image attention-map supervision (BCE + dice vs the union mask), and the
  no-target branch (weighted BCE). CoverAcc (Eq. 3) and a few diagnostics are returned as ``metric_igvg_*``.

Default weights are those of the authors' released gRefCOCO configuration (their public code:
detection ×0.1 over class 1 / L1 5 / GIoU 2; masks dice 1, BCE 1;
no-target 0.2; negative masks 0.2; attention map 0.1). Mask terms use the +1-smoothed dice of that code
(``mask_dice_loss(scale=1, eps=1)``), under which an empty target still gives a gradient.

Mask supervision is at the prediction's resolution: targets (S × S frame) are area-downsampled to the
prediction grid (soft targets) instead of upsampling Q logits per query to the frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from transformers.image_transforms import corners_to_center_format
from transformers.loss.loss_for_object_detection import center_to_corners_format, generalized_box_iou

from fclm.losses._utils import graph_zero
from fclm.losses.heads import HeadTargets
from fclm.losses.mask import mask_bce_loss, mask_dice_loss

if TYPE_CHECKING:
    from fclm.config import FCLMConfig

__all__ = [
    "IGVG_LOSS_WEIGHTS", "IGVGCriterion", "build_igvg_criterion", "igvg_match_costs", "point_guided_match",
    "cover_acc",
]

IGVG_LOSS_WEIGHTS: dict[str, float] = {
    "loss_igvg_cls": 0.1,
    "loss_igvg_box_l1": 0.5,
    "loss_igvg_box_giou": 0.2,
    "loss_igvg_mask_bce": 1.0,
    "loss_igvg_mask_dice": 1.0,
    "loss_igvg_global_bce": 1.0,
    "loss_igvg_global_dice": 1.0,
    "loss_igvg_attn": 0.1,
    "loss_igvg_exists": 0.2,
}
"""Declared loss names → default weights (module docstring: the authors' gRefCOCO configuration)."""

_EXISTS_CLASS_WEIGHTS = (1.1, 0.9)
"""(no-target, target) weights of the no-target BCE: the authors' ``refer_ce_loss`` weights [0.9, 1.1] on
their (target, empty) classes; normalised by the batch's total weight as ``F.cross_entropy`` does."""


@torch.no_grad()
def igvg_match_costs(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    pred_points: torch.Tensor | None,
    target_boxes: list[torch.Tensor],
    *,
    cost_class: float,
    cost_box_l1: float,
    cost_giou: float,
    cost_point: float,
) -> list[torch.Tensor]:
    """Eq. 4 cost matrices, computed for all rows at once (DETR's batched form) and split per row.

    Arguments:
      pred_logits: (n,Q,2) object / no-object logits; pred_boxes: (n,Q,4) cx,cy,w,h in [0,1];
      pred_points: (n,Q,2) reference points xy (None: no point term); target_boxes: n tensors (k_i,4) xyxy.
    Returns:
      n CPU float tensors (Q,k_i).
    """
    n, q = pred_logits.shape[:2]
    prob = pred_logits.detach().float().flatten(0, 1).softmax(-1)[:, 0]  # (nQ,)
    boxes = pred_boxes.detach().float().flatten(0, 1)
    tgt = torch.cat([t.float().reshape(-1, 4) for t in target_boxes]).to(boxes.device) if n else boxes.new_zeros(0, 4)
    if tgt.shape[0] == 0:
        return [torch.zeros(q, 0) for _ in range(n)]
    tgt_c = corners_to_center_format(tgt)
    cost = (
        cost_class * -prob[:, None].expand(-1, tgt.shape[0])
        + cost_box_l1 * torch.cdist(boxes, tgt_c, p=1)
        + cost_giou * -generalized_box_iou(center_to_corners_format(boxes), tgt)
    )
    if pred_points is not None:
        cost = cost + cost_point * torch.cdist(pred_points.detach().float().flatten(0, 1), tgt_c[:, :2], p=1)
    cost = cost.view(n, q, -1).cpu()
    sizes = [int(t.reshape(-1, 4).shape[0]) for t in target_boxes]
    return [c[i] for i, c in enumerate(cost.split(sizes, -1))]


@torch.no_grad()
def point_guided_match(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    pred_points: torch.Tensor | None,
    target_boxes: list[torch.Tensor],
    *,
    cost_class: float = 1.0,
    cost_box_l1: float = 5.0,
    cost_giou: float = 2.0,
    cost_point: float = 2.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hungarian assignment of queries to target boxes under :func:`igvg_match_costs`.

    Returns n pairs ``(query_idx, target_idx)`` of long tensors of length ``min(Q, k_i)`` (empty for a
    no-target row), query indices sorted ascending (``linear_sum_assignment``'s order).
    """
    costs = igvg_match_costs(pred_logits, pred_boxes, pred_points, target_boxes, cost_class=cost_class,
                             cost_box_l1=cost_box_l1, cost_giou=cost_giou, cost_point=cost_point)
    out = []
    for c in costs:
        if c.shape[1] == 0:
            empty = torch.zeros(0, dtype=torch.long)
            out.append((empty, empty.clone()))
            continue
        i, j = linear_sum_assignment(c.numpy().astype(np.float64))
        out.append((torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long)))
    return out


def cover_acc(points: torch.Tensor, target_boxes: list[torch.Tensor]) -> tuple[float, int]:
    """CoverAcc (Eq. 3): mean over rows with targets of the share of target boxes holding ≥ 1 point.

    Arguments:
      points: (n,Q,2) xy normalised; target_boxes: n tensors (k_i,4) xyxy (borders count as inside).
    Returns:
      (CoverAcc, number of rows it averages); (0.0, 0) when no row has a target.
    """
    accs = []
    for pts, boxes in zip(points.detach().float(), target_boxes):
        if boxes.shape[0] == 0:
            continue
        b = boxes.to(pts.device).float()
        inside = ((pts[None, :, 0] >= b[:, None, 0]) & (pts[None, :, 0] <= b[:, None, 2])
                  & (pts[None, :, 1] >= b[:, None, 1]) & (pts[None, :, 1] <= b[:, None, 3]))  # (k,Q)
        accs.append(float(inside.any(1).float().mean()))
    return (sum(accs) / len(accs), len(accs)) if accs else (0.0, 0)


def _downsample(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(k,S,S) {0,1} → (k,h,w) area fractions (soft targets at the prediction's resolution)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    return F.interpolate(masks[:, None].float(), size=size, mode="area")[:, 0]


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return mask_dice_loss(pred, target, scale=1.0, eps=1.0)


class IGVGCriterion:
    """Losses of the ``igvg`` head (module docstring). Built from ``cfg.heads.igvg`` (matcher costs,
    no-object weight, negative-mask weight, auxiliary losses on/off).

    ``preds`` (n rows): ``pred_logits_layers`` (n,L,Q,2), ``pred_boxes_layers`` (n,L,Q,4) cx,cy,w,h,
    ``pred_points`` (n,Q,2), ``pred_masks`` (n,Q,Hl,Wl), ``pred_global_masks`` (n,Hl,Wl),
    ``pred_text_attn`` (n,h,w), ``pred_exists`` (n,).
    """

    LOSS_WEIGHTS: dict[str, float] = IGVG_LOSS_WEIGHTS

    def __init__(self, *, cost_class: float = 1.0, cost_box_l1: float = 5.0, cost_giou: float = 2.0,
                 cost_point: float = 2.0, eos_coef: float = 0.1, neg_weight: float = 0.2, aux_loss: bool = True) -> None:
        self.costs = dict(cost_class=cost_class, cost_box_l1=cost_box_l1, cost_giou=cost_giou, cost_point=cost_point)
        self.eos_coef = eos_coef
        self.neg_weight = neg_weight
        self.aux_loss = aux_loss
        self.loss_weights = dict(IGVG_LOSS_WEIGHTS)

    def match(self, preds: Mapping[str, torch.Tensor], targets: HeadTargets, layer: int = -1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Point-guided matching of decoder layer ``layer`` (default: the last) to the target boxes."""
        return point_guided_match(
            preds["pred_logits_layers"][:, layer], preds["pred_boxes_layers"][:, layer], preds.get("pred_points"),
            targets.instance_boxes, **self.costs,
        )

    def __call__(self, preds: Mapping[str, torch.Tensor], targets: HeadTargets) -> dict[str, torch.Tensor]:
        logits_layers = preds["pred_logits_layers"]
        n = logits_layers.shape[0]
        if n == 0:
            zero = graph_zero(logits_layers, preds.get("pred_masks"))
            out = {k: zero.clone() for k in self.loss_weights}
            out.update(metric_igvg_cover_acc=zero.detach().clone(), metric_igvg_cover_rows=zero.detach().clone())
            return out
        if n != len(targets):
            raise ValueError(f"igvg head has {n} rows but {len(targets)} routed targets")
        device = logits_layers.device
        num_layers = logits_layers.shape[1]
        layers = range(num_layers) if self.aux_loss else [num_layers - 1]
        tgt_boxes = [b.to(device).float() for b in targets.instance_boxes]
        num_boxes = max(sum(int(b.shape[0]) for b in tgt_boxes), 1)
        losses: dict[str, torch.Tensor] = {}
        cls_total = l1_total = giou_total = None
        last_match = None
        for layer in layers:
            match = self.match(preds, targets, layer)
            if layer == num_layers - 1:
                last_match = match
            cls, l1, giou = self._detection(logits_layers[:, layer], preds["pred_boxes_layers"][:, layer], tgt_boxes, match, num_boxes)
            cls_total = cls if cls_total is None else cls_total + cls
            l1_total = l1 if l1_total is None else l1_total + l1
            giou_total = giou if giou_total is None else giou_total + giou
        losses["loss_igvg_cls"], losses["loss_igvg_box_l1"], losses["loss_igvg_box_giou"] = cls_total, l1_total, giou_total
        assert last_match is not None
        losses.update(self._instance_masks(preds["pred_masks"], targets, last_match))
        losses.update(self._global(preds, targets))
        losses["loss_igvg_exists"] = self._exists(preds["pred_exists"], targets.exists.to(device))
        losses.update(self._metrics(preds, targets, tgt_boxes, last_match))
        return losses

    def _detection(self, logits: torch.Tensor, boxes: torch.Tensor, tgt_boxes: list[torch.Tensor],
                   match: list[tuple[torch.Tensor, torch.Tensor]], num_boxes: int) -> tuple[torch.Tensor, ...]:
        n, q = logits.shape[:2]
        device = logits.device
        classes = torch.ones(n, q, dtype=torch.long, device=device)  # 1 = no object
        rows = torch.cat([torch.full_like(i, r) for r, (i, _) in enumerate(match)]).to(device)
        src = torch.cat([i for i, _ in match]).to(device)
        classes[rows, src] = 0
        weight = torch.tensor([1.0, self.eos_coef], device=device, dtype=torch.float32)
        cls = F.cross_entropy(logits.float().reshape(n * q, 2), classes.reshape(-1), weight=weight)
        if src.numel() == 0:
            zero = graph_zero(boxes)
            return cls, zero, zero.clone()
        src_boxes = boxes[rows, src].float()
        tgt = torch.cat([b[j.to(device)] for b, (_, j) in zip(tgt_boxes, match)])
        l1 = F.l1_loss(src_boxes, corners_to_center_format(tgt), reduction="sum") / num_boxes
        giou = (1 - torch.diag(generalized_box_iou(center_to_corners_format(src_boxes), tgt))).sum() / num_boxes
        return cls, l1, giou

    def _instance_masks(self, pred_masks: torch.Tensor, targets: HeadTargets,
                        match: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Eq. 6: L_seg of the matched (query, instance) pairs / N_pos + λ_neg · L_seg of the rest vs empty / N_neg."""
        n, q, hl, wl = pred_masks.shape
        device = pred_masks.device
        pos_pred, pos_tgt, neg_pred = [], [], []
        for r, (i, j) in enumerate(match):
            i, j = i.to(device), j.to(device)
            neg = torch.ones(q, dtype=torch.bool, device=device)
            neg[i] = False
            neg_pred.append(pred_masks[r][neg])
            if i.numel():
                pos_pred.append(pred_masks[r][i])
                pos_tgt.append(_downsample(targets.instance_masks[r].to(device)[j], (hl, wl)))
        bce = dice = graph_zero(pred_masks)
        if pos_pred:
            p, t = torch.cat(pos_pred), torch.cat(pos_tgt)
            bce, dice = mask_bce_loss(p, t), _dice(p, t)
        negs = torch.cat(neg_pred)
        if negs.shape[0] and self.neg_weight > 0:
            empty = torch.zeros_like(negs, dtype=torch.float32)
            bce = bce + self.neg_weight * mask_bce_loss(negs, empty)
            dice = dice + self.neg_weight * _dice(negs, empty)
        return {"loss_igvg_mask_bce": bce, "loss_igvg_mask_dice": dice}

    def _global(self, preds: Mapping[str, torch.Tensor], targets: HeadTargets) -> dict[str, torch.Tensor]:
        glob = preds["pred_global_masks"]
        union = targets.masks.to(glob.device)
        t = _downsample(union, tuple(glob.shape[-2:]))
        attn = preds["pred_text_attn"]
        ta = _downsample(union, tuple(attn.shape[-2:]))
        return {
            "loss_igvg_global_bce": mask_bce_loss(glob, t),
            "loss_igvg_global_dice": _dice(glob, t),
            "loss_igvg_attn": mask_bce_loss(attn, ta) + _dice(attn, ta),
        }

    def _exists(self, pred_exists: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
        t = exists.float()
        w = torch.where(exists, _EXISTS_CLASS_WEIGHTS[1], _EXISTS_CLASS_WEIGHTS[0]).float()
        bce = F.binary_cross_entropy_with_logits(pred_exists.float(), t, reduction="none")
        return (w * bce).sum() / w.sum()

    @torch.no_grad()
    def _metrics(self, preds: Mapping[str, torch.Tensor], targets: HeadTargets, tgt_boxes: list[torch.Tensor],
                 match: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        device = preds["pred_exists"].device
        out: dict[str, torch.Tensor] = {}
        acc, rows = cover_acc(preds["pred_points"], tgt_boxes)
        out["metric_igvg_cover_acc"] = torch.tensor(acc, device=device)
        out["metric_igvg_cover_rows"] = torch.tensor(float(rows), device=device)
        pred_exists = preds["pred_exists"].float() >= 0  # sigmoid ≥ 0.5
        out["metric_igvg_exists_acc"] = (pred_exists == targets.exists.to(device)).float().mean()
        boxes = preds["pred_boxes_layers"][:, -1].float()
        gious = [torch.diag(generalized_box_iou(center_to_corners_format(boxes[r, i.to(device)]), tgt_boxes[r][j.to(device)]))
                 for r, (i, j) in enumerate(match) if i.numel()]
        out["metric_igvg_matched_giou"] = torch.cat(gious).mean() if gious else torch.zeros((), device=device)
        return out


def build_igvg_criterion(*, cfg: "FCLMConfig") -> IGVGCriterion:
    """The ``igvg`` criterion with the matcher costs and weights of ``cfg.heads.igvg``."""
    c = cfg.heads.igvg
    return IGVGCriterion(cost_class=c.cost_class, cost_box_l1=c.cost_box_l1, cost_giou=c.cost_giou, cost_point=c.cost_point,
                         eos_coef=c.eos_coef, neg_weight=c.neg_weight, aux_loss=c.aux_loss)
