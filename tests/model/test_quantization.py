"""backbone.quantization: a tiny checkpoint loaded in 4 bits (QLoRA) trains one step where bitsandbytes runs."""

from __future__ import annotations

import pytest
import torch

from fclm.config import FCLMConfig, LossConfig, from_dict, preset
from fclm.model import build_fclm
from fclm.model.backbone import check_bitsandbytes

bnb = pytest.importorskip("bitsandbytes")


def _supported(kind: str) -> bool:
    try:
        check_bitsandbytes(kind, "cpu")
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _supported("4bit"), reason="the installed bitsandbytes cannot run 4-bit layers on CPU")
def test_qlora_tiny_build_and_stage2_step(tmp_path):
    from fclm.training.config import STAGE_LOSS_WEIGHTS, STAGE_POLICIES
    from fclm.training.loop import build_criterion
    from fclm.training.scale import scale_images, scale_records
    from fclm.training.trainability import apply_trainability

    torch.manual_seed(0)
    source = build_fclm(preset("tiny"))
    source.qwen.save_pretrained(tmp_path)
    source.processor.tokenizer.save_pretrained(tmp_path)
    cfg = from_dict(FCLMConfig, {"backbone": {"name_or_path": str(tmp_path), "quantization": "4bit",
                                              "dtype": "bfloat16"}}, base=preset("tiny"))
    model = build_fclm(cfg)
    layer = model.qwen.model.language_model.layers[0]
    assert isinstance(layer.mlp.up_proj, bnb.nn.Linear4bit) and isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.qwen.model.visual.blocks[0].mlp.up_proj, torch.nn.Linear)  # the vision tower stays bf16
    assert not isinstance(model.qwen.lm_head, bnb.nn.Linear4bit)
    n = apply_trainability(model, STAGE_POLICIES[2])
    assert n > 0
    model.train()
    batch = model.processor(scale_records(2, (112, 112)), scale_images(2, (112, 112)))
    criterion = build_criterion(LossConfig(weights=dict(STAGE_LOSS_WEIGHTS[2])), model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate's bf16 mixed precision does the same
        outputs = model(batch)
        losses = criterion(outputs, batch)
        total = criterion.weighted_total(losses)
    total.backward()
    assert torch.isfinite(total)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert any("lora_A" in name for name, _ in trainable)
