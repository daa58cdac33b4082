"""The ``c3vg`` criterion: differentiable mask↔box consistency against hand values, box/mask terms against
references computed another way, no-target queries, and the consistency switch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_for_object_detection import generalized_box_iou

from fclm.config import LossConfig, preset
from fclm.losses import FCLMCriterion, HeadTargets
from fclm.losses.c3vg import (
    C3VG_LOSS_WEIGHTS,
    C3VGCriterion,
    box_axis_coverage,
    box_coverage,
    box_to_mask_consistency,
    build_c3vg_criterion,
    mask_to_box_consistency,
    union_boxes,
)
from fclm.model.heads import head_loss_weights

S = 16  # frame side of the hand-made targets
LOW = 8  # low-res side of the hand-made predictions


def _square_logits(value: float = 30.0) -> torch.Tensor:
    """(1,4,4) logits: +value on rows 1–2 × cols 1–2, −value elsewhere (p ≈ 1 / ≈ 0 when saturated)."""
    logits = torch.full((1, 4, 4), -value)
    logits[0, 1:3, 1:3] = value
    return logits


def test_box_coverage_is_the_covered_fraction_of_each_cell() -> None:
    rows, cols = box_axis_coverage(torch.tensor([[0.25, 0.25, 0.625, 0.75]]), 4, 4)
    torch.testing.assert_close(rows, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(cols, torch.tensor([[0.0, 1.0, 0.5, 0.0]]))
    cov = box_coverage(torch.tensor([[0.1, 0.0, 0.3, 1.0]]), 2, 5)  # x from 0.5 to 1.5 cells
    torch.testing.assert_close(cov, torch.tensor([[[0.5, 0.5, 0, 0, 0], [0.5, 0.5, 0, 0, 0]]]))


@pytest.mark.parametrize(
    ("box", "mask_to_box", "box_to_mask"),
    [
        ((0.25, 0.25, 0.75, 0.75), 0.0, 0.0),  # the mask's tight box: consistent both ways
        ((0.25, 0.25, 0.5, 0.75), 0.5, 1 / 6),  # half the mass outside; x: 1 − 2·1/(2+1) = 1/3, y: 0
        ((0.25, 0.25, 0.625, 0.75), 0.25, 1 / 26),  # a half-covered column: 1 − 2·1.5/(2+1.25) = 1/13
        ((0.0, 0.0, 1.0, 1.0), 0.0, 1 / 3),  # box contains the mask, but twice its extent: 1 − 2·2/(2+4) = 1/3 each
    ],
)
def test_consistency_terms_equal_hand_values_on_a_binary_mask(box, mask_to_box, box_to_mask) -> None:
    logits, boxes = _square_logits(), torch.tensor([box])
    torch.testing.assert_close(mask_to_box_consistency(logits, boxes), torch.tensor([mask_to_box]), atol=1e-6, rtol=0)
    torch.testing.assert_close(box_to_mask_consistency(logits, boxes), torch.tensor([box_to_mask]), atol=1e-6, rtol=0)


def _reference_terms(logits: torch.Tensor, box: list[float]) -> tuple[float, float]:
    """Both terms written with Python loops over the cells of one (h,w) soft mask."""
    h, w = logits.shape
    p = [[1 / (1 + math.exp(-float(logits[i, j]))) for j in range(w)] for i in range(h)]

    def overlap(lo: float, hi: float, cell: int) -> float:
        return max(0.0, min(hi, cell + 1) - max(lo, cell))

    col = [overlap(box[0] * w, box[2] * w, j) for j in range(w)]
    row = [overlap(box[1] * h, box[3] * h, i) for i in range(h)]
    mass = sum(sum(r) for r in p)
    inside = sum(p[i][j] * row[i] * col[j] for i in range(h) for j in range(w))
    m2b = 1 - inside / mass
    occ_x = [max(p[i][j] for i in range(h)) for j in range(w)]
    occ_y = [max(p[i]) for i in range(h)]

    def dice(a: list[float], b: list[float]) -> float:
        return 1 - 2 * sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) + sum(y * y for y in b))

    return m2b, 0.5 * (dice(occ_x, col) + dice(occ_y, row))


def test_consistency_terms_on_a_soft_mask_equal_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, generator=g) * 2
    boxes = torch.tensor([[0.1, 0.2, 0.55, 0.9], [0.0, 0.0, 1.0, 1.0], [0.37, 0.05, 0.41, 0.33]])
    m2b, b2m = mask_to_box_consistency(logits, boxes), box_to_mask_consistency(logits, boxes)
    for i in range(3):
        ref_m2b, ref_b2m = _reference_terms(logits[i], boxes[i].tolist())
        assert float(m2b[i]) == pytest.approx(ref_m2b, abs=1e-5)
        assert float(b2m[i]) == pytest.approx(ref_b2m, abs=1e-5)


@pytest.mark.parametrize("term", [mask_to_box_consistency, box_to_mask_consistency])
def test_consistency_gradients_reach_both_the_mask_and_the_box(term) -> None:
    logits = _square_logits(value=1.5).requires_grad_(True)
    box = torch.tensor([[0.25, 0.25, 0.625, 0.75]], requires_grad=True)  # right edge inside column 2
    term(logits, box).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert box.grad is not None and box.grad.abs().sum() > 0
    # the mask's column 2 is only half inside: moving the right edge out lowers both terms
    assert float(box.grad[0, 2]) < 0


def test_mask_to_box_gradient_moves_mass_into_the_box() -> None:
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    box = torch.tensor([[0.0, 0.0, 0.5, 1.0]])  # left half
    mask_to_box_consistency(logits, box).sum().backward()
    assert (logits.grad[0, :, :2] < 0).all() and (logits.grad[0, :, 2:] > 0).all()


def _targets(n_inst: list[int], *, exists: list[bool] | None = None, seed: int = 0) -> HeadTargets:
    """Per query, n_inst[i] rectangle instances in an S × S frame (0: a no-target query)."""
    g = torch.Generator().manual_seed(seed)
    masks, inst_masks, inst_boxes = [], [], []
    for k in n_inst:
        ms, bs = [], []
        for _ in range(k):
            x0, y0 = torch.randint(0, S // 2, (2,), generator=g).tolist()
            x1, y1 = x0 + int(torch.randint(2, S // 2, (1,), generator=g)), y0 + int(torch.randint(2, S // 2, (1,), generator=g))
            m = torch.zeros(S, S)
            m[y0:y1, x0:x1] = 1
            ms.append(m)
            bs.append(torch.tensor([x0, y0, x1, y1], dtype=torch.float32) / S)
        inst_masks.append(torch.stack(ms) if ms else torch.zeros(0, S, S))
        inst_boxes.append(torch.stack(bs) if bs else torch.zeros(0, 4))
        masks.append(inst_masks[-1].amax(0) if k else torch.zeros(S, S))
    return HeadTargets(
        masks=torch.stack(masks) if masks else torch.zeros(0, S, S),
        exists=torch.tensor(exists if exists is not None else [k > 0 for k in n_inst]),
        instance_masks=inst_masks,
        instance_boxes=inst_boxes,
        valid_hw=torch.full((len(n_inst), 2), S),
    )


def _boxes(n: int, g: torch.Generator) -> torch.Tensor:
    a, b = torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g)
    return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=-1)


def _preds(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_masks": torch.randn(n, LOW, LOW, generator=g).requires_grad_(True),
        "pred_coarse_masks": torch.randn(n, LOW, LOW, generator=g).requires_grad_(True),
        "pred_boxes": _boxes(n, g).requires_grad_(True),
        "pred_coarse_boxes": _boxes(n, g).requires_grad_(True),
        "pred_scores": torch.rand(n, generator=g),
    }


def test_union_box_encloses_all_instances() -> None:
    boxes, has = union_boxes([torch.tensor([[0.1, 0.5, 0.3, 0.6], [0.2, 0.1, 0.4, 0.2]]), torch.zeros(0, 4)])
    torch.testing.assert_close(boxes, torch.tensor([[0.1, 0.1, 0.4, 0.6], [0.0, 0.0, 0.0, 0.0]]))
    assert has.tolist() == [True, False]


def test_criterion_values_equal_references_computed_another_way() -> None:
    targets = _targets([1, 0, 2, 1])  # a no-target query and a two-instance query
    preds = _preds(4)
    crit = C3VGCriterion()
    losses = {k: v.detach() for k, v in crit(preds, targets).items()}
    assert set(C3VG_LOSS_WEIGHTS) <= set(losses)
    assert all(k in C3VG_LOSS_WEIGHTS or k.startswith("metric_c3vg_") for k in losses)

    rows = [0, 2, 3]  # queries with a target box
    tboxes = torch.stack([torch.cat([b[:, :2].min(0).values, b[:, 2:].max(0).values]) for b in targets.instance_boxes if len(b)])
    for stage, mkey, bkey in (("", "pred_masks", "pred_boxes"), ("coarse_", "pred_coarse_masks", "pred_coarse_boxes")):
        pb = preds[bkey].detach()[rows]
        l1 = sum(abs(float(pb[i, c]) - float(tboxes[i, c])) for i in range(3) for c in range(4)) / 3
        giou = (1 - generalized_box_iou(pb, tboxes).diagonal()).sum() / 3
        assert float(losses[f"loss_c3vg_{stage}box_l1"]) == pytest.approx(l1, rel=1e-5)
        assert float(losses[f"loss_c3vg_{stage}box_giou"]) == pytest.approx(float(giou), rel=1e-5)
        # masks: all four queries (the no-target one toward the empty mask), at the frame's size
        up = F.interpolate(preds[mkey].detach()[:, None], (S, S), mode="bilinear", align_corners=False)[:, 0]
        bce = torch.stack([F.binary_cross_entropy_with_logits(up[i], targets.masks[i]) for i in range(4)]).mean()
        p = up.sigmoid().flatten(1)
        t = targets.masks.flatten(1)
        dice = (1 - (2 * (p * t).sum(1) / 1000 + 1e-6) / ((p.sum(1) + t.sum(1)) / 1000 + 1e-6)).mean()
        assert float(losses[f"loss_c3vg_{stage}mask_bce"]) == pytest.approx(float(bce), rel=1e-5)
        assert float(losses[f"loss_c3vg_{stage}mask_dice"]) == pytest.approx(float(dice), rel=1e-5)

    for name, term in (("mask_to_box", mask_to_box_consistency), ("box_to_mask", box_to_mask_consistency)):
        ref = sum(
            float(term(preds[m].detach()[rows], preds[b].detach()[rows]).mean())
            for m, b in (("pred_masks", "pred_boxes"), ("pred_coarse_masks", "pred_coarse_boxes"))
        ) / 2
        assert float(losses[f"loss_c3vg_cons_{name}"]) == pytest.approx(ref, rel=1e-5)
    assert 0.0 <= float(losses["metric_c3vg_box_iou"]) <= 1.0
    assert not crit(preds, targets)["metric_c3vg_box_iou"].requires_grad


def test_no_target_queries_give_graph_zero_box_and_consistency_terms_and_finite_mask_terms() -> None:
    targets = _targets([0, 0])
    preds = _preds(2)
    losses = C3VGCriterion()(preds, targets)
    for k in ("box_l1", "box_giou", "coarse_box_l1", "coarse_box_giou", "cons_mask_to_box", "cons_box_to_mask"):
        assert float(losses[f"loss_c3vg_{k}"].detach()) == 0.0 and losses[f"loss_c3vg_{k}"].requires_grad
    for k in ("mask_bce", "mask_dice", "coarse_mask_bce", "coarse_mask_dice"):
        assert torch.isfinite(losses[f"loss_c3vg_{k}"]) and float(losses[f"loss_c3vg_{k}"].detach()) > 0
    sum(losses[k] for k in C3VG_LOSS_WEIGHTS).backward()
    assert preds["pred_masks"].grad.abs().sum() > 0
    assert preds["pred_boxes"].grad is not None and float(preds["pred_boxes"].grad.abs().sum()) == 0.0
    assert not any(k.startswith("metric_") for k in losses)  # nothing to measure boxes against


def test_exists_false_with_an_instance_is_left_out_of_the_box_terms() -> None:
    targets = _targets([1, 1], exists=[True, False])
    preds = _preds(2)
    both = C3VGCriterion()(preds, targets)
    first = C3VGCriterion()({k: v[:1] for k, v in preds.items()}, _targets([1]))  # same seed: the same first query
    for k in ("box_l1", "box_giou", "cons_mask_to_box", "cons_box_to_mask"):
        assert float(both[f"loss_c3vg_{k}"].detach()) == pytest.approx(float(first[f"loss_c3vg_{k}"].detach()), rel=1e-6)


def test_consistency_switch_zeroes_its_terms_and_changes_the_gradients() -> None:
    targets = _targets([1, 2, 0])
    weights = C3VG_LOSS_WEIGHTS
    grads, values = {}, {}
    for on in (True, False):
        preds = _preds(3)
        losses = C3VGCriterion(consistency=on)(preds, targets)
        values[on] = losses
        sum(weights[k] * losses[k] for k in weights).backward()
        grads[on] = (preds["pred_masks"].grad.clone(), preds["pred_boxes"].grad.clone())
    for k in ("loss_c3vg_cons_mask_to_box", "loss_c3vg_cons_box_to_mask"):
        assert float(values[True][k].detach()) > 0
        assert float(values[False][k].detach()) == 0.0 and values[False][k].requires_grad
    for k in weights:
        if "cons" not in k:
            assert float(values[True][k].detach()) == float(values[False][k].detach())
    assert not torch.allclose(grads[True][0], grads[False][0]) and not torch.allclose(grads[True][1], grads[False][1])


def test_no_queries_give_every_name_as_exact_zero() -> None:
    preds = {k: v[:0] for k, v in _preds(2).items()}
    losses = C3VGCriterion()(preds, _targets([]))
    assert set(losses) == set(C3VG_LOSS_WEIGHTS) and all(float(v.detach()) == 0.0 for v in losses.values())


def test_mismatched_rows_raise() -> None:
    with pytest.raises(ValueError, match="do not match the 3 routed targets"):
        C3VGCriterion()(_preds(2), _targets([1, 1, 1]))


def test_declared_names_builder_and_fclm_criterion() -> None:
    assert all(k.startswith("loss_c3vg_") and w >= 0 for k, w in C3VG_LOSS_WEIGHTS.items())
    assert C3VGCriterion.LOSS_WEIGHTS == C3VGCriterion().loss_weights == head_loss_weights(["c3vg"])
    cfg = preset("tiny")
    assert build_c3vg_criterion(cfg=cfg).consistency is True
    cfg.heads.c3vg.consistency = False
    assert build_c3vg_criterion(cfg=cfg).consistency is False
    crit = FCLMCriterion(LossConfig(weights={"loss_ce": 1.0, "loss_c3vg_cons_box_to_mask": 0.0}), {"c3vg": C3VGCriterion()})
    assert crit.weights["loss_c3vg_cons_box_to_mask"] == 0.0 and crit.weights["loss_c3vg_box_l1"] == 5.0
    assert set(C3VG_LOSS_WEIGHTS) <= set(crit.loss_names)
