"""MUSE (PixelLM ar_validate + match_pred): matching cost, extra / missing masks, image grouping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from metrics_testkit import eval_set, gt, pred, rect, seg

from fclm.metrics import score_muse
from fclm.metrics.muse import pixellm_match_cost

EPS = 1e-5


def _pixellm_cost_reference(pred_masks: np.ndarray, tgt_masks: np.ndarray) -> np.ndarray:
    """PixelLM utils/matcher.py batch_sigmoid_ce_loss + batch_dice_loss, every pixel a point,
    the binary predicted mask as the logit input."""
    inputs = torch.tensor(pred_masks.reshape(len(pred_masks), -1), dtype=torch.float64)
    targets = torch.tensor(tgt_masks.reshape(len(tgt_masks), -1), dtype=torch.float64)
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    ce = (torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, 1 - targets)) / hw
    s = inputs.sigmoid()
    dice = 1 - (2 * torch.einsum("nc,mc->nm", s, targets) + 1) / (s.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)
    return (ce + dice).numpy()


def test_closed_form_cost_equals_pixellm_formulas():
    rng = np.random.default_rng(0)
    preds = rng.random((3, 7, 9)) < 0.4
    tgts = rng.random((4, 7, 9)) < 0.3
    preds[2] = False  # an empty prediction
    inter = np.einsum("pc,tc->pt", preds.reshape(3, -1).astype(int), tgts.reshape(4, -1).astype(int))
    ours = pixellm_match_cost(inter, preds.reshape(3, -1).sum(1), tgts.reshape(4, -1).sum(1), 63)
    np.testing.assert_allclose(ours, _pixellm_cost_reference(preds, tgts), rtol=1e-12, atol=1e-12)


def test_muse_extra_and_missing_masks_and_image_grouping(tmp_path):
    A = rect(0, 0, 4, 5)  # 20 px
    B = rect(2, 0, 6, 5)  # 20 px
    C = rect(6, 6, 9, 9)  # 9 px
    D = rect(0, 8, 2, 10)  # 4 px, overlaps nothing
    es = eval_set(
        tmp_path,
        [
            gt("q1", [[A], [C]], task="reason_seg", image="img1.jpg"),
            gt("q2", [[B]], task="reason_seg", image="img1.jpg"),
            gt("q3", [[A]], task="reason_seg", image="img2.jpg"),
        ],
        [
            pred("q1", [seg(C), seg(A), seg(D)]),  # swapped order + one extra mask
            pred("q2", []),  # missing mask: target pairs with an empty prediction
            pred("q3", [seg(A, exists=0.1), {"instances": []}]),  # two empty masks for one target
        ],
    )
    r = score_muse(es)
    q1, q2, q3 = r.per_sample
    assert [(p["pred"], p["target"]) for p in q1["pairs"]] == [(0, 1), (1, 0), (2, None)]
    assert [p["iou"] for p in q1["pairs"]] == pytest.approx([9 / (9 + EPS), 20 / (20 + EPS), 0.0])
    assert [(p["pred"], p["target"], p["u"]) for p in q2["pairs"]] == [(None, 0, 20)]
    # equal costs → scipy keeps prediction 0; the unmatched empty prediction meets an empty target: U = 0 → IoU 1
    assert [(p["pred"], p["target"], p["iou"]) for p in q3["pairs"]] == [(0, 0, 0.0), (1, None, 1.0)]
    # img1: Σ IoU ≈ 2 over max(3 predicted, 3 targets); img2: 1 over max(2, 1)
    assert r.metrics["giou"] == pytest.approx((9 / (9 + EPS) + 20 / (20 + EPS) + 1.0) / (3 + 2))
    assert r.metrics["ciou"] == pytest.approx(29 / 73)
    assert r.counts["n_images"] == 2 and r.counts["n_pred_masks"] == 5 and r.counts["n_target_masks"] == 4


def test_muse_matching_prefers_overlap_over_order(tmp_path):
    A, B = rect(0, 0, 5, 10), rect(5, 0, 10, 10)
    es = eval_set(tmp_path, [gt("q", [[A], [B]], image="i.jpg")], [pred("q", [seg(rect(5, 0, 10, 9)), seg(rect(0, 0, 5, 9))])])
    r = score_muse(es)
    assert [(p["pred"], p["target"]) for p in r.per_sample[0]["pairs"]] == [(0, 1), (1, 0)]
    assert r.metrics["giou"] == pytest.approx(45 / (50 + EPS))
