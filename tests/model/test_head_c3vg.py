"""The ``c3vg`` head: outputs per query on its own image, gradients to the [SEG] and text inputs, no-target and
empty batches, the MIM / consistency switches, and the head inside FCLM with its criterion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from fclm.config import ConfigError, FCLMConfig, LossConfig, from_dict, model_config_from_dict, preset
from fclm.losses.c3vg import C3VG_LOSS_WEIGHTS
from fclm.losses.heads import HeadTargets
from fclm.masks import encode_mask
from fclm.model.heads import C3VGHead, HeadInputs, build_head, build_head_criterion, default_detections
from fclm.model.sam import SamBackend, build_sam

LLM_DIM = 128
C, G, S = 64, 14, 112  # tiny preset: prompt dim, embedding grid, frame


def _cfg(**c3vg) -> FCLMConfig:
    cfg = preset("tiny")
    heads = dataclasses.replace(
        cfg.heads, enabled=("sam", "c3vg"), default="c3vg", c3vg=dataclasses.replace(cfg.heads.c3vg, **c3vg)
    )
    return dataclasses.replace(cfg, heads=heads)


@pytest.fixture(scope="module")
def sam() -> SamBackend:
    torch.manual_seed(0)
    return build_sam(preset("tiny").sam)


def _head(sam: SamBackend, seed: int = 0, **c3vg) -> C3VGHead:
    torch.manual_seed(seed)
    return build_head("c3vg", cfg=_cfg(**c3vg), sam=sam, llm_dim=LLM_DIM)


def _inputs(n: int = 5, *, text: bool = True, seed: int = 0, grad: bool = False) -> HeadInputs:
    g = torch.Generator().manual_seed(seed)
    index = torch.tensor([2, 0, 2, 1, 0, 1, 2, 0][:n], dtype=torch.long)
    lengths = torch.tensor([4, 1, 6, 3, 2, 6, 5, 1][:n])
    text_states = torch.randn(n, 6, LLM_DIM, generator=g) if text else None
    return HeadInputs(
        image_embeddings=torch.randn(3, C, G, G, generator=g),
        seg_embeddings=torch.randn(n, C, generator=g).requires_grad_(grad),
        seg_hidden=torch.randn(n, LLM_DIM, generator=g).requires_grad_(grad),
        seg_batch_index=index,
        valid_hw=torch.tensor([[112, 112], [84, 112], [112, 70]]),
        text_states=None if text_states is None else text_states.requires_grad_(grad),
        text_padding_mask=(torch.arange(6)[None] >= lengths[:, None]) if text else None,
    )


def _targets(n: int, exists: list[bool] | None = None) -> HeadTargets:
    exists = exists if exists is not None else [True] * n
    masks, inst_masks, inst_boxes = [], [], []
    for i, e in enumerate(exists):
        m = torch.zeros(S, S)
        if e:
            y0, x0 = 8 + 4 * i, 10 + 3 * i
            m[y0 : y0 + 40, x0 : x0 + 30] = 1
            inst_boxes.append(torch.tensor([[x0, y0, x0 + 30, y0 + 40]], dtype=torch.float32) / S)
            inst_masks.append(m[None].clone())
        else:
            inst_boxes.append(torch.zeros(0, 4))
            inst_masks.append(torch.zeros(0, S, S))
        masks.append(m)
    return HeadTargets(
        masks=torch.stack(masks) if masks else torch.zeros(0, S, S), exists=torch.tensor(exists, dtype=torch.bool),
        instance_masks=inst_masks, instance_boxes=inst_boxes, valid_hw=torch.full((n, 2), S),
    )


def _total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(C3VG_LOSS_WEIGHTS[k] * losses[k] for k in C3VG_LOSS_WEIGHTS)


def test_outputs_for_several_queries_on_several_images(sam: SamBackend) -> None:
    head = _head(sam).eval()
    inputs = _inputs(5)
    with torch.no_grad():
        out = head(inputs)
    assert set(out) == {"pred_masks", "pred_boxes", "pred_scores", "pred_coarse_masks", "pred_coarse_boxes"}
    assert out["pred_masks"].shape == out["pred_coarse_masks"].shape == (5, 4 * G, 4 * G) == (5, *sam.low_res_size)
    for key in ("pred_boxes", "pred_coarse_boxes"):
        b = out[key]
        assert b.shape == (5, 4) and (b >= 0).all() and (b <= 1).all()
        assert (b[:, 2:] >= b[:, :2]).all()
    assert out["pred_scores"].shape == (5,) and (out["pred_scores"] >= 0).all() and (out["pred_scores"] <= 1).all()
    # the refined box starts as the coarse box (zero-initialised refinement)
    torch.testing.assert_close(out["pred_boxes"], out["pred_coarse_boxes"], atol=1e-5, rtol=0)
    # each query reads its own image: decoding it alone on that image gives the same rows
    for i in range(5):
        b = int(inputs.seg_batch_index[i])
        alone = HeadInputs(
            image_embeddings=inputs.image_embeddings[b : b + 1],
            seg_embeddings=inputs.seg_embeddings[i : i + 1],
            seg_hidden=inputs.seg_hidden[i : i + 1],
            seg_batch_index=torch.zeros(1, dtype=torch.long),
            valid_hw=inputs.valid_hw[b : b + 1],
            text_states=inputs.text_states[i : i + 1],
            text_padding_mask=inputs.text_padding_mask[i : i + 1],
        )
        with torch.no_grad():
            one = head(alone)
        for key in out:
            torch.testing.assert_close(one[key][0], out[key][i], atol=1e-4, rtol=1e-4)
    det = default_detections(out, 0, 0.5)
    assert det.masks.shape == (1, 4 * G, 4 * G) and det.boxes.shape == (1, 4) and det.scores.shape == (1,)


def test_gradients_reach_seg_inputs_and_text_states_but_not_padding(sam: SamBackend) -> None:
    head = _head(sam).train()
    inputs = _inputs(5, grad=True)
    crit = build_head_criterion("c3vg", cfg=_cfg())
    _total(crit(head(inputs), _targets(5))).backward()
    for t in (inputs.seg_embeddings, inputs.seg_hidden, inputs.text_states):
        assert t.grad is not None and bool((t.grad.flatten(1).abs().sum(1) > 0).all())
    pad = inputs.text_padding_mask
    assert float(inputs.text_states.grad[pad].abs().sum()) == 0.0 and bool((inputs.text_states.grad[~pad].abs().sum(-1) > 0).all())
    assert all(p.grad is not None for p in head.parameters())


def test_text_free_query_empty_batch_and_no_target_queries_run_end_to_end(sam: SamBackend) -> None:
    head = _head(sam).train()
    crit = build_head_criterion("c3vg", cfg=_cfg())
    out = head(_inputs(3, text=False))
    assert out["pred_masks"].shape == (3, 4 * G, 4 * G)

    empty = head(_inputs(0))
    assert empty["pred_masks"].shape == (0, 4 * G, 4 * G) and empty["pred_boxes"].shape == (0, 4)
    assert empty["pred_scores"].shape == (0,) and empty["pred_coarse_boxes"].shape == (0, 4)
    losses = crit(empty, _targets(0))
    assert set(losses) == set(C3VG_LOSS_WEIGHTS) and all(float(v.detach()) == 0.0 for v in losses.values())

    inputs = _inputs(3, grad=True)
    losses = crit(head(inputs), _targets(3, exists=[False, True, False]))
    assert all(torch.isfinite(v) for v in losses.values())
    _total(losses).backward()
    assert inputs.seg_embeddings.grad[[0, 2]].abs().sum() > 0  # the no-target queries learn the empty mask

    head.zero_grad()
    inputs = _inputs(2, grad=True)
    losses = crit(head(inputs), _targets(2, exists=[False, False]))
    for k in ("box_l1", "box_giou", "coarse_box_l1", "coarse_box_giou", "cons_mask_to_box", "cons_box_to_mask"):
        assert float(losses[f"loss_c3vg_{k}"].detach()) == 0.0
    _total(losses).backward()
    assert torch.isfinite(inputs.seg_embeddings.grad).all() and inputs.seg_embeddings.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())  # graph zeros reach the box MLPs too


def test_consistency_switch_changes_the_loss_terms_and_the_gradients(sam: SamBackend) -> None:
    head = _head(sam).train()
    grads, losses = {}, {}
    for on in (True, False):
        inputs = _inputs(4, grad=True)
        crit = build_head_criterion("c3vg", cfg=_cfg(consistency=on))
        losses[on] = crit(head(inputs), _targets(4))
        _total(losses[on]).backward()
        grads[on] = inputs.seg_embeddings.grad.clone()
    for k in ("loss_c3vg_cons_mask_to_box", "loss_c3vg_cons_box_to_mask"):
        assert float(losses[True][k].detach()) > 0 and float(losses[False][k].detach()) == 0.0
    assert not torch.allclose(grads[True], grads[False])


def test_mim_switch_removes_the_interaction_module(sam: SamBackend) -> None:
    with_mim, without = _head(sam), _head(sam, mim=False)
    assert with_mim.mim is not None and without.mim is None
    assert not any(k.startswith("mim.") for k in without.state_dict())
    assert sum(p.numel() for p in without.parameters()) < sum(p.numel() for p in with_mim.parameters())
    inputs = _inputs(3, grad=True)
    out = without(inputs)
    assert out["pred_masks"].shape == (3, 4 * G, 4 * G) and out["pred_boxes"].shape == (3, 4)
    _total(build_head_criterion("c3vg", cfg=_cfg())(out, _targets(3))).backward()
    assert inputs.text_states.grad.abs().sum() > 0  # stage 1 still reads the expression
    deeper = _head(sam, mim_layers=2)
    assert len(deeper.mim.layers) == 2


@pytest.mark.parametrize("anchor", ["none", "mask"])
def test_padding_cells_are_not_attended_by_the_query(sam: SamBackend, anchor: str) -> None:
    head = _head(sam, coarse_box_anchor=anchor).eval()
    inputs = _inputs(2)  # image 2 (query 0) is 70 wide: columns 9.. of the 14-cell grid are padding
    changed = inputs.image_embeddings.clone()
    changed[2, :, :, 9:] += 5.0
    with torch.no_grad():
        a = head(inputs)
        b = head(dataclasses.replace(inputs, image_embeddings=changed))
    torch.testing.assert_close(a["pred_coarse_boxes"][0], b["pred_coarse_boxes"][0], rtol=0, atol=0)
    assert not torch.equal(a["pred_coarse_masks"][0], b["pred_coarse_masks"][0])  # the masks do see those cells


def test_mask_anchor_centres_the_coarse_box_on_the_coarse_mask(sam: SamBackend) -> None:
    """``coarse_box_anchor: mask``: with a zero offset the coarse box is centred on the softmax-weighted centre
    of the coarse mask logits over the image's valid pixels (computed here in numpy), sized by the MLP."""
    head = _head(sam, coarse_box_anchor="mask").eval()
    last = head.coarse_box.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, -1.0, 0.5]))
    inputs = _inputs(3)  # query 0 on image 2 (valid width 70 of 112), 1 on image 0, 2 on image 2
    with torch.no_grad():
        out = head(inputs)
    logits = out["pred_coarse_masks"].double().numpy()
    H = W = 4 * G
    for i in range(3):
        vh, vw = inputs.valid_hw[int(inputs.seg_batch_index[i])].tolist()
        # valid pixels: those of embedding cells that start inside the image (4 pixels per cell and axis)
        rows = (np.arange(H) // 4) * S < vh * G
        cols = (np.arange(W) // 4) * S < vw * G
        lg = np.where(rows[:, None] & cols[None, :], logits[i], -np.inf)
        p = np.exp(lg - lg.max())
        p /= p.sum()
        cx = float((p.sum(0) * (np.arange(W) + 0.5) / W).sum())
        cy = float((p.sum(1) * (np.arange(H) + 0.5) / H).sum())
        w, h = 1 / (1 + np.exp(1.0)), 1 / (1 + np.exp(-0.5))
        expected = np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, 1)
        np.testing.assert_allclose(out["pred_coarse_boxes"][i].numpy(), expected, atol=1e-4)
    # and the box moves with the mask: the mask's weights get gradient from the coarse box alone
    for anchor, moves in (("mask", True), ("none", False)):
        head = _head(sam, coarse_box_anchor=anchor).train()
        head(_inputs(3))["pred_coarse_boxes"].sum().backward()
        grad = head.coarse_kernel.layers[0].weight.grad
        assert (grad is not None and float(grad.abs().sum()) > 0) == moves, anchor


def test_config_fields_overrides_and_checks() -> None:
    cfg = model_config_from_dict({"preset": "tiny", "heads": {"enabled": ["c3vg"], "default": "c3vg",
                                                              "c3vg": {"mim": False, "mim_layers": 2, "hidden_dim": 32}}})
    c = cfg.heads.c3vg
    assert (c.mim, c.mim_layers, c.hidden_dim, c.consistency, c.mlp_dim) == (False, 2, 32, True, None)
    head = build_head("c3vg", cfg=cfg, sam=build_sam(cfg.sam), llm_dim=LLM_DIM)
    assert head.hidden_dim == 32 and head.query_to_text.mlp.lin1.out_features == 128
    assert build_head("c3vg", cfg=_cfg(), sam=build_sam(cfg.sam), llm_dim=LLM_DIM).hidden_dim == C  # None: prompt dim
    with pytest.raises(ConfigError, match="heads.c3vg.mim"):
        model_config_from_dict({"preset": "tiny", "heads": {"c3vg": {"mim": "yes"}}})
    assert c.coarse_box_anchor == "none"  # the paper's regressed coarse box unless a run asks for the mask anchor
    for bad in ({"hidden_dim": 60}, {"mim_layers": 0}, {"box_outside_weight": 1.5}, {"hidden_dim": 36, "num_heads": 4},
                {"coarse_box_anchor": "centre"}):
        with pytest.raises((ValueError, ConfigError), match="heads.c3vg"):
            from_dict(FCLMConfig, {"heads": {"c3vg": bad}})
    with pytest.raises(ValueError, match="not a multiple of heads.c3vg.num_heads 3"):
        build_head("c3vg", cfg=_cfg(num_heads=3), sam=build_sam(cfg.sam), llm_dim=LLM_DIM)


# ------------------------------------------------------------------------------------------------
# Inside FCLM
# ------------------------------------------------------------------------------------------------


def _image(h: int = 100, w: int = 120, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((100, 120), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_fclm_with_the_c3vg_head_trains_through_its_criterion() -> None:
    from fclm.model import build_fclm
    from fclm.training.loop import build_criterion

    cfg = model_config_from_dict({"preset": "tiny", "heads": {"enabled": ["sam", "c3vg"], "default": "c3vg"}})
    torch.manual_seed(0)
    model = build_fclm(cfg).train()
    m1, m2 = _box_mask(20, 50, 30, 70), _box_mask(60, 90, 10, 40)
    records = [
        {"id": "res", "messages": [{"role": "user", "content": "Please segment: the box."}, {"role": "assistant", "content": "[SEG]"}],
         "regions": [], "targets": [{"masks": [encode_mask(m1)], "boxes": [[30, 20, 70, 50]]}]},
        {"id": "caption", "messages": [{"role": "user", "content": "Describe <region> in detail."}, {"role": "assistant", "content": "A box."}],
         "regions": [{"mask": encode_mask(m2), "box": [10, 60, 40, 90]}], "targets": []},
        {"id": "two", "messages": [{"role": "user", "content": "Segment both boxes"}, {"role": "assistant", "content": "Here [SEG]."}],
         "regions": [], "targets": [{"masks": [encode_mask(m1), encode_mask(m2)], "boxes": [[30, 20, 70, 50], [10, 60, 40, 90]]}]},
    ]
    batch = model.processor(records, [_image(seed=i) for i in range(3)])
    outputs = model(batch)
    preds = outputs["heads"]["c3vg"]
    assert "sam" not in outputs["heads"] and preds["query_index"].tolist() == [0, 1]
    assert preds["pred_masks"].shape == (2, *model.sam.low_res_size) and preds["pred_boxes"].shape == (2, 4)

    criterion = build_criterion(LossConfig(), model.config)
    losses = criterion(outputs, batch)
    assert set(C3VG_LOSS_WEIGHTS) <= set(losses) and {"loss_mask_bce", "loss_mask_dice"} <= set(losses)
    for name in C3VG_LOSS_WEIGHTS:
        assert torch.isfinite(losses[name]) and float(losses[name].detach()) > 0, name
    assert float(losses["loss_mask_bce"].detach()) == 0.0  # nothing routed to the sam head
    model.zero_grad()
    criterion.weighted_total(losses).backward()

    def nonzero(p: torch.nn.Parameter) -> bool:
        return p.grad is not None and bool(p.grad.abs().sum() > 0)

    head = model.heads["c3vg"]
    assert all(nonzero(p) for p in model.seg_projector.parameters() if p.requires_grad)
    assert all(nonzero(p) for p in head.text_proj.parameters())  # the expression states feed the head
    assert all(nonzero(p) for p in head.hidden_proj.parameters())  # and h[SEG] directly
    llm = model.qwen.model.language_model
    assert any(nonzero(p) for n, p in llm.named_parameters() if "q_proj" in n)
    assert nonzero(model.qwen.get_input_embeddings().weight)


def test_text_fusion_lets_the_expression_reach_the_pixels_without_the_query() -> None:
    """With text_fusion the coarse mask changes with the expression even when the query is identical."""
    import dataclasses

    from fclm.config import model_config_from_dict
    from fclm.model.heads import HeadInputs, build_head
    from fclm.model.sam import build_sam

    masks = {}
    for fusion in (True, False):
        cfg = model_config_from_dict({"preset": "tiny", "heads": {"enabled": ["c3vg"], "default": "c3vg",
                                                                   "c3vg": {"text_fusion": fusion}}})
        torch.manual_seed(0)
        head = build_head("c3vg", cfg=cfg, sam=build_sam(cfg.sam), llm_dim=32).eval()
        assert (head.text_fusion is not None) == fusion
        with torch.no_grad():  # the query no longer reads the text: only the fusion can carry it
            head.query_to_text.attn.out_proj.weight.zero_()
            head.query_to_text.attn.out_proj.bias.zero_()
        e, c = cfg.sam.embedding_size, cfg.sam.prompt_embed_dim
        base = dict(image_embeddings=torch.randn(1, c, e, e).expand(2, -1, -1, -1), seg_embeddings=torch.randn(1, c).expand(2, -1),
                    seg_hidden=torch.randn(1, 32).expand(2, -1), seg_batch_index=torch.tensor([0, 1]),
                    valid_hw=torch.full((2, 2), cfg.sam.img_size))
        text = torch.randn(2, 5, 32)
        with torch.no_grad():
            out = head(HeadInputs(**base, text_states=text, text_padding_mask=torch.zeros(2, 5, dtype=torch.bool)))
        masks[fusion] = out["pred_coarse_masks"]
    assert not torch.allclose(masks[True][0], masks[True][1])
    torch.testing.assert_close(masks[False][0], masks[False][1])
    del dataclasses


def test_image_features_carry_their_position_even_when_the_encoder_does_not(sam: SamBackend) -> None:
    """A spatially constant embedding (a random SAM's zero ``pos_embed``) still gives the query position-bearing
    values: moving where the query attends moves its coarse box."""
    head = _head(sam, text_fusion=False).eval()
    inputs = _inputs(1, text=False)
    flat = inputs.image_embeddings.mean((2, 3), keepdim=True).expand(-1, -1, G, G).contiguous()
    inputs = dataclasses.replace(inputs, image_embeddings=flat)
    boxes = []
    for cell in (0, G * G - 1):  # the query attends (almost) only to the top-left, then the bottom-right cell
        key_bias = torch.zeros(G * G, C)
        key_bias[cell] = 50.0

        def hook(module, args, kwargs, cell_bias=key_bias):
            return args, {**kwargs, "memory_pos": kwargs["memory_pos"] + cell_bias}

        handle = head.query_to_image.register_forward_pre_hook(hook, with_kwargs=True)
        with torch.no_grad():
            boxes.append(head(inputs)["pred_coarse_boxes"][0])
        handle.remove()
    assert not torch.allclose(boxes[0], boxes[1], atol=1e-3)
