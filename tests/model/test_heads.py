"""Head registry, HeadInputs checks and the sam head (decoding each [SEG] on its own image)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fclm.config import preset
from fclm.model.heads import HEAD_REGISTRY, HeadInputs, SamHead, build_head, register_head
from fclm.model.sam import SamBackend, build_sam


@pytest.fixture(scope="module")
def sam() -> SamBackend:
    torch.manual_seed(0)
    return build_sam(preset("tiny").sam)


def _inputs(n: int = 3, seed: int = 0) -> HeadInputs:
    g = torch.Generator().manual_seed(seed)
    return HeadInputs(
        image_embeddings=torch.randn(2, 64, 14, 14, generator=g),
        seg_embeddings=torch.randn(n, 64, generator=g),
        seg_hidden=torch.randn(n, 128, generator=g),
        seg_batch_index=torch.tensor([1, 0, 1][:n], dtype=torch.long),
        valid_hw=torch.tensor([[112, 112], [84, 112]]),
    )


def test_registry_builds_sam_head_and_rejects_unknown(sam: SamBackend) -> None:
    assert "sam" in HEAD_REGISTRY
    head = build_head("sam", cfg=preset("tiny"), sam=sam, llm_dim=128)
    assert isinstance(head, SamHead) and head.sam is sam
    with pytest.raises(ValueError, match=r"unknown head 'c3vgx'; registered heads: \[.*'sam'"):
        build_head("c3vgx", cfg=preset("tiny"), sam=sam, llm_dim=128)
    with pytest.raises(ValueError, match="head 'sam' is already registered"):
        register_head("sam", criterion=lambda **kw: None, loss_weights={})(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="declares loss name\\(s\\) \\['loss_mask_bce'\\] that head 'sam' already declares"):
        register_head("other", criterion=lambda **kw: None, loss_weights={"loss_mask_bce": 1.0})(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="must start with 'loss_'"):
        register_head("other", criterion=lambda **kw: None, loss_weights={"mask_bce": 1.0})
    assert "other" not in HEAD_REGISTRY


def test_sam_head_decodes_each_seg_on_its_own_image(sam: SamBackend) -> None:
    head = SamHead(sam=sam)
    inputs = _inputs()
    with torch.no_grad():
        out = head(inputs)
        assert set(out) == {"pred_masks", "pred_scores"}
        assert out["pred_masks"].shape == (3, 56, 56) and out["pred_scores"].shape == (3,)
        for i in range(3):
            _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            b = int(inputs.seg_batch_index[i])
            ref_mask, ref_score = sam.mask_decoder(
                image_embeddings=inputs.image_embeddings[b : b + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=inputs.seg_embeddings[i : i + 1, None],
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            torch.testing.assert_close(out["pred_masks"][i], ref_mask[0, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["pred_scores"][i], ref_score[0, 0], atol=1e-5, rtol=1e-5)


def test_sam_head_shares_the_backend_without_owning_it(sam: SamBackend) -> None:
    head = SamHead(sam=sam)
    assert list(head.parameters()) == [] and head.state_dict() == {}
    heads = nn.ModuleDict({"sam": head})
    holder = nn.Module()
    holder.sam, holder.heads = sam, heads
    assert not any(k.startswith("heads.") for k in holder.state_dict())  # no duplicated decoder weights


def test_sam_head_gradients_and_no_queries(sam: SamBackend) -> None:
    head = SamHead(sam=sam)
    inputs = _inputs()
    inputs.seg_embeddings.requires_grad_(True)
    out = head(inputs)
    out["pred_masks"].mean().backward()
    assert inputs.seg_embeddings.grad is not None and inputs.seg_embeddings.grad.abs().sum() > 0
    sam.zero_grad(set_to_none=True)
    empty = _inputs(n=0)
    out = head(empty)
    assert out["pred_masks"].shape == (0, 56, 56) and out["pred_scores"].shape == (0,)


def test_head_inputs_checks() -> None:
    good = _inputs()
    with pytest.raises(ValueError, match=r"seg_batch_index must index the 2 images"):
        HeadInputs(**{**good.__dict__, "seg_batch_index": torch.tensor([0, 2, 1])})
    with pytest.raises(ValueError, match=r"text_padding_mask must be \(3, 5\)"):
        HeadInputs(**{**good.__dict__, "text_states": torch.randn(3, 5, 128), "text_padding_mask": torch.zeros(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"valid_hw must be \(2,2\)"):
        HeadInputs(**{**good.__dict__, "valid_hw": torch.tensor([[1, 1]])})
    ok = HeadInputs(**{**good.__dict__, "text_states": torch.randn(3, 5, 128), "text_padding_mask": torch.zeros(3, 5, dtype=torch.bool)})
    assert ok.num_queries == 3
