"""Losses against hand numbers and naive loops; the criterion's names, empty cases and weight table."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fclm.config import LossConfig
from fclm.losses import (
    LOSS_NAMES,
    SAM_LOSS_WEIGHTS,
    FCLMCriterion,
    causal_lm_loss,
    latent_loss,
    mask_bce_loss,
    mask_dice_loss,
    self_recon_loss,
    upsample_logits,
)

# ---------------------------------------------------------------------------------------------- masks


def test_bce_hand_numbers() -> None:
    # logits 0 → p = 0.5 → BCE = ln 2 at every pixel, whatever the target
    assert mask_bce_loss(torch.zeros(2, 4, 4), torch.randint(0, 2, (2, 4, 4)).float()).item() == pytest.approx(math.log(2))
    # one mask of 2 pixels: logit 2 on target 1, logit -1 on target 1 → (softplus(-2) + softplus(1)) / 2
    pred, target = torch.tensor([[[2.0, -1.0]]]), torch.ones(1, 1, 2)
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2
    assert mask_bce_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_hand_numbers() -> None:
    # p = 0.5 on 4 pixels, target all ones: 1 − (2·2/1000 + 1e-6) / (6/1000 + 1e-6)
    value = mask_dice_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).item()
    assert value == pytest.approx(1 - (0.004 + 1e-6) / (0.006 + 1e-6), rel=1e-6)
    # a confident correct mask → ≈ 0; an empty target and an empty prediction → ≈ 0
    target = torch.zeros(1, 8, 8)
    target[0, 2:5, 2:6] = 1
    assert mask_dice_loss(target * 40 - 20, target).item() < 1e-6
    assert mask_dice_loss(torch.full((1, 8, 8), -30.0), torch.zeros(1, 8, 8)).item() < 1e-3


def test_bce_and_dice_equal_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 6, 5, generator=g) * 3
    target = (torch.rand(3, 6, 5, generator=g) > 0.6).float()
    bce_total, dice_total = 0.0, 0.0
    for m in range(3):
        bce_sum, inter, psum, tsum = 0.0, 0.0, 0.0, 0.0
        for i in range(6):
            for j in range(5):
                x, t = float(pred[m, i, j]), float(target[m, i, j])
                p = 1 / (1 + math.exp(-x))
                bce_sum += -(t * math.log(p) + (1 - t) * math.log(1 - p))
                inter, psum, tsum = inter + p * t, psum + p, tsum + t
        bce_total += bce_sum / 30
        dice_total += 1 - (2 * inter / 1000 + 1e-6) / ((psum + tsum) / 1000 + 1e-6)
    assert mask_bce_loss(pred, target).item() == pytest.approx(bce_total / 3, rel=1e-5)
    assert mask_dice_loss(pred, target).item() == pytest.approx(dice_total / 3, rel=1e-5)
    # num_masks overrides the divisor (LISA divides by the batch's total mask count)
    assert mask_dice_loss(pred, target, num_masks=6).item() == pytest.approx(dice_total / 6, rel=1e-5)


def test_no_masks_is_exact_zero_in_graph() -> None:
    pred = torch.zeros(0, 4, 4, requires_grad=True)
    for fn in (mask_bce_loss, mask_dice_loss):
        loss = fn(pred, torch.zeros(0, 4, 4))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        mask_bce_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))


def test_upsample_is_sam_bilinear() -> None:
    low = torch.randn(2, 7, 7)
    up = upsample_logits(low, (14, 14))
    torch.testing.assert_close(up, F.interpolate(low[:, None], (14, 14), mode="bilinear", align_corners=False)[:, 0])
    assert upsample_logits(low, (7, 7)) is low


def test_self_recon_is_weighted_bce_plus_dice() -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(2, 7, 7, generator=g)
    masks = (torch.rand(2, 14, 14, generator=g) > 0.5).float()
    up = upsample_logits(low, (14, 14))
    expected = 2.0 * mask_bce_loss(up, masks) + 1.0 * mask_dice_loss(up, masks)
    torch.testing.assert_close(self_recon_loss(low, masks), expected)
    torch.testing.assert_close(self_recon_loss(low, masks, bce_weight=0.0, dice_weight=3.0), 3.0 * mask_dice_loss(up, masks))
    with pytest.raises(ValueError, match="1 reconstructed masks for 2 region masks"):
        self_recon_loss(low[:1], masks)


# ---------------------------------------------------------------------------------------------- LM


def test_causal_lm_loss_equals_naive_loop() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.full((2, 5), -100)
    labels[0, 2], labels[0, 3], labels[1, 4], labels[1, 0] = 3, 7, 1, 9  # labels[1, 0] is never predicted
    terms = []
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]].item())
    assert causal_lm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert causal_lm_loss(logits, labels, num_items_in_batch=6).item() == pytest.approx(sum(terms) / 6, rel=1e-6)


def test_causal_lm_loss_without_supervised_tokens() -> None:
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[7, -100, -100, -100]])  # only position 0, which no token predicts
    loss = causal_lm_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------- latent


def test_latent_cosine_values_and_stop_gradient() -> None:
    z_seg = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    z_pos = torch.tensor([[0.0, 5.0], [-1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    pairs = torch.tensor([[0, 0], [0, 1], [2, 2]])  # orthogonal (1), opposite (2), same direction (0)
    loss = latent_loss(z_seg, z_pos, pairs)
    assert loss.item() == pytest.approx((1 + 2 + 0) / 3, abs=1e-6)
    loss.backward()
    assert z_pos.grad is None
    assert z_seg.grad is not None and z_seg.grad[0].abs().sum() > 0 and z_seg.grad[1].abs().sum() == 0


def test_latent_identical_vectors_give_zero_for_every_kind() -> None:
    z = torch.randn(4, 16)
    pairs = torch.tensor([[0, 0], [1, 1], [3, 3]])
    for kind in ("cosine", "mse", "kl"):
        assert latent_loss(z.clone().requires_grad_(True), z.clone(), pairs, kind=kind).item() == pytest.approx(0.0, abs=1e-6)


def test_latent_mse_and_kl_values() -> None:
    g = torch.Generator().manual_seed(3)
    z_seg, z_pos = torch.randn(3, 5, generator=g), torch.randn(2, 5, generator=g)
    pairs = torch.tensor([[2, 0], [0, 1]])
    a, b = z_seg[[2, 0]], z_pos[[0, 1]]
    assert latent_loss(z_seg, z_pos, pairs, kind="mse").item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    t = 2.0
    q, p = torch.softmax(a / t, -1), torch.softmax(b / t, -1)
    kl = sum(float((p[i] * (p[i].log() - q[i].log())).sum()) for i in range(2)) / 2 * t * t
    assert latent_loss(z_seg, z_pos, pairs, kind="kl", temperature=t).item() == pytest.approx(kl, rel=1e-5)


def test_latent_no_pairs_and_bad_pairs() -> None:
    z_seg = torch.randn(2, 4, requires_grad=True)
    loss = latent_loss(z_seg, torch.randn(1, 4), torch.zeros(0, 2, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="outside 2 \\[SEG\\] and 1 region"):
        latent_loss(z_seg, torch.randn(1, 4), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="unknown kind 'l1'"):
        latent_loss(z_seg, torch.randn(1, 4), torch.tensor([[0, 0]]), kind="l1")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- criterion

S, LOW = 16, 8


def _outputs_and_batch(n_seg: int = 3, r: int = 2, pairs: int = 1, seed: int = 4) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 13, generator=g, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = torch.tensor([4, 5])
    labels[1, 5] = 2
    # [SEG] 1 is routed to another head: the sam head holds [SEG]s 0 and 2
    sam_index = torch.tensor([i for i in range(n_seg) if i != 1], dtype=torch.long)
    outputs = {
        "logits": logits,
        "seg_embeddings": torch.randn(n_seg, 8, generator=g, requires_grad=True),
        "pos_embeddings": torch.randn(r, 8, generator=g, requires_grad=True),
        "pred_recon_masks": torch.randn(r, LOW, LOW, generator=g, requires_grad=True),
        "pred_recon_masks_from_mask": torch.randn(r, LOW, LOW, generator=g, requires_grad=True),
        "heads": {"sam": {"query_index": sam_index, "pred_masks": torch.randn(len(sam_index), LOW, LOW, generator=g, requires_grad=True),
                          "pred_scores": torch.rand(len(sam_index), generator=g)}},
    }
    batch = {
        "labels": labels,
        "target_masks": (torch.rand(n_seg, S, S, generator=g) > 0.5).float(),
        "region_masks": (torch.rand(r, S, S, generator=g) > 0.5).float(),
        "latent_pairs": torch.tensor([[2, 1]])[:pairs],
    }
    return outputs, batch


def test_criterion_values_match_the_functions() -> None:
    crit = FCLMCriterion(LossConfig())
    outputs, batch = _outputs_and_batch()
    losses = crit(outputs, batch)
    assert set(losses) == set(LOSS_NAMES)
    pred = upsample_logits(outputs["heads"]["sam"]["pred_masks"], (S, S))
    targets = batch["target_masks"][[0, 2]]
    torch.testing.assert_close(losses["loss_ce"], causal_lm_loss(outputs["logits"], batch["labels"]))
    torch.testing.assert_close(losses["loss_mask_bce"], mask_bce_loss(pred, targets))
    torch.testing.assert_close(losses["loss_mask_dice"], mask_dice_loss(pred, targets))
    torch.testing.assert_close(losses["loss_self_recon"], self_recon_loss(outputs["pred_recon_masks"], batch["region_masks"]))
    torch.testing.assert_close(
        losses["loss_latent"], latent_loss(outputs["seg_embeddings"], outputs["pos_embeddings"], batch["latent_pairs"])
    )
    total = crit.weighted_total(losses)
    table = {**SAM_LOSS_WEIGHTS, **LossConfig().weights}  # the sam head's declared defaults + the model-wide ones
    assert crit.weights == table and set(table) == set(LOSS_NAMES)
    expected = sum(table[k] * losses[k] for k in LOSS_NAMES)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert outputs["pos_embeddings"].grad is None  # stop-gradient into z_pos
    assert outputs["seg_embeddings"].grad[2].abs().sum() > 0
    assert outputs["pred_recon_masks_from_mask"].grad is None  # source "pos" by default


def test_criterion_without_seg_regions_or_pairs_gives_exact_zeros_that_backprop() -> None:
    crit = FCLMCriterion(LossConfig())
    outputs, batch = _outputs_and_batch(n_seg=0, r=0, pairs=0)
    losses = crit(outputs, batch)
    for name in ("loss_mask_bce", "loss_mask_dice", "loss_self_recon", "loss_latent"):
        assert losses[name].item() == 0.0 and losses[name].requires_grad, name
    crit.weighted_total(losses).backward()
    assert outputs["logits"].grad is not None
    # no sam head at all (every [SEG] routed elsewhere) and no labels
    outputs.pop("heads")
    batch.pop("labels")
    losses = crit(outputs, batch)
    assert losses["loss_mask_bce"].item() == 0.0 and losses["loss_ce"].item() == 0.0


def test_criterion_self_recon_sources() -> None:
    outputs, batch = _outputs_and_batch()
    pos = self_recon_loss(outputs["pred_recon_masks"], batch["region_masks"])
    from_mask = self_recon_loss(outputs["pred_recon_masks_from_mask"], batch["region_masks"])
    for source, expected in (("mask", from_mask), ("both", pos + from_mask)):
        crit = FCLMCriterion(LossConfig(self_recon_source=source))
        torch.testing.assert_close(crit(outputs, batch)["loss_self_recon"], expected)
    outputs.pop("pred_recon_masks_from_mask")
    with pytest.raises(ValueError, match=r"self_recon_source='mask' needs outputs\['pred_recon_masks_from_mask'\]"):
        FCLMCriterion(LossConfig(self_recon_source="mask"))(outputs, batch)


def test_criterion_rejects_unknown_weight_names() -> None:
    with pytest.raises(ValueError, match="unknown loss name\\(s\\) in loss weights: loss_mask_focal"):
        FCLMCriterion(LossConfig(weights={"loss_ce": 1.0, "loss_mask_focal": 1.0}))
    crit = FCLMCriterion(LossConfig(weights={"loss_ce": 1.0, "loss_latent": 0.5}))
    outputs, batch = _outputs_and_batch()
    losses = crit(outputs, batch)
    # names left out of the table keep the routed head's declared defaults (sam: bce 2, dice 1)
    torch.testing.assert_close(
        crit.weighted_total(losses),
        losses["loss_ce"] + 0.5 * losses["loss_latent"] + 2.0 * losses["loss_mask_bce"] + losses["loss_mask_dice"],
    )
    with pytest.raises(ValueError, match="no value for weighted loss\\(es\\) loss_mask_bce, loss_mask_dice, loss_latent"):
        crit.weighted_total({"loss_ce": losses["loss_ce"]})
    bad_kind = dataclasses.replace(LossConfig(), latent_kind="l1")
    with pytest.raises(ValueError, match="latent_kind 'l1'"):
        FCLMCriterion(bad_kind)


def test_head_targets_put_image_boxes_on_the_frame_and_keep_every_instance() -> None:
    from fclm.losses.heads import head_targets, mask_frame_boxes

    s = 16
    m = torch.zeros(3, s, s)
    m[0, 2:5, 3:9] = 1
    batch = {
        "target_masks": torch.stack([m[0], torch.zeros(s, s), m[0]]),
        "target_exists": torch.tensor([True, False, True]),
        "target_instance_masks": [m[:1], torch.zeros(0, s, s), m[:2]],
        "target_instance_boxes": [torch.tensor([[0.5, 0.25, 1.0, 0.75]]), torch.zeros(0, 4),
                                  torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])],
        "seg_batch_index": torch.tensor([0, 0, 1]),
        "sam_valid_hw": torch.tensor([[16, 8], [8, 16]]),  # image 0 is tall (w 8 of 16), image 1 is wide
    }
    t = head_targets(batch, torch.tensor([2, 1, 0]))
    assert len(t) == 3 and t.exists.tolist() == [True, False, True]
    torch.testing.assert_close(t.instance_boxes[0], torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.5, 0.25, 1.0, 0.5]]))
    assert t.instance_boxes[1].shape == (0, 4) and t.instance_masks[1].shape == (0, s, s)
    torch.testing.assert_close(t.instance_boxes[2], torch.tensor([[0.25, 0.25, 0.5, 0.75]]))
    torch.testing.assert_close(t.valid_hw, torch.tensor([[8, 16], [16, 8], [16, 8]]))
    # a hand-made batch without instance lists: the union mask is the one instance, boxed on the frame grid
    bare = head_targets({"target_masks": batch["target_masks"]}, torch.tensor([0, 1]))
    torch.testing.assert_close(bare.instance_boxes[0], torch.tensor([[3 / 16, 2 / 16, 9 / 16, 5 / 16]]))
    assert bare.instance_masks[1].shape[0] == 0 and bare.exists.tolist() == [True, False]
    torch.testing.assert_close(mask_frame_boxes(m[:1]), bare.instance_boxes[0])


def test_criterion_refuses_loss_names_of_heads_it_does_not_route_to() -> None:
    from fclm.losses.heads import SamCriterion

    class Other:
        loss_weights = {"loss_other_box": 5.0}

        def __call__(self, preds, targets):
            return {"loss_other_box": preds["pred_boxes"].sum() * 0 + 1.0}

    with pytest.raises(ValueError, match="loss_other_box: no routed head \\(sam\\) declares them"):
        FCLMCriterion(LossConfig(weights={"loss_other_box": 1.0}), {"sam": SamCriterion()})
    crit = FCLMCriterion(LossConfig(weights={"loss_other_box": 2.0}), {"sam": SamCriterion(), "other": Other()})
    assert crit.weights["loss_other_box"] == 2.0 and crit.weights["loss_mask_bce"] == 2.0
    assert crit.loss_names == ("loss_ce", "loss_mask_bce", "loss_mask_dice", "loss_other_box", "loss_self_recon", "loss_latent")
    outputs, batch = _outputs_and_batch()
    losses = crit(outputs, batch)  # "other" got no query: its declared term is an exact graph zero
    assert losses["loss_other_box"].item() == 0.0 and set(losses) == set(crit.loss_names)
    outputs["heads"]["stray"] = outputs["heads"]["sam"]
    with pytest.raises(ValueError, match="predictions of head\\(s\\) \\['stray'\\]"):
        crit(outputs, batch)
