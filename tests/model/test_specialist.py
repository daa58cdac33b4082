"""The head specialist: a grounding head trained alone on SAM embeddings + a small text encoder (no LLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fclm.config import LossConfig, model_config_from_dict
from fclm.model.specialist import HeadSpecialist, build_head_specialist
from fclm.processor import load_image
from fclm.training.loop import build_criterion


def _batch(model: HeadSpecialist, shapes_dir: Path, n: int = 4, task: str = "res") -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in open(shapes_dir / f"train_{task}.jsonl")][:n]
    enc = [model.processor.encode_record(r, load_image(shapes_dir / r["image"])) for r in records]
    return records, model.processor.collate(enc)


@pytest.fixture(scope="module")
def specialist() -> HeadSpecialist:
    torch.manual_seed(0)
    return build_head_specialist(model_config_from_dict({"preset": "tiny", "kind": "head_specialist"}))


def test_specialist_routes_seg_states_and_learns_through_the_criterion(specialist: HeadSpecialist, shapes_dir: Path) -> None:
    _, batch = _batch(specialist, shapes_dir)
    out = specialist(batch)
    n = int((batch["input_ids"] == specialist.token_ids["seg"]).sum())
    assert n == 4 and out["seg_hidden"].shape == (n, specialist.config.text_encoder.hidden_size)
    assert out["heads"]["sam"]["pred_masks"].shape[0] == n and "logits" not in out
    crit = build_criterion(LossConfig(), specialist.config)
    losses = crit(out, batch)
    assert losses["loss_ce"].item() == 0.0 and losses["loss_mask_bce"].item() > 0
    specialist.zero_grad()
    crit.weighted_total(losses).backward()
    assert specialist.text_encoder.embed.weight.grad.abs().sum() > 0  # gradients reach the text side
    # the [SEG] state depends on the expression: two records with different text give different queries
    assert not torch.allclose(out["seg_hidden"][0], out["seg_hidden"][1])


def test_specialist_text_encoder_is_causal(specialist: HeadSpecialist) -> None:
    ids = torch.randint(10, 200, (1, 12))
    keep = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        a = specialist.text_encoder(ids, keep)
        ids2 = ids.clone()
        ids2[0, 8:] = 7
        b = specialist.text_encoder(ids2, keep)
    torch.testing.assert_close(a[0, :8], b[0, :8])  # later tokens never change earlier states
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_specialist_save_load_round_trip(specialist: HeadSpecialist, shapes_dir: Path, tmp_path: Path) -> None:
    from fclm.model.loading import load_pretrained, model_kind

    specialist.save_pretrained(tmp_path / "m")
    assert model_kind(tmp_path / "m") == "head_specialist"
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, HeadSpecialist)
    _, batch = _batch(specialist, shapes_dir, n=2)
    specialist.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["heads"]["sam"]["pred_masks"], specialist(batch)["heads"]["sam"]["pred_masks"])


def test_specialist_refuses_lora(specialist: HeadSpecialist) -> None:
    from fclm.training.config import TrainabilityPolicy
    from fclm.training.trainability import apply_trainability

    with pytest.raises(ValueError, match="lora needs the Qwen backbone"):
        apply_trainability(specialist, TrainabilityPolicy(llm="lora"))
    n = apply_trainability(specialist, TrainabilityPolicy(llm="full", sam_decoder="full", sam_image_encoder="frozen"))
    assert n == sum(p.numel() for p in specialist.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in specialist.sam.image_encoder.parameters())
    assert all(p.requires_grad for p in specialist.text_encoder.parameters())


def test_image_stem_starts_as_the_embeddings_and_learns(shapes_dir: Path) -> None:
    from fclm.training.config import TrainabilityPolicy
    from fclm.training.trainability import apply_trainability

    torch.manual_seed(0)
    cfg = model_config_from_dict({"preset": "tiny", "kind": "head_specialist", "image_stem": {"enabled": True, "channels": 16}})
    model = build_head_specialist(cfg)
    torch.manual_seed(0)
    plain = build_head_specialist(model_config_from_dict({"preset": "tiny", "kind": "head_specialist"}))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("image_stem.")})
    _, batch = _batch(model, shapes_dir, n=2)
    grid = cfg.sam.embedding_size
    assert model.image_stem(batch["sam_images"]).shape == (2, cfg.sam.prompt_embed_dim, grid, grid)
    model.eval()
    plain.eval()
    with torch.no_grad():  # zero-initialised projection: the same model as without the stem
        torch.testing.assert_close(model(batch)["heads"]["sam"]["pred_masks"], plain(batch)["heads"]["sam"]["pred_masks"])
    # the stem is the specialist's vision_tower part, and a gradient reaches its convolutions
    apply_trainability(model, TrainabilityPolicy(llm="full", vision_tower="full"))
    assert all(p.requires_grad for p in model.image_stem.parameters())
    model.train()
    out = model(batch)
    build_criterion(LossConfig(), cfg).weighted_total(build_criterion(LossConfig(), cfg)(out, batch)).backward()
    assert model.image_stem.proj.weight.grad.abs().sum() > 0
    apply_trainability(model, TrainabilityPolicy(llm="full"))
    assert not any(p.requires_grad for p in model.image_stem.parameters())
    with pytest.raises(ValueError, match="power of two"):
        build_head_specialist(model_config_from_dict({"preset": "tiny", "kind": "head_specialist",
                                                      "image_stem": {"enabled": True}, "sam": {"patch_size": 14}}))
