"""Typed configuration for every part of FCLM, with the presets ``tiny``, ``small``, ``fclm-3b``, ``fclm-7b``.

Every option is a dataclass field with a docstring-style comment; ``__post_init__`` checks values.
:func:`from_dict` builds a dataclass from plain data (YAML / JSON), rejecting unknown keys and wrong
types with an error naming the dotted key, and :func:`apply_overrides` applies ``key=value`` strings.
Nothing here builds a model: builders in ``fclm.model`` take these configs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import yaml

SAM_VARIANTS: dict[str, dict[str, Any]] = {
    # Sizes of the official Segment Anything image encoders (segment_anything/build_sam.py).
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)),
}


@dataclass
class BackboneConfig:
    """The Qwen2.5-VL backbone: a pretrained checkpoint, or a random model built from the sizes below."""

    name_or_path: str | None = None
    """Local directory or hub id of a Qwen2.5-VL checkpoint (already cached; nothing is downloaded).
    ``None`` builds a random model from the sizes below (tests, demo)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``name_or_path``. With neither, a tiny byte-level BPE is trained offline."""
    tiny_vocab_size: int = 1024
    """Vocabulary size of the offline byte-level BPE built when no tokenizer is given."""
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 256
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    """Multimodal rope split (t, h, w); must sum to head_dim / 2."""
    rope_theta: float = 1_000_000.0
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (1,)
    min_pixels: int = 112 * 112
    """Smallest image area (pixels) after Qwen resizing (qwen-vl-utils ``smart_resize``)."""
    max_pixels: int = 112 * 112
    """Largest image area (pixels) after Qwen resizing."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """``auto``: flash-attn when importable and on CUDA, else sdpa."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        head_dim = self.text_hidden_size // self.text_heads
        if self.name_or_path is None:
            if self.text_hidden_size % self.text_heads:
                raise ValueError("backbone.text_hidden_size must be divisible by backbone.text_heads")
            if sum(self.mrope_section) * 2 != head_dim:
                raise ValueError(
                    f"backbone.mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {head_dim // 2}"
                )
            if any(i >= self.vision_depth for i in self.fullatt_block_indexes):
                raise ValueError("backbone.fullatt_block_indexes must lie inside vision_depth")
        if self.min_pixels > self.max_pixels:
            raise ValueError("backbone.min_pixels must be <= backbone.max_pixels")


@dataclass
class SamConfig:
    """Segment Anything parts (``segment-anything`` package): image encoder, prompt encoder, mask decoder."""

    variant: Literal["vit_h", "vit_l", "vit_b", "custom"] = "custom"
    """``vit_h``/``vit_l``/``vit_b`` take the official encoder sizes; ``custom`` uses the fields below."""
    checkpoint: str | None = None
    """Official SAM ``.pth`` checkpoint (loaded with ``weights_only=True``); ``None``: random init."""
    img_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    encoder_window_size: int = 14
    use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    """SAM prompt space; ``[SEG]`` and ``<pos>`` are projected into it."""
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3

    def __post_init__(self) -> None:
        if self.variant != "custom":
            for k, v in SAM_VARIANTS[self.variant].items():
                setattr(self, k, v)
        if self.img_size % self.patch_size:
            raise ValueError(f"sam.img_size {self.img_size} must be divisible by sam.patch_size {self.patch_size}")
        if self.prompt_embed_dim % 8:
            raise ValueError("sam.prompt_embed_dim must be divisible by 8")
        if any(i >= self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError("sam.encoder_global_attn_indexes must lie inside encoder_depth")

    @property
    def embedding_size(self) -> int:
        """Side of the SAM image-embedding grid (``img_size / patch_size``)."""
        return self.img_size // self.patch_size


@dataclass
class RegionExtractorConfig:
    """Hybrid Region Extractor (seed 002): semantic branch → ``<mask>``, position branch → ``<pos>``."""

    local_aggregation: bool = True
    """Step 1: encode the region's crop with the SAM image encoder, keep foreground, project, mask-pool.
    Off: mask-pool the full-image SAM embeddings instead."""
    pixel_enhancement: bool = True
    """Step 2: the pooled token attends over all foreground pixel features."""
    semantic_guidance: bool = True
    """Step 3: deformable sampling of the Qwen vision-tower feature map around the region centre."""
    context_margin: float = 0.25
    """Crop = region box enlarged by this fraction of its size on each side (clipped to the image)."""
    hidden_dim: int = 128
    """Width of the extractor's internal features."""
    num_heads: int = 4
    num_points: int = 4
    """Deformable sampling points per head."""
    pooled_mask_size: int = 16
    """The position branch sees the mask pooled to this size, over the image and over the region's box."""

    def __post_init__(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ValueError("region_extractor.hidden_dim must be divisible by region_extractor.num_heads")
        if not 0.0 <= self.context_margin <= 2.0:
            raise ValueError("region_extractor.context_margin must be in [0, 2]")


@dataclass
class HeadsConfig:
    """Grounding heads that the ``[SEG]`` embedding can be routed to."""

    enabled: tuple[str, ...] = ("sam",)
    """Heads built into the model (names from ``fclm.model.heads.HEAD_REGISTRY``)."""
    default: str = "sam"
    """Head used when a sample names none."""

    def __post_init__(self) -> None:
        if self.default not in self.enabled:
            raise ValueError(f"heads.default {self.default!r} is not in heads.enabled {list(self.enabled)}")


@dataclass
class LossConfig:
    """Loss weights (DESIGN §2) and seed 002's ablation switches."""

    weights: dict[str, float] = field(
        default_factory=lambda: {
            "loss_ce": 1.0,
            "loss_mask_bce": 2.0,
            "loss_mask_dice": 1.0,
            "loss_self_recon": 1.0,
            "loss_latent": 1.0,
        }
    )
    """Weight of each named loss; a name the criterion does not produce is an error."""
    self_recon_source: Literal["pos", "mask", "both"] = "pos"
    """Which visual-prompt token is decoded back to the region mask (seed 002 ablation)."""
    latent_kind: Literal["cosine", "mse", "kl"] = "cosine"
    """Latent consistency between z_seg and stop-grad(z_pos) (seed 002 ablation)."""
    kl_temperature: float = 1.0
    """Softmax temperature of the ``kl`` latent loss."""
    self_recon_bce_weight: float = 2.0
    """λ_bce inside ``loss_self_recon = λ_bce·BCE + λ_dice·dice`` (seed 002 Eq. 4 with LISA's L_seg)."""
    self_recon_dice_weight: float = 1.0
    """λ_dice inside ``loss_self_recon``."""


@dataclass
class FCLMConfig:
    """The whole model."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    region_extractor: RegionExtractorConfig = field(default_factory=RegionExtractorConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    projector_layers: int = 2
    """Depth of the MLPs mapping LLM hidden states to the SAM prompt space."""
    seg_query_norm: Literal["none", "standardize"] = "none"
    """``standardize``: the seg projector first standardises h[SEG] per feature with statistics
    learned from the training batches (:class:`fclm.model.projectors.FeatureStandardize`). Needed by
    randomly initialised backbones (``tiny``, ``small``), whose h[SEG] barely varies between samples;
    LISA's plain projector (``none``) for pretrained ones."""
    decode_mask_tokens: bool = False
    """Also decode ``<mask>`` tokens through a projector + SAM decoder (needed for self-reconstruction
    from ``<mask>``: ``losses.self_recon_source`` = ``mask`` or ``both``, a seed 002 ablation)."""


def _tiny() -> FCLMConfig:
    return FCLMConfig(
        backbone=BackboneConfig(),
        sam=SamConfig(
            variant="custom", img_size=112, patch_size=8, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
            encoder_global_attn_indexes=(1,), encoder_window_size=0, use_rel_pos=False, prompt_embed_dim=64,
            decoder_depth=2, decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64,
        ),
        region_extractor=RegionExtractorConfig(hidden_dim=64, num_heads=4, num_points=4, pooled_mask_size=16),
        seg_query_norm="standardize",
    )


def _small() -> FCLMConfig:
    """About hidden 512 × 8 layers with a few SAM blocks: the benchmark preset."""
    return FCLMConfig(
        backbone=BackboneConfig(
            text_hidden_size=512, text_layers=8, text_heads=8, text_kv_heads=4, text_intermediate_size=1408,
            mrope_section=(8, 12, 12), vision_hidden_size=256, vision_depth=4, vision_heads=4,
            vision_intermediate_size=512, fullatt_block_indexes=(3,), min_pixels=224 * 224, max_pixels=224 * 224,
            window_size=112, tiny_vocab_size=2048,
        ),
        sam=SamConfig(
            variant="custom", img_size=256, patch_size=16, encoder_embed_dim=256, encoder_depth=4, encoder_num_heads=4,
            encoder_global_attn_indexes=(3,), encoder_window_size=8, use_rel_pos=True, prompt_embed_dim=256,
            decoder_depth=2, decoder_mlp_dim=1024, decoder_num_heads=8, iou_head_hidden_dim=256,
        ),
        region_extractor=RegionExtractorConfig(hidden_dim=256, num_heads=8, num_points=4),
        seg_query_norm="standardize",
    )


def _real(hub_id: str) -> FCLMConfig:
    """A real model: the user supplies (caches) the Qwen2.5-VL checkpoint and the official SAM ViT-H ``.pth``."""
    return FCLMConfig(
        backbone=BackboneConfig(name_or_path=hub_id, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28),
        sam=SamConfig(variant="vit_h", img_size=1024, checkpoint="sam_vit_h_4b8939.pth"),
        region_extractor=RegionExtractorConfig(hidden_dim=256, num_heads=8, num_points=4),
    )


PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "small": _small,
    "fclm-3b": lambda: _real("Qwen/Qwen2.5-VL-3B-Instruct"),
    "fclm-7b": lambda: _real("Qwen/Qwen2.5-VL-7B-Instruct"),
}


def preset(name: str) -> FCLMConfig:
    """A fresh :class:`FCLMConfig` for a preset name (``tiny``, ``small``, ``fclm-3b``, ``fclm-7b``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# Plain data <-> dataclasses, with errors that name the key.
# --------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` when that is lossless, else raise :class:`ConfigError`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        kt, vt = args if args else (Any, Any)
        return {_check_type(k, kt, key): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`.

    ``base`` (an instance of ``cls``) supplies values for keys that ``data`` leaves out, so a YAML file
    can override a preset partially. Nested dataclasses merge recursively.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in fields:
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            tp = hints[name]
            sub_base = getattr(base, name) if base is not None else None
            if dataclasses.is_dataclass(tp) and isinstance(data[name], dict):
                kwargs[name] = from_dict(tp, data[name], prefix=key, base=sub_base)
            else:
                kwargs[name] = _check_type(data[name], tp, key)
        elif base is not None:
            kwargs[name] = getattr(base, name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass → plain data (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to nested plain data, in place; return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {key}: {p} is not a mapping")
            node = node[p]
        node[parts[-1]] = value
    return data


def model_config_from_dict(data: dict, prefix: str = "model") -> FCLMConfig:
    """``{"preset": "tiny", "backbone": {...}, ...}`` → :class:`FCLMConfig` (preset first, then overrides)."""
    data = dict(data)
    name = data.pop("preset", None)
    base = preset(name) if name is not None else FCLMConfig()
    return from_dict(FCLMConfig, data, prefix=prefix, base=base)
