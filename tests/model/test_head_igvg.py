"""The ``igvg`` head (seed 001): point selectors, STS, forward shapes, gradients, ablation switches,
post-processing, no-target end to end, and FCLM with the head routed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fclm.config import ConfigError, IGVGConfig, LossConfig, model_config_from_dict
from fclm.losses.heads import HeadTargets
from fclm.model.heads import HEAD_REGISTRY, HeadInputs, IGVGHead, build_head, build_head_criterion, head_detections
from fclm.model.heads.igvg_ops import (
    MSDeformAttn, cell_centers, dist_score_point_selector, score_text_selector, topk_point_selector,
)
from fclm.model.sam import SamBackend, build_sam

LLM_DIM = 128


def _cfg(**igvg):
    return model_config_from_dict({"preset": "tiny", "heads": {"enabled": ["sam", "igvg"], "default": "igvg", "igvg": igvg}})


@pytest.fixture(scope="module")
def sam() -> SamBackend:
    torch.manual_seed(0)
    return build_sam(_cfg().sam)


def _head(sam: SamBackend, seed: int = 0, **igvg) -> IGVGHead:
    torch.manual_seed(seed)
    return build_head("igvg", cfg=_cfg(**igvg), sam=sam, llm_dim=LLM_DIM)


def _inputs(n: int = 3, seed: int = 0, text: bool = True, t: int = 7) -> HeadInputs:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, 3, 1, 5, 2, 6][:n])
    return HeadInputs(
        image_embeddings=torch.randn(2, 64, 14, 14, generator=g),
        seg_embeddings=torch.randn(n, 64, generator=g),
        seg_hidden=torch.randn(n, LLM_DIM, generator=g),
        seg_batch_index=torch.tensor([1, 0, 1, 0, 1, 0][:n], dtype=torch.long),
        valid_hw=torch.tensor([[112, 112], [84, 112]]),
        text_states=torch.randn(n, t, LLM_DIM, generator=g) if text else None,
        text_padding_mask=(torch.arange(t)[None] >= lengths[:, None]) if text else None,
    )


def _targets(n: int, empty_rows: tuple[int, ...] = ()) -> HeadTargets:
    masks, boxes = [], []
    for i in range(n):
        k = 0 if i in empty_rows else 1 + i % 2
        m, b = torch.zeros(k, 112, 112), torch.zeros(k, 4)
        for j in range(k):
            y0, x0 = 10 + 40 * j, 8 + 20 * i
            m[j, y0 : y0 + 30, x0 : x0 + 40] = 1
            b[j] = torch.tensor([x0, y0, x0 + 40, y0 + 30]) / 112
        masks.append(m)
        boxes.append(b)
    union = torch.stack([m.amax(0) if m.shape[0] else torch.zeros(112, 112) for m in masks]) if n else torch.zeros(0, 112, 112)
    return HeadTargets(masks=union, exists=torch.tensor([m.shape[0] > 0 for m in masks]), instance_masks=masks,
                       instance_boxes=boxes, valid_hw=torch.full((n, 2), 112))


# --------------------------------------------------------------------------------------------------
# Algorithm 1 and the Score Text Selector
# --------------------------------------------------------------------------------------------------


def _dps_reference(logits: torch.Tensor, k: int, w_dist: float, valid: torch.Tensor | None) -> list[int]:
    """Algorithm 1 written out with Python sets and loops, one map at a time."""
    h, w = logits.shape
    m = torch.sigmoid(logits.double())
    score = {(i, j): float(m[i, j]) - (0.0 if valid is None or bool(valid[i, j]) else 1e6) for i in range(h) for j in range(w)}
    candidates = sorted(score)  # row-major
    first = max(candidates, key=lambda p: (score[p], -candidates.index(p)))
    chosen = [first]
    remaining = [p for p in candidates if p != first]
    diag = math.sqrt(h * h + w * w)
    for _ in range(k - 1):
        def combined(p):
            d = min(math.dist(p, r) for r in chosen)
            return score[p] + w_dist * d / diag
        best = max(remaining, key=lambda p: (combined(p), -remaining.index(p)))
        chosen.append(best)
        remaining.remove(best)
    return [i * w + j for i, j in chosen]


@pytest.mark.parametrize("shape,k,w_dist", [((7, 7), 6, 0.5), ((5, 9), 10, 2.0), ((6, 4), 5, 0.0)])
def test_dps_equals_a_brute_force_reference_on_random_maps(shape, k, w_dist) -> None:
    g = torch.Generator().manual_seed(sum(shape) + k)
    logits = torch.randn(4, *shape, generator=g) * 2
    valid = torch.rand(4, *shape, generator=g) > 0.2
    valid[:, 0, 0] = True
    for v in (None, valid):
        got = dist_score_point_selector(logits, k, w_dist, v)
        for r in range(4):
            assert got[r].tolist() == _dps_reference(logits[r], k, w_dist, None if v is None else v[r])
    # W_dist = 0 is top-k; a large W_dist spreads the points
    assert dist_score_point_selector(logits, k, 0.0).tolist() == topk_point_selector(logits, k).tolist()
    # a huge W_dist makes the second point the cell farthest from the first
    spread = dist_score_point_selector(logits, 2, 1e4)
    cells = cell_centers(torch.arange(shape[0] * shape[1]), *shape) * torch.tensor([shape[1], shape[0]])
    for r in range(4):
        far = torch.cdist(cells[spread[r, :1]], cells)[0]
        assert float(far[spread[r, 1]]) == pytest.approx(float(far.max()))
    with pytest.raises(ValueError, match="cannot select"):
        dist_score_point_selector(logits, 1000, 0.1)


def test_score_text_selector_seg_first_then_l2_norm_padding_excluded() -> None:
    tokens = torch.zeros(2, 6, 3)
    norms = torch.tensor([[0.5, 5.0, 1.0, 9.0, 3.0, 7.0], [0.5, 2.0, 4.0, 8.0, 8.0, 8.0]])
    tokens[..., 0] = norms
    pad = torch.tensor([[False, False, False, False, False, True], [False, False, True, True, True, True]])
    sel, valid = score_text_selector(tokens, pad, 4, by_score=True)
    assert sel[0, :, 0].tolist() == [0.5, 9.0, 5.0, 3.0]  # [SEG] first, then by norm; padding (7.0) skipped
    assert valid[0].tolist() == [True] * 4
    assert sel[1, :, 0].tolist() == [0.5, 2.0, 0.5, 2.0] and valid[1].tolist() == [True, True, False, False]
    sel, _ = score_text_selector(tokens, pad, 4, by_score=False)
    assert sel[0, :, 0].tolist() == [0.5, 5.0, 1.0, 9.0]  # STS off: sequence order


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


def test_registered_with_its_criterion_and_sized_from_the_config(sam) -> None:
    spec = HEAD_REGISTRY["igvg"]
    assert set(spec.loss_weights) == set(build_head_criterion("igvg", cfg=_cfg()).loss_weights)
    assert all(k.startswith("loss_igvg_") for k in spec.loss_weights)
    head = _head(sam)
    assert head.dim == 64 and head.num_queries == 10 and head.score_threshold == 0.7
    assert list(head.parameters()) and not any(p is q for p in head.parameters() for q in sam.parameters())


@pytest.mark.parametrize("text", [True, False])
def test_forward_shapes_with_and_without_text(sam, text) -> None:
    head = _head(sam).eval()
    with torch.no_grad():
        out = head(_inputs(3, text=text))
    expected = {
        "pred_masks": (3, 10, 56, 56), "pred_boxes": (3, 10, 4), "pred_scores": (3, 10), "pred_exists": (3,),
        "pred_global_masks": (3, 56, 56), "pred_points": (3, 10, 2), "pred_text_attn": (3, 14, 14),
        "pred_logits": (3, 10, 2), "pred_logits_layers": (3, 3, 10, 2), "pred_boxes_layers": (3, 3, 10, 4),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert bool(((out["pred_scores"] >= 0) & (out["pred_scores"] <= 1)).all())
    b = out["pred_boxes"]
    assert bool(((b >= 0) & (b <= 1)).all()) and bool((b[..., 2:] >= b[..., :2]).all())
    # the points are centres of cells overlapping the image (row 0's image fills 84 of 112 px: grid rows 0..10)
    assert bool((out["pred_points"][0, :, 1] <= 10.5 / 14 + 1e-6).all())


def test_no_queries(sam) -> None:
    head = _head(sam)
    inputs = _inputs(0)
    out = head(inputs)
    assert out["pred_masks"].shape == (0, 10, 56, 56) and out["pred_exists"].shape == (0,)
    crit = build_head_criterion("igvg", cfg=_cfg())
    losses = crit(out, _targets(0))
    assert set(crit.loss_weights) <= set(losses) and all(float(losses[k]) == 0.0 for k in crit.loss_weights)


@pytest.mark.parametrize("switches", [{}, {"decoder_text_attention": True, "class_head": "text"}])
def test_rows_do_not_interact(sam, switches) -> None:
    """A row's outputs depend on its own [SEG], text and image only (batched = one at a time)."""
    head = _head(sam, **switches).eval()
    inputs = _inputs(3)
    with torch.no_grad():
        full = head(inputs)
        for r in range(3):
            one = HeadInputs(image_embeddings=inputs.image_embeddings, seg_embeddings=inputs.seg_embeddings[r : r + 1],
                             seg_hidden=inputs.seg_hidden[r : r + 1], seg_batch_index=inputs.seg_batch_index[r : r + 1],
                             valid_hw=inputs.valid_hw, text_states=inputs.text_states[r : r + 1],
                             text_padding_mask=inputs.text_padding_mask[r : r + 1])
            single = head(one)
            for k in full:
                torch.testing.assert_close(single[k][0], full[k][r], atol=2e-4, rtol=1e-4)


def test_gradients_reach_seg_embeddings_and_text_states_through_the_criterion(sam) -> None:
    head = _head(sam).train()
    inputs = _inputs(3)
    inputs.seg_embeddings.requires_grad_(True)
    inputs.text_states.requires_grad_(True)
    crit = build_head_criterion("igvg", cfg=_cfg())
    losses = crit(head(inputs), _targets(3, empty_rows=(1,)))
    sum(crit.loss_weights[k] * losses[k] for k in crit.loss_weights).backward()
    assert float(inputs.seg_embeddings.grad.abs().sum()) > 0
    g = inputs.text_states.grad
    assert float(g[0, :7].abs().sum()) > 0 and float(g[1, 3:].abs().sum()) == 0.0  # padding gets nothing
    trained = [n for n, p in head.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert any(n.startswith("decoder.") for n in trained) and any(n.startswith("mask_decoder.") for n in trained)


# --------------------------------------------------------------------------------------------------
# ablation switches
# --------------------------------------------------------------------------------------------------


def _same_weights(a: IGVGHead, b: IGVGHead) -> None:
    b.load_state_dict(a.state_dict())


def test_sts_switch_changes_which_text_tokens_query_the_image(sam) -> None:
    on, off = _head(sam, score_text_selector=True).eval(), _head(sam, score_text_selector=False).eval()
    _same_weights(on, off)
    inputs = _inputs(3, t=14)  # row 0: 14 tokens > N_q = 10, so the choice matters
    with torch.no_grad():
        a, b = on(inputs), off(inputs)
    assert not torch.allclose(a["pred_text_attn"][0], b["pred_text_attn"][0])
    torch.testing.assert_close(a["pred_text_attn"][2], b["pred_text_attn"][2])  # row 2: only [SEG] + 1 token


def test_point_selector_switch(sam) -> None:
    dps, topk = _head(sam, dist_weight=50.0).eval(), _head(sam, point_selector="topk").eval()
    _same_weights(dps, topk)
    inputs = _inputs(3)
    with torch.no_grad():
        a, b = dps(inputs), topk(inputs)
    torch.testing.assert_close(a["pred_text_attn"], b["pred_text_attn"])
    from fclm.model.heads.igvg_ops import grid_valid_mask

    valid = grid_valid_mask(inputs.valid_hw[inputs.seg_batch_index], 112, 14, 14)
    torch.testing.assert_close(a["pred_points"], cell_centers(dist_score_point_selector(a["pred_text_attn"], 10, 50.0, valid), 14, 14))
    torch.testing.assert_close(b["pred_points"], cell_centers(topk_point_selector(b["pred_text_attn"], 10, valid), 14, 14))
    assert not torch.equal(a["pred_points"], b["pred_points"])


@pytest.mark.parametrize("itq", [True, False])
def test_itq_switch_is_the_only_path_from_the_attended_text_to_the_queries(sam, itq) -> None:
    head = _head(sam, inject_text_query=itq, dropout=0.0)
    assert head.query_mlp.layers[0].in_features == (2 if itq else 1) * head.dim
    out = head(_inputs(2))
    out["pred_boxes_layers"].sum().backward()
    grad = head.t2i.ffn[0].weight.grad
    assert (grad is not None and float(grad.abs().sum()) > 0) == itq


def test_query_init_switch(sam) -> None:
    head = _head(sam, query_init="learned").eval()
    with torch.no_grad():
        out = head(_inputs(3))
        expected = head.reference_head(head.query_embed.weight).sigmoid()
    for r in range(3):  # learned reference points, the same for every expression
        torch.testing.assert_close(out["pred_points"][r], expected)
    assert not hasattr(head, "query_mlp")
    points = _head(sam).eval()
    with torch.no_grad():
        p = points(_inputs(3))["pred_points"]
    assert not torch.allclose(p[0], p[1])  # point-initialised: expression-dependent


def test_attention_switch(sam) -> None:
    deform, plain = _head(sam).eval(), _head(sam, attention="plain").eval()
    assert all(isinstance(layer.cross_attn, MSDeformAttn) for layer in deform.decoder)
    assert all(isinstance(layer.cross_attn, torch.nn.MultiheadAttention) for layer in plain.decoder)
    with torch.no_grad():
        a, b = deform(_inputs(2)), plain(_inputs(2))
    assert a["pred_boxes"].shape == b["pred_boxes"].shape and bool(torch.isfinite(b["pred_masks"]).all())
    # deformable attention reads the maps only near the reference points: a far-away change does nothing
    # to the first decoder layer with Deformable DETR's initial offsets (±num_points cells per level)
    layer = deform.decoder[0].cross_attn
    from fclm.model.heads.igvg_ops import Memory

    mem = torch.randn(1, 28 * 28, 64)
    ref = torch.tensor([[[0.1, 0.1]]])
    q = torch.randn(1, 1, 64)
    layer1 = MSDeformAttn(64, 8, 1, 2)
    base = layer1(q, ref, Memory(None, mem, torch.zeros(1, dtype=torch.long), [], [(28, 28)]))
    far = mem.clone().view(1, 28, 28, 64)
    far[:, 20:, 20:] += 10
    moved = layer1(q, ref, Memory(None, far.view(1, -1, 64), torch.zeros(1, dtype=torch.long), [], [(28, 28)]))
    torch.testing.assert_close(base, moved)
    assert layer.num_levels == 4


def test_decoder_text_attention_switch(sam) -> None:
    """On: every decoder layer reads the expression tokens (gradient reaches its text attention, padding
    is ignored); off: the layers have no text attention. A layer that has one refuses to run without text."""
    off = _head(sam)
    assert all(layer.text_attn is None for layer in off.decoder)
    head = _head(sam, decoder_text_attention=True, dropout=0.0)
    inputs = _inputs(3)
    out = head(inputs)
    out["pred_logits_layers"][:, -1].sum().backward()
    for layer in head.decoder:
        assert float(layer.text_attn.in_proj_weight.grad.abs().sum()) > 0
    head.eval()
    padded = inputs.text_states.clone()
    padded[inputs.text_padding_mask] = 1e3  # only padding positions change
    moved = dataclasses.replace(inputs, text_states=padded)
    with torch.no_grad():
        torch.testing.assert_close(head(inputs)["pred_logits"], head(moved)["pred_logits"])
    from fclm.model.heads.igvg_ops import Memory

    mem = Memory(None, torch.randn(1, 16, 64), torch.zeros(1, dtype=torch.long), [], [(4, 4)])
    with pytest.raises(ValueError, match="pass text"):
        head.decoder[0](torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.rand(1, 2, 2), mem)


def test_text_class_head_is_the_scaled_similarity_to_the_seg_state(sam) -> None:
    """class_head=text: object logit = <W_q q, W_t z_seg>/√d + b, no-object logit 0, recomputed here from the
    last decoder layer's queries; the object probability is then σ(object logit)."""
    head = _head(sam, class_head="text").eval()
    assert not hasattr(head, "class_head")
    captured = {}
    head.decoder[-1].register_forward_hook(lambda mod, args, out: captured.__setitem__("tgt", out))
    inputs = _inputs(3)
    with torch.no_grad():
        out = head(inputs)
        z = head.seg_proj(inputs.seg_embeddings)
        expected = torch.stack([
            torch.stack([head.class_query(captured["tgt"][r, q]) @ head.class_text(z[r]) for q in range(10)])
            for r in range(3)
        ]) / math.sqrt(head.dim) + head.class_bias
    torch.testing.assert_close(out["pred_logits"][..., 0], expected)
    assert bool((out["pred_logits"][..., 1] == 0).all())
    torch.testing.assert_close(out["pred_scores"], torch.sigmoid(expected) * torch.sigmoid(out["pred_exists"])[:, None])


# --------------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------------


def _preds(exists: float, scores: list[float]) -> dict[str, torch.Tensor]:
    q = len(scores)
    masks = torch.full((1, q, 8, 8), -5.0)
    for i in range(q):
        masks[0, i, i, :4] = 5.0  # instance i: row i, left half
    glob = torch.full((1, 8, 8), -5.0)
    glob[0, :2, :] = 3.0  # rows 0-1, whole width
    return {
        "pred_masks": masks, "pred_global_masks": glob, "pred_scores": torch.tensor([scores]),
        "pred_boxes": torch.rand(1, q, 4).sort(-1).values, "pred_exists": torch.tensor([math.log(exists / (1 - exists))]),
    }


def test_detections_threshold_fusion_and_no_target(sam) -> None:
    head = _head(sam)
    preds = _preds(0.9, [0.8, 0.2, 0.75, 0.1])
    det = head_detections(head, preds, 0, 0.7)
    assert det.scores.tolist() == pytest.approx([0.8, 0.75]) and det.exists == pytest.approx(0.9)
    torch.testing.assert_close(det.boxes, preds["pred_boxes"][0, [0, 2]])
    union = (det.masks > 0).any(0)
    expected = (preds["pred_global_masks"][0] > 0) | (preds["pred_masks"][0, [0, 2]] > 0).any(0)
    assert torch.equal(union, expected)  # merge = kept instances ∪ global mask
    assert bool((det.masks[1] > 0)[2, :4].all()) and not bool((det.masks[1] > 0)[:2].any())  # instance 2 keeps its own pixels
    # no target: nothing, whatever the scores
    det = head_detections(head, _preds(0.3, [0.9, 0.9, 0.9, 0.9]), 0, 0.7)
    assert det.masks.shape == (0, 8, 8) and det.exists == pytest.approx(0.3)
    # nothing above the threshold: the global mask alone, scored below the threshold
    det = head_detections(head, _preds(0.9, [0.5, 0.2, 0.1, 0.1]), 0, 0.7)
    assert det.masks.shape == (1, 8, 8) and det.boxes is None and det.scores.tolist() == pytest.approx([0.5])
    # global_fallback false: no kept instance means no target, though exists says there is one
    det = head_detections(_head(sam, global_fallback=False), _preds(0.9, [0.5, 0.2, 0.1, 0.1]), 0, 0.7)
    assert det.masks.shape == (0, 8, 8) and det.scores.numel() == 0 and det.exists == pytest.approx(0.9)
    det = head_detections(_head(sam, global_fallback=False), preds, 0, 0.7)  # kept instances: as before
    assert det.scores.tolist() == pytest.approx([0.8, 0.75]) and torch.equal((det.masks > 0).any(0), expected)
    instance_only = _head(sam, output_masks="instance")
    det = head_detections(instance_only, preds, 0, 0.7)
    assert torch.equal(det.masks, preds["pred_masks"][0, [0, 2]])


def test_nms_drops_overlapping_kept_boxes_by_score(sam) -> None:
    """nms_iou: greedy NMS over the kept instances only, highest score first (reference computed by hand)."""
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9], [0.1, 0.1, 0.45, 0.5],
                           [0.6, 0.62, 0.9, 0.9]]])
    scores = [0.8, 0.9, 0.75, 0.95, 0.5]  # query 4 duplicates query 2 but is under the threshold
    preds = {**_preds(0.99, scores), "pred_boxes": boxes}
    off = _head(sam).detections(preds, 0, 0.7)
    assert off.scores.tolist() == pytest.approx([0.8, 0.9, 0.75, 0.95])
    on = _head(sam, nms_iou=0.5).detections(preds, 0, 0.7)
    # 3 (0.95) keeps; 1 and 0 overlap it at IoU 0.83 / 0.875 → dropped; 2 overlaps nothing kept → kept
    assert on.scores.tolist() == pytest.approx([0.75, 0.95]) and torch.equal(on.boxes, boxes[0, [2, 3]])
    loose = _head(sam, nms_iou=0.9).detections(preds, 0, 0.7)
    assert loose.scores.tolist() == pytest.approx([0.9, 0.75, 0.95])  # only 0 vs 1 (IoU 0.95) exceeds 0.9
    with pytest.raises((ValueError, ConfigError), match="nms_iou"):
        _cfg(nms_iou=0.0)


def test_no_target_sample_end_to_end(sam) -> None:
    """A no-target expression: finite losses, and a few steps on it make the head answer "no target"."""
    torch.manual_seed(0)
    head = _head(sam, dropout=0.0).train()
    crit = build_head_criterion("igvg", cfg=_cfg())
    inputs, targets = _inputs(2), _targets(2, empty_rows=(0, 1))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(8):
        losses = crit(head(inputs), targets)
        assert all(bool(torch.isfinite(v)) for v in losses.values())
        assert float(losses["loss_igvg_box_l1"].detach()) == 0.0 and float(losses["loss_igvg_box_giou"].detach()) == 0.0
        opt.zero_grad()
        sum(crit.loss_weights[k] * losses[k] for k in crit.loss_weights).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        out = head(inputs)
    for j in range(2):
        det = head_detections(head, out, j, head.score_threshold)
        assert det.exists < 0.5 and det.masks.shape[0] == 0


# --------------------------------------------------------------------------------------------------
# config and the whole model
# --------------------------------------------------------------------------------------------------


def test_config_fields_and_checks() -> None:
    cfg = _cfg(fpn_scales=[4, 1], point_selector="topk", query_init="learned", attention="plain")
    assert cfg.heads.igvg.fpn_scales == (4.0, 1.0) and cfg.heads.igvg.point_selector == "topk"
    for bad, match in [({"fpn_scales": [4.0, 2.0]}, "must include 1"), ({"fpn_scales": [3.0, 1.0]}, "distinct values"),
                       ({"point_selector": "random"}, "not one of"), ({"hidden_dim": 60}, "multiple"),
                       ({"class_head": "cosine"}, "not one of")]:
        with pytest.raises((ValueError, ConfigError), match=match):
            _cfg(**bad)
    assert dataclasses.replace(IGVGConfig(), hidden_dim=None).hidden_dim is None


def test_fclm_routes_to_igvg_and_the_criterion_trains_the_seg_projector() -> None:
    import numpy as np
    from PIL import Image

    from fclm.masks import encode_mask
    from fclm.model import build_fclm
    from fclm.training.loop import build_criterion

    torch.manual_seed(0)
    model = build_fclm(_cfg()).train()
    m = np.zeros((100, 120), bool)
    m[20:50, 30:70] = True
    records = [
        {"id": "a", "messages": [{"role": "user", "content": "Please segment: the box."}, {"role": "assistant", "content": "[SEG]"}],
         "regions": [], "targets": [{"masks": [encode_mask(m)], "boxes": [[30, 20, 70, 50]]}]},
        {"id": "b", "messages": [{"role": "user", "content": "Please segment: a cat."}, {"role": "assistant", "content": "[SEG]"}],
         "regions": [], "targets": [{"masks": [], "boxes": []}]},
    ]
    images = [Image.fromarray((np.random.default_rng(i).random((100, 120, 3)) * 255).astype("uint8")) for i in range(2)]
    batch = model.processor(records, images)
    outputs = model(batch)
    assert set(outputs["heads"]) == {"igvg"} and outputs["heads"]["igvg"]["pred_masks"].shape[:2] == (2, 10)
    criterion = build_criterion(LossConfig(), model.config)
    losses = criterion(outputs, batch)
    igvg_names = set(HEAD_REGISTRY["igvg"].loss_weights)
    assert igvg_names <= set(losses) and "metric_igvg_cover_acc" in losses
    assert all(bool(torch.isfinite(losses[k])) for k in criterion.loss_names)
    model.zero_grad()
    criterion.weighted_total(losses).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.seg_projector.parameters() if p.requires_grad)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.heads["igvg"].parameters())


def test_deformable_attention_equals_transformers_reference_with_values_per_row() -> None:
    """Sampling the per-image levels once per image = transformers' MultiScaleDeformableAttention on
    values copied per row (rows 0 and 2 share image 1)."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    from fclm.model.heads.igvg_ops import Memory

    torch.manual_seed(0)
    attn = MSDeformAttn(32, 4, 3, 2)
    with torch.no_grad():  # random offsets and weights, not Deformable DETR's initial ones
        for lin in (attn.sampling_offsets, attn.attention_weights):
            lin.weight.normal_(std=0.5)
            lin.bias.normal_(std=0.5)
    image_shapes, row_shapes = [(12, 10), (6, 5)], [(3, 3)]
    image_index = torch.tensor([1, 0, 1])
    memory = Memory(torch.randn(2, 12 * 10 + 6 * 5, 32), torch.randn(3, 9, 32), image_index, image_shapes, row_shapes)
    query, ref = torch.randn(3, 5, 32), torch.rand(3, 5, 2)
    got = attn(query, ref, memory)
    shapes = memory.shapes
    loc, weights = attn.sampling(query, ref, shapes)
    value = memory.rows(attn.value_proj).view(3, -1, 4, 8)
    shapes_t = torch.tensor(shapes)
    start = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
    expected = attn.output_proj(MultiScaleDeformableAttention()(value, shapes_t, shapes, start, loc, weights, 64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
