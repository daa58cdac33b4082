"""SamBackend: shapes, one-to-one decoding vs segment_anything's own decoder, freezing, postprocessing,
checkpoint loading and its error messages."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from segment_anything.modeling import Sam

from fclm.config import preset
from fclm.model.sam import SAM_BUILDERS, SamBackend, SamCheckpointError, build_sam, load_sam_checkpoint


class NotAllowed:
    """An arbitrary object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""

    def __init__(self) -> None:
        self.x = 1


@pytest.fixture(scope="module")
def sam() -> SamBackend:
    torch.manual_seed(0)
    return build_sam(preset("tiny").sam)


def _reference_decode(sam: SamBackend, emb: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each pair alone through segment_anything's MaskDecoder.forward and PromptEncoder."""
    masks, scores = [], []
    for i in range(emb.shape[0]):
        _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        m, s = sam.mask_decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=prompts[i : i + 1],
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks.append(m[:, 0])
        scores.append(s[:, 0])
    return torch.cat(masks), torch.cat(scores)


def test_shapes(sam: SamBackend) -> None:
    emb = sam.encode(torch.randn(2, 3, 112, 112))
    assert emb.shape == (2, 64, 14, 14)
    assert sam.embedding_size == (14, 14) and sam.low_res_size == (56, 56) and sam.embed_dim == 64
    masks, scores = sam.decode(emb[[0, 1, 1]], torch.randn(3, 1, 64))
    assert masks.shape == (3, 56, 56) and scores.shape == (3,)
    assert sam.upsample_to_frame(masks).shape == (3, 112, 112)
    with pytest.raises(ValueError, match=r"\(B,3,112,112\)"):
        sam.encode(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="one to one"):
        sam.decode(emb, torch.randn(3, 1, 64))


@pytest.mark.parametrize("k", [1, 2])
def test_batch_decode_equals_per_sample_reference(sam: SamBackend, k: int) -> None:
    torch.manual_seed(1)
    emb = torch.randn(4, 64, 14, 14)
    prompts = torch.randn(4, k, 64)
    with torch.no_grad():
        masks, scores = sam.decode(emb, prompts)
        ref_masks, ref_scores = _reference_decode(sam, emb, prompts)
        # and each sample decoded alone through decode() itself
        alone = torch.cat([sam.decode(emb[i : i + 1], prompts[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(masks, ref_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks, alone, atol=1e-5, rtol=1e-5)
    # the pairing matters: another image gives another mask
    assert not torch.allclose(masks[0], masks[1])


def test_empty_decode(sam: SamBackend) -> None:
    prompts = torch.randn(0, 1, 64, requires_grad=True)
    masks, scores = sam.decode(torch.randn(0, 64, 14, 14), prompts)
    assert masks.shape == (0, 56, 56) and scores.shape == (0,)
    masks.sum().backward()


def test_encoder_frozen_decoder_trains(sam: SamBackend) -> None:
    sam.zero_grad(set_to_none=True)
    sam.train()
    assert not sam.image_encoder.training and sam.mask_decoder.training
    assert all(not p.requires_grad for p in sam.image_encoder.parameters())
    images = torch.randn(2, 3, 112, 112, requires_grad=True)
    emb = sam.encode(images)
    assert not emb.requires_grad
    masks, scores = sam.decode(emb, torch.randn(2, 1, 64, requires_grad=True))
    (masks.pow(2).mean() + scores.sum()).backward()
    assert all(p.grad is None for p in sam.image_encoder.parameters())
    assert images.grad is None
    no_grad = [n for n, p in sam.mask_decoder.named_parameters() if p.grad is None]
    assert no_grad == []  # every decoder parameter is in the graph (distributed training needs it)
    assert sam.prompt_encoder.no_mask_embed.weight.grad is not None
    assert sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    sam.zero_grad(set_to_none=True)
    sam.eval()


def test_postprocess_matches_segment_anything(sam: SamBackend) -> None:
    reference = Sam(image_encoder=sam.image_encoder, prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder)
    low = torch.randn(3, 56, 56)
    out = sam.postprocess_masks(low, torch.tensor([84, 112]), (60, 80))
    ref = reference.postprocess_masks(low[:, None], (84, 112), (60, 80))[:, 0]
    assert out.shape == (3, 60, 80)
    torch.testing.assert_close(out, ref)
    assert sam.postprocess_masks(low[:0], (84, 112), (60, 80)).shape == (0, 60, 80)
    with pytest.raises(ValueError, match="valid_hw"):
        sam.postprocess_masks(low, (200, 112), (60, 80))


def test_builders_registry() -> None:
    assert {"vit_h", "vit_l", "vit_b", "tiny"} <= set(SAM_BUILDERS)
    tiny = SAM_BUILDERS["tiny"]()
    assert isinstance(tiny, SamBackend) and tiny.img_size == 112


# ---------------------------------------------------------------------------------------------- checkpoints


def _official_layout_file(tmp_path, seed: int = 3) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny checkpoint written the way the official .pth files are: segment_anything's Sam.state_dict()."""
    torch.manual_seed(seed)
    other = build_sam(preset("tiny").sam)
    official = Sam(image_encoder=other.image_encoder, prompt_encoder=other.prompt_encoder, mask_decoder=other.mask_decoder)
    state = official.state_dict()
    assert all(k.split(".")[0] in {"image_encoder", "prompt_encoder", "mask_decoder"} for k in state)
    path = tmp_path / "sam_tiny.pth"
    torch.save(state, path)
    return str(path), state


def test_load_official_layout(tmp_path) -> None:
    path, state = _official_layout_file(tmp_path)
    cfg = dataclasses.replace(preset("tiny").sam, checkpoint=path)
    loaded = build_sam(cfg)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.image_encoder.parameters())
    assert all(p.requires_grad for p in loaded.mask_decoder.parameters())


def test_missing_checkpoint_names_file(tmp_path) -> None:
    path = tmp_path / "nowhere" / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth: file not found"):
        build_sam(dataclasses.replace(preset("tiny").sam, checkpoint=str(path)))


def test_unreadable_and_unsafe_checkpoints(sam: SamBackend, tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(SamCheckpointError, match=r"garbage\.pth: could not be read"):
        load_sam_checkpoint(sam, garbage)
    unsafe = tmp_path / "unsafe.pth"
    with open(unsafe, "wb") as f:
        pickle.dump({"image_encoder.x": NotAllowed()}, f, protocol=2)
    with pytest.raises(SamCheckpointError, match=r"unsafe\.pth: could not be read with torch.load\(weights_only=True\)"):
        load_sam_checkpoint(sam, unsafe)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], a_list)
    with pytest.raises(SamCheckpointError, match=r"list\.pth: not a state dict \(got list\)"):
        load_sam_checkpoint(sam, a_list)
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(SamCheckpointError, match=r"nested\.pth: not a state dict: entry 'model' is a dict"):
        load_sam_checkpoint(sam, nested)


def test_shape_mismatch_names_key_shapes_and_variant(sam: SamBackend, tmp_path) -> None:
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    # Pretend this is a ViT-B checkpoint: width 768, 12 blocks.
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 8, 8)
    for i in range(2, 12):
        state[f"image_encoder.blocks.{i}.norm1.weight"] = torch.zeros(768)
    path = tmp_path / "sam_vit_b_like.pth"
    torch.save(state, path)
    with pytest.raises(SamCheckpointError) as info:
        load_sam_checkpoint(sam, path)
    msg = str(info.value)
    assert "sam_vit_b_like.pth" in msg
    assert "shape mismatch at image_encoder.patch_embed.proj.weight" in msg
    assert "checkpoint (768, 3, 8, 8) vs model (64, 3, 8, 8)" in msg
    assert "sam.variant='vit_b'" in msg


def test_missing_and_unexpected_keys(sam: SamBackend, tmp_path) -> None:
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(SamCheckpointError, match=r"partial\.pth: 1 missing key\(s\), e.g. mask_decoder.iou_token.weight"):
        load_sam_checkpoint(sam, path)
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    state["visual_model.extra"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(SamCheckpointError, match=r"extra\.pth: 1 unexpected key\(s\), e.g. visual_model.extra"):
        load_sam_checkpoint(sam, path)
