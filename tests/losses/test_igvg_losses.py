"""The ``igvg`` criterion: Eq. 4 costs against a reference, batched vs per-row matching, empty targets,
Eq. 6 by hand, CoverAcc, and every declared loss every call."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.ops as tvo

from fclm.losses.heads import HeadTargets
from fclm.losses.igvg import IGVG_LOSS_WEIGHTS, IGVGCriterion, cover_acc, igvg_match_costs, point_guided_match
from fclm.losses.mask import mask_bce_loss

COSTS = dict(cost_class=1.0, cost_box_l1=5.0, cost_giou=2.0, cost_point=2.0)


def _random_preds(n: int, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, q, 2, generator=g)
    cxcy = torch.rand(n, q, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, q, 2, generator=g) * 0.3 + 0.05
    points = torch.rand(n, q, 2, generator=g)
    return logits, torch.cat([cxcy, wh], -1), points


def _random_boxes(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 0.6
    return torch.cat([xy, xy + torch.rand(k, 2, generator=g) * 0.3 + 0.05], -1)


def test_match_costs_equal_a_reference_computed_pair_by_pair() -> None:
    logits, boxes, points = _random_preds(3, 5, 0)
    targets = [_random_boxes(2, 1), _random_boxes(0, 2), _random_boxes(4, 3)]
    costs = igvg_match_costs(logits, boxes, points, targets, **COSTS)
    for r, tgt in enumerate(targets):
        assert costs[r].shape == (5, tgt.shape[0])
        for i in range(5):
            cx, cy, w, h = boxes[r, i].tolist()
            pred_xyxy = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
            p_obj = torch.exp(logits[r, i, 0]) / torch.exp(logits[r, i]).sum()
            for j in range(tgt.shape[0]):
                x0, y0, x1, y1 = tgt[j].tolist()
                centre = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
                l1 = sum(abs(a - b) for a, b in zip([cx, cy, w, h], centre))
                giou = float(tvo.generalized_box_iou(pred_xyxy, tgt[j : j + 1])[0, 0])
                point = abs(float(points[r, i, 0]) - centre[0]) + abs(float(points[r, i, 1]) - centre[1])
                expected = -1.0 * float(p_obj) + 5.0 * l1 - 2.0 * giou + 2.0 * point
                assert float(costs[r][i, j]) == pytest.approx(expected, abs=1e-5)
    no_point = igvg_match_costs(logits, boxes, None, targets, **COSTS)
    assert not torch.allclose(no_point[0], costs[0])


def test_batched_matching_equals_per_row_matching_and_empty_targets_work() -> None:
    logits, boxes, points = _random_preds(4, 6, 5)
    targets = [_random_boxes(3, 6), _random_boxes(0, 7), _random_boxes(6, 8), _random_boxes(1, 9)]
    batched = point_guided_match(logits, boxes, points, targets, **COSTS)
    for r in range(4):
        single = point_guided_match(logits[r : r + 1], boxes[r : r + 1], points[r : r + 1], targets[r : r + 1], **COSTS)[0]
        assert torch.equal(batched[r][0], single[0]) and torch.equal(batched[r][1], single[1])
        assert len(batched[r][0]) == min(6, targets[r].shape[0])
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    none = point_guided_match(logits, boxes, points, [torch.zeros(0, 4)] * 4, **COSTS)
    assert all(i.numel() == 0 and j.numel() == 0 for i, j in none)


def test_matching_is_optimal_against_brute_force() -> None:
    logits, boxes, points = _random_preds(1, 5, 11)
    targets = [_random_boxes(3, 12)]
    (i, j), = point_guided_match(logits, boxes, points, targets, **COSTS)
    cost = igvg_match_costs(logits, boxes, points, targets, **COSTS)[0]
    best = min(sum(float(cost[q, t]) for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert float(cost[i, j].sum()) == pytest.approx(best, abs=1e-6)


def test_point_cost_pulls_queries_to_the_targets_their_points_lie_on() -> None:
    """Identical boxes and scores: only the points tell the queries apart (Eq. 4's point term)."""
    logits = torch.zeros(1, 2, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    points = torch.tensor([[[0.8, 0.8], [0.2, 0.2]]])
    targets = [torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.7, 0.7, 0.9, 0.9]])]
    (i, j), = point_guided_match(logits, boxes, points, targets, **COSTS)
    assert dict(zip(i.tolist(), j.tolist())) == {0: 1, 1: 0}


def test_cover_acc() -> None:
    points = torch.tensor([[[0.2, 0.2], [0.9, 0.9]], [[0.5, 0.5], [0.5, 0.5]], [[0.1, 0.1], [0.1, 0.1]]])
    boxes = [torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.4, 0.4, 0.6, 0.6]]), torch.tensor([[0.5, 0.5, 0.7, 0.7]]), torch.zeros(0, 4)]
    acc, rows = cover_acc(points, boxes)
    assert rows == 2 and acc == pytest.approx((0.5 + 1.0) / 2)  # row 1: a point on the border counts
    assert cover_acc(points, [torch.zeros(0, 4)] * 3) == (0.0, 0)


# --------------------------------------------------------------------------------------------------
# the criterion
# --------------------------------------------------------------------------------------------------


def _preds(n: int, q: int = 4, layers: int = 2, hl: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits, boxes, points = _random_preds(n, q, seed)
    return {
        "pred_logits_layers": torch.randn(n, layers, q, 2, generator=g).requires_grad_(),
        "pred_boxes_layers": torch.cat([boxes[:, None].expand(n, layers, q, 4)], 0).clone().requires_grad_(),
        "pred_points": points,
        "pred_masks": torch.randn(n, q, hl, hl, generator=g).requires_grad_(),
        "pred_global_masks": torch.randn(n, hl, hl, generator=g).requires_grad_(),
        "pred_text_attn": torch.randn(n, 4, 4, generator=g).requires_grad_(),
        "pred_exists": torch.randn(n, generator=g).requires_grad_(),
    }


def _targets(ks: list[int], s: int = 16) -> HeadTargets:
    masks, boxes = [], []
    for r, k in enumerate(ks):
        m, b = torch.zeros(k, s, s), torch.zeros(k, 4)
        for j in range(k):
            y0, x0 = 2 * j, 4 * r % 8
            m[j, y0 : y0 + 6, x0 : x0 + 8] = 1
            b[j] = torch.tensor([x0, y0, x0 + 8, y0 + 6]) / s
        masks.append(m)
        boxes.append(b)
    union = torch.stack([m.amax(0) if m.shape[0] else torch.zeros(s, s) for m in masks])
    return HeadTargets(masks=union, exists=torch.tensor([k > 0 for k in ks]), instance_masks=masks, instance_boxes=boxes,
                       valid_hw=torch.full((len(ks), 2), s))


def test_every_declared_loss_every_call_finite_and_differentiable() -> None:
    crit = IGVGCriterion()
    assert crit.loss_weights == IGVG_LOSS_WEIGHTS and all(k.startswith("loss_igvg_") for k in crit.loss_weights)
    preds = _preds(3)
    losses = crit(preds, _targets([2, 0, 1]))
    assert set(crit.loss_weights) <= set(losses)
    assert {"metric_igvg_cover_acc", "metric_igvg_exists_acc", "metric_igvg_matched_giou"} <= set(losses)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert all(not v.requires_grad for k, v in losses.items() if k.startswith("metric_"))
    sum(crit.loss_weights[k] * losses[k] for k in crit.loss_weights).backward()
    for k in ("pred_logits_layers", "pred_boxes_layers", "pred_masks", "pred_global_masks", "pred_text_attn", "pred_exists"):
        assert float(preds[k].grad.abs().sum()) > 0, k


def test_all_no_target_rows_give_exact_zero_box_losses_in_the_graph() -> None:
    crit = IGVGCriterion()
    preds = _preds(2)
    losses = crit(preds, _targets([0, 0]))
    assert float(losses["loss_igvg_box_l1"].detach()) == 0.0 and float(losses["loss_igvg_box_giou"].detach()) == 0.0
    assert losses["loss_igvg_box_l1"].requires_grad
    assert float(losses["loss_igvg_cls"]) > 0 and float(losses["loss_igvg_mask_bce"]) > 0  # all queries negative
    assert float(losses["metric_igvg_cover_rows"]) == 0.0
    sum(losses[k] for k in crit.loss_weights).backward()


def test_no_rows() -> None:
    crit = IGVGCriterion()
    losses = crit({k: v[:0] for k, v in _preds(2).items()}, HeadTargets(
        masks=torch.zeros(0, 16, 16), exists=torch.zeros(0, dtype=torch.bool), instance_masks=[], instance_boxes=[],
        valid_hw=torch.zeros(0, 2, dtype=torch.long)))
    assert all(float(losses[k]) == 0.0 and losses[k].requires_grad for k in crit.loss_weights)


def test_instance_mask_loss_is_eq6_over_the_box_matching() -> None:
    """Matched queries vs their instances (the box matching's pairs) + λ_neg · the rest vs empty masks."""
    crit = IGVGCriterion(neg_weight=0.3, aux_loss=False)
    preds = _preds(2, q=4, hl=16)
    targets = _targets([2, 0])
    match = crit.match(preds, targets)
    losses = crit(preds, targets)
    masks = preds["pred_masks"].detach()
    i0, j0 = match[0]
    pos = mask_bce_loss(masks[0, i0], targets.instance_masks[0][j0])
    neg_rows = [masks[0, q] for q in range(4) if q not in i0.tolist()] + [masks[1, q] for q in range(4)]
    neg = mask_bce_loss(torch.stack(neg_rows), torch.zeros(len(neg_rows), 16, 16))
    assert float(losses["loss_igvg_mask_bce"]) == pytest.approx(float(pos + 0.3 * neg), rel=1e-5)
    # the matched queries take class 0, all others the no-object class (weight eos_coef)
    logits = preds["pred_logits_layers"][:, -1].detach().reshape(-1, 2)
    cls = torch.ones(8, dtype=torch.long)
    cls[i0] = 0
    expected = torch.nn.functional.cross_entropy(logits, cls, weight=torch.tensor([1.0, 0.1]))
    assert float(losses["loss_igvg_cls"]) == pytest.approx(float(expected), rel=1e-5)


def test_aux_loss_sums_the_layers() -> None:
    preds = _preds(2, layers=3)
    preds["pred_logits_layers"] = preds["pred_logits_layers"][:, :1].detach().expand(2, 3, 4, 2)
    targets = _targets([1, 2])
    last = IGVGCriterion(aux_loss=False)(preds, targets)
    every = IGVGCriterion(aux_loss=True)(preds, targets)
    # boxes and logits are equal in every layer here, so the detection terms triple; the mask terms do not change
    assert float(every["loss_igvg_box_l1"]) == pytest.approx(3 * float(last["loss_igvg_box_l1"]), rel=1e-5)
    assert float(every["loss_igvg_cls"]) == pytest.approx(3 * float(last["loss_igvg_cls"]), rel=1e-5)
    assert float(every["loss_igvg_mask_dice"]) == pytest.approx(float(last["loss_igvg_mask_dice"]), rel=1e-6)


def test_exists_loss_weights_no_target_rows_more() -> None:
    crit = IGVGCriterion()
    preds = _preds(2)
    preds["pred_exists"] = torch.tensor([0.0, 0.0])
    got = float(crit(preds, _targets([1, 0]))["loss_igvg_exists"])
    assert got == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-5)  # equal BCE → the weighted mean is it
    preds["pred_exists"] = torch.tensor([2.0, 2.0])  # predicts "exists" for both: the no-target row's error weighs 1.1
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0]), reduction="none")
    assert float(crit(preds, _targets([1, 0]))["loss_igvg_exists"]) == pytest.approx(float((0.9 * bce[0] + 1.1 * bce[1]) / 2.0), rel=1e-5)
