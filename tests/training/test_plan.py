"""The memory plan: DeepSpeed's estimators for the trainable states, the activation formula against what
autograd really saves, and ``fclm-train plan`` on a shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fclm.config import FCLMConfig, from_dict, preset
from fclm.training.config import STAGE_POLICIES, load_train_config
from fclm.training.plan import (
    GIB, ZERO_SETUPS, count_parameters, llm_activation_bytes_per_token_layer, logits_activation_bytes, step_memory,
    zero_plans,
)

ROOT = Path(__file__).resolve().parents[2]


def _small() -> FCLMConfig:
    """A small LLM with the real ratios of Qwen2.5-VL-3B (head dim 64 here, GQA 4:1 → kv = h/4)."""
    return from_dict(FCLMConfig, {"backbone": {"text_hidden_size": 256, "text_layers": 2, "text_heads": 4,
                                               "text_kv_heads": 1, "text_intermediate_size": 1376,
                                               "mrope_section": [8, 12, 12]}}, base=preset("tiny"))


def test_activation_formula_matches_what_autograd_saves():
    """Per decoder layer and token (bf16, LoRA with dropout, train mode): the plan's 34·h + 6·kv + 11·I
    against the bytes of the distinct tensors autograd saves, measured on a small layer of real ratios."""
    from fclm.model import build_fclm
    from fclm.training.bf16_cpu import Float32Matmuls
    from fclm.training.scale import _count_saved
    from fclm.training.trainability import apply_trainability

    torch.manual_seed(0)
    cfg = _small()
    model = build_fclm(cfg)
    apply_trainability(model, STAGE_POLICIES[2])
    model.to(torch.bfloat16).train()
    lm = model.qwen.model.language_model
    T, h = 128, cfg.backbone.text_hidden_size

    def saved(layers: int) -> int:
        lm.layers = torch.nn.ModuleList(list(full_layers)[:layers])
        counter = {"bytes": 0}
        x = torch.randn(1, T, h, dtype=torch.bfloat16, requires_grad=True)
        position_ids = torch.arange(T).view(1, 1, T).expand(3, 1, T)
        with Float32Matmuls(), _count_saved(counter):
            lm(inputs_embeds=x, position_ids=position_ids, use_cache=False)
        return counter["bytes"]

    full_layers = lm.layers
    per_layer = (saved(2) - saved(1)) / T  # the difference cancels what is saved outside the layers
    lm.layers = full_layers
    kv = 1 * (h // 4)
    predicted = llm_activation_bytes_per_token_layer(h, kv, cfg.backbone.text_intermediate_size)
    assert abs(per_layer - predicted) / predicted < 0.2, (per_layer, predicted)


def test_logits_term_matches_the_allocator_peak_of_a_real_width_lm_head():
    """The logits term against the peak of live tensor bytes (allocator trace, the CPU-only float32 copies of
    the bf16 products left out: what a GPU holds) of ``lm_head`` + the causal-LM loss + backward, at the 3B's
    hidden width (2048) with stage 2's peft trainable-token layer on ``lm_head``: few tokens → ``lm_head``'s
    backward (merged copy saved + its whole gradient); many → the loss's backward (14 bytes per logit)."""
    from fclm.losses.lm import causal_lm_loss
    from fclm.model import build_fclm
    from fclm.training.scale import LabelledFloat32Matmuls, allocator_trace
    from fclm.training.trainability import apply_trainability

    h = 2048
    cfg = from_dict(FCLMConfig, {"backbone": {"text_hidden_size": h, "text_layers": 1, "text_heads": 16,
                                              "text_kv_heads": 2, "text_intermediate_size": 256,
                                              "mrope_section": [16, 24, 24]}}, base=preset("tiny"))
    torch.manual_seed(0)
    model = build_fclm(cfg)
    apply_trainability(model, STAGE_POLICIES[2])
    model.to(torch.bfloat16).train()
    lm_head = model.qwen.lm_head
    assert hasattr(lm_head, "token_adapter")  # peft's trainable-token layer
    V = cfg.backbone.tiny_vocab_size
    plain = torch.nn.Linear(h, V, bias=False).to(torch.bfloat16).requires_grad_(False)

    def peak(head: torch.nn.Module, T: int) -> tuple[int, str]:
        x = torch.randn(1, T, h, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, V, (1, T))
        with allocator_trace() as t, LabelledFloat32Matmuls():
            logits = head(x)
            causal_lm_loss(logits, labels).backward()
        model.zero_grad(set_to_none=True)
        return t.peak_without_cpu_only_bytes, t.peak_without_cpu_only_site

    for T, moment in ((64, "_Linear32Backward"), (2048, "LogSoftmaxBackward0")):
        measured, site = peak(lm_head, T)
        predicted = logits_activation_bytes(T, V, h, token_rows=True)
        assert moment in site and abs(measured - predicted) / predicted < 0.02, (T, measured, predicted, site)
    measured, site = peak(plain, 1024)  # a frozen plain lm_head: the loss's backward only
    predicted = logits_activation_bytes(1024, V, h, token_rows=False)
    assert "LogSoftmaxBackward0" in site and abs(measured - predicted) / predicted < 0.02, (measured, predicted)
    # step_memory uses the term with the micro-batch's tokens
    plan = step_memory(cfg, STAGE_POLICIES[2], tokens=100, image_pixels=112 * 112, batch_size=2)
    assert plan["logits"] == logits_activation_bytes(200, V, h, token_rows=True)


def test_trainable_states_come_from_deepspeeds_estimators():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = preset("tiny")
    policy = STAGE_POLICIES[1]
    counts = count_parameters(cfg, policy)
    assert 0 < counts.trainable < counts.total
    base = dict(tokens=64, image_pixels=112 * 112, counts=counts, gradient_checkpointing=True)
    z0 = step_memory(cfg, policy, zero="zero0", gpus=8, **base)
    z2 = step_memory(cfg, policy, zero="zero2", gpus=8, **base)
    z3 = step_memory(cfg, policy, zero="zero3", gpus=8, **base)
    z3o = step_memory(cfg, policy, zero="zero3_offload", gpus=8, **base)
    assert z0["gradients_and_optimizer"] == estimate_zero2_model_states_mem_needs(
        counts.trainable, num_gpus_per_node=1, cpu_offload=False)[1] == 20 * counts.trainable
    assert z2["gradients_and_optimizer"] == 2 * counts.trainable + int(18 * counts.trainable / 8)
    assert z3["weights"] < z2["weights"] == z0["weights"] == counts.frozen_bytes
    assert z3o["gradients_and_optimizer"] == 0
    for m in (z0, z2, z3, z3o):
        assert m["total"] == m["weights"] + m["gradients_and_optimizer"] + m["activations"] + m["overhead"]
    # checkpointing keeps the layer inputs only; the cache removes the SAM encoder's transient peak
    no_gc = step_memory(cfg, policy, **{**base, "gradient_checkpointing": False})
    assert no_gc["llm_activations"] > z0["llm_activations"]
    with_sam = step_memory(cfg, policy, sam_encodes=2, **base)
    assert with_sam["sam_encoder_peak"] > 0 == z0["sam_encoder_peak"]


def test_quantised_backbone_is_planned_at_its_stored_bytes(tmp_path):
    """A checkpoint directory's config.json gives the architecture; 4-bit decoder weights take ~0.52 B."""
    import json

    from fclm.model.backbone import ARCH_DIR

    data = json.loads((ARCH_DIR / "qwen2_5_vl_3b.json").read_text())
    data.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1)
    data["vision_config"].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                                 fullatt_block_indexes=[1])
    (tmp_path / "config.json").write_text(json.dumps(data))
    base = {"name_or_path": str(tmp_path), "dtype": "bfloat16"}
    full = count_parameters(from_dict(FCLMConfig, {"backbone": base}, base=preset("tiny")), STAGE_POLICIES[2])
    q4 = count_parameters(from_dict(FCLMConfig, {"backbone": {**base, "quantization": "4bit"}}, base=preset("tiny")),
                          STAGE_POLICIES[2])
    decoder_linear = 2 * (256 * 256 * 2 + 256 * 64 * 2 + 3 * 256 * 512)
    assert q4.total == full.total
    assert full.frozen_bytes - q4.frozen_bytes == pytest.approx(decoder_linear * (2 - 4.127 / 8), rel=1e-3)
    with pytest.raises(ValueError, match="model.backbone.arch: the plan needs the architecture"):
        count_parameters(from_dict(FCLMConfig, {"backbone": {"name_or_path": str(tmp_path / "none")}},
                                   base=preset("tiny")))


def test_zero_plans_mark_what_fits(capsys):
    tcfg = load_train_config(ROOT / "train/configs/demo_stage1.yaml", check_files=False)
    rows = zero_plans(tcfg, tcfg.model, gpus=2)
    assert [r["setup"] for r in rows] == list(ZERO_SETUPS)
    assert all(all(r["fits"].values()) for r in rows)  # the tiny model fits everywhere
    assert all(r["memory"]["total"] < 2 * GIB for r in rows)


def test_fclm_train_plan_cli(capsys, tmp_path):
    from train.__main__ import main

    assert main(["plan", str(ROOT / "train/configs/demo_stage1.yaml"), "--gpus", "2", "--gpu-mem", "24"]) == 0
    out = capsys.readouterr().out
    assert "| zero3_offload | 2 |" in out and "1×24 GB" in out and "your GPU" in out
    # an init_from that does not exist (not the YAML's runs/demo path, which a demo run creates)
    assert main(["plan", str(ROOT / "train/configs/demo_stage2.yaml"), f"init_from={tmp_path / 'missing'}"]) == 2
    assert "init_from" in capsys.readouterr().err
    assert main(["plan", str(ROOT / "train/configs/demo_stage2.yaml"), "model.preset=tiny", "--tokens", "80"]) == 0
    assert "stage 2" in capsys.readouterr().out
