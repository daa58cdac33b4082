"""HybridRegionExtractor: shapes, ablation flags, foreground selection, deformable sampling and the
position branch against references computed another way."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fclm.config import preset
from fclm.model.region_extractor import HybridRegionExtractor, build_region_extractor

S, C, H, D_VIS, D_LLM = 112, 64, 14, 32, 128


def _extractor(**flags: bool) -> HybridRegionExtractor:
    cfg = dataclasses.replace(preset("tiny").region_extractor, **flags)
    torch.manual_seed(0)
    return build_region_extractor(cfg, sam_dim=C, vision_dim=D_VIS, llm_dim=D_LLM)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, S, S)
    masks[0, 10:40, 20:50] = 1
    masks[1, 50:60, 30:100] = 1
    masks[2, 0:6, 0:6] = 1
    crop_masks = torch.zeros(3, S, S)
    crop_masks[0, 20:90, 20:90] = 1
    crop_masks[1, 40:70, 8:104] = 1
    crop_masks[2, 30:80, 30:80] = 1
    valid_hw = torch.tensor([[112, 112], [84, 112]])
    # boxes normalised to the original image (the valid area of the frame)
    boxes = torch.tensor([[20 / 112, 10 / 112, 50 / 112, 40 / 112], [30 / 112, 50 / 84, 100 / 112, 60 / 84], [0, 0, 6 / 112, 6 / 84]])
    return dict(
        region_masks=masks,
        region_boxes=boxes,
        region_batch_index=torch.tensor([0, 1, 1]),
        valid_hw=valid_hw,
        image_embeddings=torch.randn(2, C, H, H, generator=g),
        crop_embeddings=torch.randn(3, C, H, H, generator=g),
        crop_masks=crop_masks,
        vision_features=[torch.randn(4, 4, D_VIS, generator=g), torch.randn(4, 6, D_VIS, generator=g)],
    )


def test_shapes_and_no_regions() -> None:
    ex = _extractor()
    mask_tokens, pos_tokens = ex(**_inputs())
    assert mask_tokens.shape == (3, D_LLM) and pos_tokens.shape == (3, D_LLM)
    assert torch.isfinite(mask_tokens).all() and torch.isfinite(pos_tokens).all()
    empty = _inputs()
    for k in ("region_masks", "region_boxes", "region_batch_index"):
        empty[k] = empty[k][:0]
    empty["crop_embeddings"] = empty["crop_masks"] = None
    mask_tokens, pos_tokens = ex(**empty)
    assert mask_tokens.shape == (0, D_LLM) and pos_tokens.shape == (0, D_LLM)
    (mask_tokens.sum() + pos_tokens.sum()).backward()  # still part of the graph


STEP_LAYERS = {
    "pixel_enhancement": {"pixel_attn", "pixel_norm"},
    "semantic_guidance": {"sampling_offsets", "attention_weights", "value_proj", "output_proj", "guidance_fuse", "guidance_norm"},
}


@pytest.mark.parametrize(
    "flags",
    [{}, {"local_aggregation": False}, {"pixel_enhancement": False}, {"semantic_guidance": False},
     {"local_aggregation": False, "pixel_enhancement": False, "semantic_guidance": False}],
)
def test_flags_decide_which_layers_exist_and_all_get_gradients(flags: dict[str, bool]) -> None:
    ex = _extractor(**flags)
    top = {n.split(".")[0] for n, _ in ex.named_parameters()}
    for step, layers in STEP_LAYERS.items():
        assert (layers <= top) == flags.get(step, True), (step, top)
    mask_tokens, pos_tokens = ex(**_inputs())
    g = torch.Generator().manual_seed(1)
    (mask_tokens * torch.randn(mask_tokens.shape, generator=g)).sum().backward()
    (pos_tokens * torch.randn(pos_tokens.shape, generator=g)).sum().backward()
    missing = [n for n, p in ex.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # a switched-off step builds nothing, so nothing is left unused


def test_local_aggregation_switches_the_feature_source() -> None:
    for on in (True, False):
        ex = _extractor(local_aggregation=on)
        inputs = _inputs()
        inputs["image_embeddings"].requires_grad_(True)
        inputs["crop_embeddings"].requires_grad_(True)
        mask_tokens, _ = ex(**inputs)
        mask_tokens.pow(2).sum().backward()
        crop_grad, image_grad = inputs["crop_embeddings"].grad, inputs["image_embeddings"].grad
        if on:
            assert crop_grad is not None and crop_grad.abs().sum() > 0 and image_grad is None
        else:
            assert image_grad is not None and image_grad.abs().sum() > 0 and crop_grad is None
    off = _inputs()
    off["crop_embeddings"] = off["crop_masks"] = None
    assert _extractor(local_aggregation=False)(**off)[0].shape == (3, D_LLM)
    with pytest.raises(ValueError, match="local_aggregation needs crop_embeddings"):
        _extractor()(**off)


def test_background_features_are_ignored() -> None:
    ex = _extractor().eval()
    inputs = _inputs()
    with torch.no_grad():
        ref, _ = ex(**inputs)
        coverage = torch.nn.functional.adaptive_avg_pool2d(inputs["crop_masks"][:, None], (H, H))[:, 0]
        changed = dict(inputs)
        changed["crop_embeddings"] = torch.where((coverage > 0)[:, None], inputs["crop_embeddings"], torch.randn(3, C, H, H) * 10)
        out, _ = ex(**changed)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        fg = inputs["crop_embeddings"].clone()
        fg[0, :, 5, 5] += 5.0  # a foreground cell of region 0 (crop mask rows/cols 20..90 → cells 2..11)
        changed["crop_embeddings"] = fg
        out, _ = ex(**changed)
        assert not torch.allclose(out[0], ref[0], atol=1e-4) and torch.allclose(out[1:], ref[1:], atol=1e-5)


def test_semantic_guidance_reads_each_regions_own_image() -> None:
    inputs = _inputs()
    new_vf = [inputs["vision_features"][0], torch.randn(4, 6, D_VIS)]
    for on in (True, False):
        ex = _extractor(semantic_guidance=on).eval()
        with torch.no_grad():
            ref, ref_pos = ex(**inputs)
            out, out_pos = ex(**{**inputs, "vision_features": new_vf})
        torch.testing.assert_close(out[0], ref[0])  # region 0 is on image 0, whose features did not change
        torch.testing.assert_close(out_pos, ref_pos)
        assert (not torch.allclose(out[1:], ref[1:], atol=1e-5)) == on


def _naive_bilinear(fmap: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample (gh,gw,D) at normalised (x, y) with align_corners=False and zero padding, by hand."""
    gh, gw, _ = fmap.shape
    px, py = x * gw - 0.5, y * gh - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(fmap.shape[-1], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < gh and 0 <= xx < gw:
                out += wy * wx * fmap[yy, xx].double()
    return out


def test_deformable_sampling_matches_naive_bilinear() -> None:
    ex = _extractor()
    torch.manual_seed(5)
    torch.nn.init.normal_(ex.sampling_offsets.weight, std=0.5)  # query-dependent offsets, some off the map
    torch.nn.init.normal_(ex.attention_weights.weight, std=0.5)
    inputs = _inputs()
    query = torch.randn(3, ex.hidden_dim)
    boxes = inputs["region_boxes"]
    centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
    with torch.no_grad():
        got = ex._deformable_sample(query, centre, inputs["region_batch_index"], inputs["vision_features"])
        nh, k, hd = ex.num_heads, ex.num_points, ex.hidden_dim // ex.num_heads
        offsets = ex.sampling_offsets(query).view(3, nh, k, 2)
        weights = ex.attention_weights(query).view(3, nh, k).softmax(-1)
        expected = torch.zeros(3, nh, hd, dtype=torch.float64)
        for r in range(3):
            fmap = inputs["vision_features"][int(inputs["region_batch_index"][r])]
            value = ex.value_proj(fmap)
            gh, gw = fmap.shape[:2]
            for h in range(nh):
                for p in range(k):
                    x = float(centre[r, 0] + offsets[r, h, p, 0] / gw)
                    y = float(centre[r, 1] + offsets[r, h, p, 1] / gh)
                    sample = _naive_bilinear(value[..., h * hd : (h + 1) * hd], x, y)
                    expected[r, h] += float(weights[r, h, p]) * sample
        expected = ex.output_proj(expected.reshape(3, -1).float())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_position_features_equal_area_pooling() -> None:
    ex = _extractor()
    p = ex.pooled_mask_size
    g = torch.Generator().manual_seed(2)
    masks = (torch.rand(2, S, S, generator=g) > 0.5).float()
    valid_hw = torch.tensor([[112, 112], [112, 96]])
    # region 1: a box of 32 × 16 pixels at x 16..48, y 28..44 inside a 112 × 96 valid area
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [16 / 96, 28 / 112, 48 / 96, 44 / 112]])
    feats = ex.position_features(masks, boxes, torch.tensor([0, 1]), valid_hw)
    assert feats.shape == (2, 2 * p * p + 4)
    for r, (vh, vw) in enumerate(valid_hw.tolist()):
        on_image = masks[r, :vh, :vw].reshape(p, vh // p, p, vw // p).mean((1, 3)).flatten()
        torch.testing.assert_close(feats[r, : p * p], on_image, atol=1e-5, rtol=0)
    on_box = masks[1, 28:44, 16:48].reshape(p, 1, p, 2).mean((1, 3)).flatten()
    torch.testing.assert_close(feats[1, p * p : 2 * p * p], on_box, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[0, p * p : 2 * p * p], feats[0, : p * p])  # box = whole image
    torch.testing.assert_close(feats[1, -4:], torch.tensor([32 / 96, 36 / 112, 32 / 96, 16 / 112]))


def test_bad_inputs_are_named() -> None:
    ex = _extractor()
    inputs = _inputs()
    with pytest.raises(ValueError, match="region_boxes"):
        ex(**{**inputs, "region_boxes": inputs["region_boxes"][:2]})
    with pytest.raises(ValueError, match="semantic_guidance needs vision_features"):
        ex(**{**inputs, "vision_features": None})
    with pytest.raises(ValueError, match=r"vision_features\[1\] must be \(gh,gw,32\)"):
        ex(**{**inputs, "vision_features": [inputs["vision_features"][0], torch.randn(4, 4, 7)]})


def test_position_branch_options_build_the_mlp_they_name() -> None:
    ex = _extractor(pos_hidden_dim=48, pos_layers=4, pos_activation="relu", pos_norm="layernorm")
    kinds = [type(m).__name__ for m in ex.pos_mlp]
    assert kinds == ["Linear", "LayerNorm", "ReLU"] * 3 + ["Linear"]
    assert [m.out_features for m in ex.pos_mlp if isinstance(m, torch.nn.Linear)] == [48, 48, 48, D_LLM]
    _, pos_tokens = ex(**_inputs())
    feats = ex.position_features(_inputs()["region_masks"], _inputs()["region_boxes"], torch.tensor([0, 1, 1]), _inputs()["valid_hw"])
    torch.testing.assert_close(pos_tokens, ex.position_token(feats))
    plain = _extractor(pos_hidden_dim=None, pos_layers=1, pos_norm="none")
    assert [type(m).__name__ for m in plain.pos_mlp] == ["Linear"]
    with pytest.raises(ValueError, match="pos_layers"):
        dataclasses.replace(preset("tiny").region_extractor, pos_layers=0)
    with pytest.raises(ValueError, match="pos_norm"):
        HybridRegionExtractor(sam_dim=C, vision_dim=D_VIS, llm_dim=D_LLM, hidden_dim=64, pos_norm="batchnorm")


def test_older_saved_configs_keep_their_position_branch() -> None:
    from fclm.config import FCLMConfig, from_dict, to_dict
    from fclm.model.region_extractor import LEGACY_POSITION_BRANCH, with_legacy_position_branch

    saved = to_dict(preset("tiny"))
    old = {**saved, "region_extractor": {k: v for k, v in saved["region_extractor"].items() if not k.startswith("pos_")}}
    cfg = from_dict(FCLMConfig, with_legacy_position_branch(old))
    assert {k: getattr(cfg.region_extractor, k) for k in LEGACY_POSITION_BRANCH} == LEGACY_POSITION_BRANCH
    assert with_legacy_position_branch(saved) == saved  # a config that names the options keeps them
