"""The assembled FCLM model (tiny preset): forward/backward, HF parity, token placement, rope, save/load, generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fclm.config import LossConfig, preset
from fclm.losses import FCLMCriterion
from fclm.masks import encode_mask
from fclm.model import FCLM, build_fclm


def _image(h: int = 100, w: int = 120, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _mask(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


M1 = _mask(100, 120, 20, 50, 30, 70)
M2 = _mask(100, 120, 60, 90, 10, 40)


def _records() -> list[dict]:
    return [
        {
            "id": "res",
            "messages": [{"role": "user", "content": "Please segment: the box."}, {"role": "assistant", "content": "[SEG]"}],
            "regions": [],
            "targets": [{"masks": [encode_mask(M1)], "boxes": [[30, 20, 70, 50]]}],
        },
        {
            "id": "caption",
            "messages": [{"role": "user", "content": "Describe <region> in detail."}, {"role": "assistant", "content": "A box."}],
            "regions": [{"mask": encode_mask(M2), "box": [10, 60, 40, 90]}],
            "targets": [],
        },
        {
            "id": "dlres",
            "messages": [{"role": "user", "content": "Please segment: a box"}, {"role": "assistant", "content": "It is [SEG]."}],
            "regions": [{"mask": encode_mask(M1), "box": [30, 20, 70, 50], "target_index": 0, "in_prompt": False}],
            "targets": [{"masks": [encode_mask(M1)], "boxes": [[30, 20, 70, 50]]}],
        },
    ]


@pytest.fixture(scope="module")
def model() -> FCLM:
    torch.manual_seed(0)
    return build_fclm(preset("tiny")).eval()


@pytest.fixture(scope="module")
def batch(model) -> dict:
    return model.processor(_records(), [_image(seed=i) for i in range(3)])


def _capture_llm_inputs(model: FCLM):
    """Record the keyword inputs the language model receives."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    return seen, model.qwen.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_forward_backward_losses_finite_and_gradients_reach_the_trained_parts(model, batch):
    model.train()
    model.zero_grad()
    outputs = model(batch)
    criterion = FCLMCriterion(LossConfig())
    losses = criterion(outputs, batch)
    assert set(losses) == {"loss_ce", "loss_mask_bce", "loss_mask_dice", "loss_self_recon", "loss_latent"}
    for name, value in losses.items():
        assert torch.isfinite(value), name
        assert float(value) > 0, name  # every loss has inputs in this batch
    criterion.weighted_total(losses).backward()

    def grads(module) -> list[bool]:
        return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters() if p.requires_grad]

    llm = model.qwen.model.language_model
    assert all(p.grad is not None for n, p in llm.named_parameters() if "q_proj" in n or "v_proj" in n)
    assert any(grads(model.region_extractor)) and all(p.grad is not None for p in model.region_extractor.parameters())
    assert all(grads(model.seg_projector)) and all(grads(model.pos_projector))
    assert any(grads(model.sam.mask_decoder))
    assert all(p.grad is None for p in model.sam.image_encoder.parameters())
    assert all(p.grad is None for p in model.qwen.model.visual.parameters())
    model.eval()


def test_without_regions_or_seg_logits_equal_plain_hf_model(model):
    records = [
        {"id": "a", "messages": [{"role": "user", "content": "What is in the image?"}, {"role": "assistant", "content": "Shapes."}],
         "regions": [], "targets": []},
        {"id": "b", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A much longer answer here."}],
         "regions": [], "targets": []},
    ]
    batch = model.processor(records, [_image(80, 90, 1), _image(120, 60, 2)])
    assert (batch["attention_mask"] == 0).any()  # padding is exercised
    with torch.no_grad():
        ours = model(batch)["logits"]
        ref = model.qwen(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
        ).logits
    keep = batch["attention_mask"].bool()
    assert (ours[keep] - ref[keep]).abs().max() <= 1e-5


def test_region_embeddings_land_exactly_at_mask_and_pos_positions(model, batch):
    seen, handle = _capture_llm_inputs(model)
    try:
        with torch.no_grad():
            outputs = model(batch)
    finally:
        handle.remove()
    embeds = seen["inputs_embeds"]
    in_prompt = batch["region_in_prompt"]
    for name, key in (("mask", "mask_tokens"), ("pos", "pos_tokens")):
        positions = batch["input_ids"] == model.token_ids[name]
        assert int(positions.sum()) == int(in_prompt.sum()) == 1
        torch.testing.assert_close(embeds[positions], outputs[key][in_prompt], rtol=0, atol=0)
    # every other text position keeps its token embedding
    table = model.qwen.get_input_embeddings().weight
    other = (batch["input_ids"] != model.token_ids["mask"]) & (batch["input_ids"] != model.token_ids["pos"])
    other &= batch["input_ids"] != model.token_ids["image_pad"]
    torch.testing.assert_close(embeds[other], table[batch["input_ids"][other]], rtol=0, atol=0)


def _reference_rope(input_ids: list[int], image_pad: int, grid_hw: tuple[int, int], merge: int) -> np.ndarray:
    """3-D rope positions written from the Qwen2-VL paper's rule: text advances all axes by 1; the image
    block starts at the next text position and spans (t, row, col) of the merged grid; text after the
    image resumes at max position + 1."""
    gh, gw = grid_hw[0] // merge, grid_hw[1] // merge
    pos = np.zeros((3, len(input_ids)), dtype=np.int64)
    nxt, i = 0, 0
    while i < len(input_ids):
        if input_ids[i] == image_pad:
            for k in range(gh * gw):
                pos[:, i + k] = (nxt, nxt + k // gw, nxt + k % gw)
            nxt = int(pos[:, i : i + gh * gw].max()) + 1
            i += gh * gw
        else:
            pos[:, i] = nxt
            nxt += 1
            i += 1
    return pos


def test_3d_rope_positions_equal_reference_for_image_inputs(model):
    records = [
        {"id": "r", "messages": [{"role": "user", "content": "Describe the picture."}, {"role": "assistant", "content": "Ok."}],
         "regions": [], "targets": []},
    ]
    batch = model.processor(records, [_image(112, 168, 3)])
    seen, handle = _capture_llm_inputs(model)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    t, h, w = batch["image_grid_thw"][0].tolist()
    ref = _reference_rope(batch["input_ids"][0].tolist(), model.token_ids["image_pad"], (h, w), 2)
    got = seen["position_ids"]
    got = got[-3:, 0] if got.shape[0] == 4 else got[:, 0]  # transformers may prepend text positions
    np.testing.assert_array_equal(got.numpy(), ref)


def test_mask_token_count_must_match_regions(model, batch):
    broken = dict(batch)
    broken["region_in_prompt"] = torch.zeros_like(batch["region_in_prompt"])
    with pytest.raises(ValueError, match=r"1 <mask> tokens but 0 in-prompt region masks"):
        model(broken)


def test_head_routing_rejects_unknown_head(model, batch):
    routed = dict(batch)
    routed["heads"] = ["igvg", "sam", "sam"]
    with pytest.raises(ValueError, match="igvg"):
        model(routed)


def test_save_load_round_trip_gives_identical_outputs(model, batch, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = FCLM.from_pretrained(tmp_path / "m").eval()
    batch2 = loaded.processor(_records(), [_image(seed=i) for i in range(3)])
    for key in ("input_ids", "labels", "pixel_values", "sam_images", "region_masks"):
        torch.testing.assert_close(batch2[key], batch[key], rtol=0, atol=0)
    with torch.no_grad():
        a, b = model(batch), loaded(batch2)
    for key in ("logits", "seg_embeddings", "pos_embeddings", "pred_recon_masks"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.testing.assert_close(a["heads"]["sam"]["pred_masks"], b["heads"]["sam"]["pred_masks"], rtol=0, atol=0)
    assert loaded.token_ids == model.token_ids


def test_from_pretrained_rejects_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="fclm_config.json"):
        FCLM.from_pretrained(tmp_path)


def test_generate_matches_a_hand_written_greedy_loop(model):
    prompt = model.processor.prompt_for_generation(
        _image(90, 110, 4), "Describe <region> in detail.", regions=[_mask(90, 110, 10, 40, 20, 60)]
    )
    new = model.generate(prompt, max_new_tokens=6)[0]
    # reference: full forward without cache, arg-max, append, repeat
    batch = dict(prompt)
    ref = []
    with torch.no_grad():
        for _ in range(6):
            logits = model(batch)["logits"][0, -1]
            nxt = int(logits.argmax())
            ref.append(nxt)
            if nxt == model.token_ids["im_end"]:
                break
            batch = dict(batch)
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([[nxt]])], dim=1)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros((1, 1), dtype=torch.long)], 1)
    assert new[: len(ref)].tolist() == ref


def test_seg_query_norm_learns_statistics_in_training_and_save_load_keeps_them(batch, tmp_path):
    torch.manual_seed(0)
    assert build_fclm(preset("tiny")).seg_projector.norm is None  # every preset: LISA's plain projector
    cfg = preset("tiny")
    cfg.seg_query_norm = "standardize"
    fresh = build_fclm(cfg).train()
    norm = fresh.seg_projector.norm
    assert norm is not None and int(norm.num_batches) == 0
    out = fresh(batch)  # the first batch sets the statistics and is normalised with them
    seg = out["seg_hidden"].detach()
    assert seg.shape[0] == 2 and int(norm.num_batches) == 1
    torch.testing.assert_close(norm.running_mean, seg.mean(0))
    torch.testing.assert_close(norm.running_var, seg.var(0, unbiased=False))
    # z_seg is the MLP of the standardised h[SEG]
    expected = fresh.seg_projector.layers((seg - seg.mean(0)) / torch.sqrt(seg.var(0, unbiased=False) + norm.eps))
    torch.testing.assert_close(out["seg_embeddings"], expected)
    fresh.eval()
    fresh.save_pretrained(tmp_path / "m")
    loaded = FCLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.seg_projector.norm.running_mean, norm.running_mean, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["seg_embeddings"], fresh(batch)["seg_embeddings"], rtol=0, atol=0)
    assert {preset(n).seg_query_norm for n in ("tiny", "small", "fclm-3b", "fclm-7b")} == {"none"}  # one wiring
