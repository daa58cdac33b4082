"""The Qwen2.5-VL backbone: built tiny from config, or loaded from a local checkpoint; wrapped, never forked.

Facts this file relies on (``ENVIRONMENT.md``): in transformers 5.x a tiny config must set
``mrope_section`` (summing to head_dim / 2) through ``text_config.rope_parameters``, every special id
inside the small vocabulary, and ``fullatt_block_indexes`` inside the vision depth.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from fclm.config import BackboneConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_attn_implementation(name: str) -> str:
    """``auto`` → ``flash_attention_2`` when flash-attn is importable and CUDA is available, else ``sdpa``."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def tiny_qwen_config(cfg: BackboneConfig, token_ids: dict[str, int], vocab_size: int) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the sizes in ``cfg`` whose special ids all lie inside ``vocab_size``.

    ``token_ids`` needs ``image_pad``, ``video_pad``, ``vision_start``, ``vision_end``, ``eos``, ``pad``.
    """
    head_dim = cfg.text_hidden_size // cfg.text_heads
    text = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": list(cfg.mrope_section)},
        bos_token_id=token_ids["eos"],
        eos_token_id=token_ids["eos"],
        pad_token_id=token_ids["pad"],
        use_cache=False,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_heads=cfg.vision_heads,
        patch_size=cfg.patch_size,
        spatial_merge_size=cfg.spatial_merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
        window_size=cfg.window_size,
        out_hidden_size=cfg.text_hidden_size,
        fullatt_block_indexes=list(cfg.fullatt_block_indexes),
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["image_pad"],
        video_token_id=token_ids["video_pad"],
        vision_start_token_id=token_ids["vision_start"],
        vision_end_token_id=token_ids["vision_end"],
        tie_word_embeddings=False,
        bos_token_id=token_ids["eos"],
        eos_token_id=token_ids["eos"],
        pad_token_id=token_ids["pad"],
    )


def build_backbone(
    cfg: BackboneConfig, token_ids: dict[str, int], vocab_size: int, *, path: str | Path | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """Load ``path`` (or ``cfg.name_or_path``) with ``from_pretrained`` (local files only), or build a random
    model from the sizes in ``cfg``. The embeddings are resized to ``vocab_size`` (new rows get the mean
    of the old ones, transformers' default) so that the FCLM tokens have rows.

    Loading with ``from_pretrained`` is what lets DeepSpeed ZeRO-3 partition the weights at load time.
    """
    attn = resolve_attn_implementation(cfg.attn_implementation)
    dtype = _DTYPES[cfg.dtype]
    source = path if path is not None else cfg.name_or_path
    if source is not None:
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(source), dtype=dtype, attn_implementation=attn, local_files_only=True
            )
        except OSError as e:
            raise OSError(
                f"cannot load the Qwen2.5-VL backbone from {source!r}: {e}. Pass a local directory or a hub id "
                "already in the local cache (FCLM never downloads at run time)."
            ) from None
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        config = tiny_qwen_config(cfg, token_ids, vocab_size)
        config._attn_implementation = attn
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model
