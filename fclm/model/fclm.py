"""The FCLM model: a Qwen2.5-VL backbone with visual-prompt tokens, a region extractor, SAM and grounding heads.

``FCLM(backbone, sam, region_extractor, seg_projector, pos_projector, heads, …)`` takes ready-made
parts (``build_fclm`` wires them from an :class:`~fclm.config.FCLMConfig`); ``forward`` returns
predictions only — losses live in :mod:`fclm.losses`.

Steps, each usable alone (inference reuses the first for many prompts, :mod:`fclm.inference`):
:meth:`FCLM.encode_images` (vision tower + SAM image encoder → :class:`ImageFeatures`),
:meth:`FCLM.embed_prompt` (token embeddings with image features and ``<mask>``/``<pos>`` scattered in),
the LLM, and :meth:`FCLM.ground` (``h[SEG]`` → seg projector → the routed heads). Batch keys and output keys are listed in the
module docstrings of :mod:`fclm.processor` and here:

Outputs of :meth:`FCLM.forward` (B samples, L tokens, N ``[SEG]`` tokens, R regions):
    logits            B×L×V
    seg_hidden        N×D     last-layer hidden state at each ``[SEG]`` token (``h[SEG]``)
    seg_embeddings    N×C     ``z_seg = P_seg(h[SEG])`` in the SAM prompt space
    seg_batch_index   N
    heads             {name: {"query_index": n, "pred_*": …}} for the heads the batch routes to
    mask_tokens, pos_tokens           R×D   region-extractor outputs (``<mask>``, ``<pos>``)
    pos_embeddings    R×C     ``z_pos = P_pos(<pos>)``; ``pred_recon_masks`` R×Hl×Wl decoded from it
    mask_embeddings, pred_recon_masks_from_mask   (self-reconstruction from ``<mask>`` too, if enabled)
    region_batch_index R
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fclm.config import FCLMConfig, from_dict, to_dict
from fclm.io import write_json
from fclm.model.backbone import build_backbone
from fclm.model.heads import HeadInputs, build_head
from fclm.model.projectors import MLPProjector
from fclm.model.region_extractor import HybridRegionExtractor, build_region_extractor, with_legacy_position_branch
from fclm.model.sam import SamBackend, build_sam

logger = logging.getLogger(__name__)

CONFIG_NAME = "fclm_config.json"
MODULES_NAME = "fclm_modules.safetensors"
BACKBONE_DIR = "backbone"


@dataclass
class ImageFeatures:
    """What :meth:`FCLM.encode_images` computes once per image (B images, in batch order).

    Attributes:
        vision_tokens: B tensors (n_b×D), the Qwen vision tower's merged features, one row per
            ``<|image_pad|>`` token, in raster order.
        vision_grids: the same as B maps (gh_b×gw_b×D), for the region extractor's semantic guidance.
        image_embeddings: B×C×h×w SAM image embeddings.
    """

    vision_tokens: list[torch.Tensor]
    vision_grids: list[torch.Tensor]
    image_embeddings: torch.Tensor

    def select(self, indices: list[int]) -> "ImageFeatures":
        """The features of images ``indices`` (in that order), e.g. one cached image repeated for a batch."""
        return ImageFeatures(
            vision_tokens=[self.vision_tokens[i] for i in indices],
            vision_grids=[self.vision_grids[i] for i in indices],
            image_embeddings=self.image_embeddings[list(indices)],
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (LoRA layers are injected in place, so calling it still uses them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class FCLM(nn.Module):
    """Qwen2.5-VL + ``<mask>``/``<pos>``/``[SEG]`` tokens + Hybrid Region Extractor + SAM + grounding heads.

    Arguments:
        backbone: ``Qwen2_5_VLForConditionalGeneration`` (optionally peft-wrapped later).
        sam: the mask backend (SAM image encoder, prompt encoder, mask decoder).
        region_extractor: turns region masks into ``<mask>`` and ``<pos>`` embeddings (LLM width).
        seg_projector: LLM width → SAM prompt width, for ``[SEG]``.
        pos_projector: LLM width → SAM prompt width, for ``<pos>`` (self-reconstruction, latent loss).
        heads: grounding heads by name (``sam``, later ``c3vg``, ``igvg``).
        token_ids: ids of ``mask``, ``pos``, ``seg``, ``image_pad`` … in the tokenizer.
        config: the :class:`FCLMConfig` the parts were built from (saved with the model).
        mask_projector: for self-reconstruction from ``<mask>`` (seed 002 ablation); optional.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        sam: SamBackend,
        region_extractor: HybridRegionExtractor,
        seg_projector: nn.Module,
        pos_projector: nn.Module,
        heads: dict[str, nn.Module],
        token_ids: dict[str, int],
        config: FCLMConfig,
        mask_projector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.sam = sam
        self.region_extractor = region_extractor
        self.seg_projector = seg_projector
        self.pos_projector = pos_projector
        self.mask_projector = mask_projector
        self.heads = nn.ModuleDict(heads)
        self.token_ids = dict(token_ids)
        self.config = config
        self.processor: Any = None  # set by build_fclm / from_pretrained; saved with the model

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------

    @property
    def qwen(self) -> nn.Module:
        """The Hugging Face Qwen2.5-VL model (under any peft wrapper)."""
        return _unwrap(self.backbone)

    def _image_embeddings(self, batch: dict) -> torch.Tensor:
        cached = batch.get("sam_image_embeddings")
        if cached is not None:
            return cached
        return self.sam.encode(batch["sam_images"])

    def encode_images(self, batch: dict) -> ImageFeatures:
        """The image step: the Qwen vision tower and the SAM image encoder, once per image.

        ``pooler_output`` comes back in raster order of the merged grid (transformers undoes the
        window permutation), i.e. the order of the image tokens in the LLM input. SAM embeddings
        given in the batch (``sam_image_embeddings``, the training cache) are used as they are.
        """
        qwen = self.qwen
        out = qwen.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        merge = qwen.config.vision_config.spatial_merge_size
        tokens = list(out.pooler_output)
        grids = [
            feats.view(t, h // merge, w // merge, -1)[0]
            for feats, (t, h, w) in zip(tokens, batch["image_grid_thw"].tolist())
        ]
        return ImageFeatures(vision_tokens=tokens, vision_grids=grids, image_embeddings=self._image_embeddings(batch))

    def encode_regions(
        self, batch: dict, image_embeddings: torch.Tensor, vision_grids: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region masks → (``<mask>`` tokens R×D, ``<pos>`` tokens R×D) through the region extractor."""
        crop_embeddings = None
        if self.region_extractor.local_aggregation and batch["region_masks"].shape[0] > 0:
            crop_embeddings = batch.get("region_crop_embeddings")
            if crop_embeddings is None:
                crop_embeddings = self.sam.encode(batch["region_crops"])
        return self.region_extractor(
            region_masks=batch["region_masks"],
            region_boxes=batch["region_boxes"],
            region_batch_index=batch["region_batch_index"],
            valid_hw=batch["sam_valid_hw"],
            image_embeddings=image_embeddings,
            crop_embeddings=crop_embeddings,
            crop_masks=batch.get("region_crop_masks"),
            vision_features=vision_grids,
        )

    def _scatter_region_tokens(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        in_prompt: torch.Tensor,
        mask_tokens: torch.Tensor,
        pos_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Put the in-prompt regions' ``<mask>``/``<pos>`` embeddings at their token positions (``masked_scatter``)."""
        for name, tokens in (("mask", mask_tokens), ("pos", pos_tokens)):
            positions = input_ids == self.token_ids[name]
            n_tokens = int(positions.sum())
            n_regions = int(in_prompt.sum()) if in_prompt.numel() else 0
            if n_tokens != n_regions:
                raise ValueError(
                    f"the batch has {n_tokens} <{name}> tokens but {n_regions} in-prompt region masks"
                )
            if n_tokens:
                values = tokens[in_prompt].to(embeds.dtype)
                embeds = embeds.masked_scatter(positions.unsqueeze(-1), values)
        return embeds

    def embed_prompt(self, batch: dict, images: ImageFeatures) -> dict[str, Any]:
        """The prompt step: input embeddings with the image features and region tokens scattered in
        (``get_placeholder_mask`` + ``masked_scatter``, as transformers inserts image features).

        ``images`` holds the features of the batch's images in batch order (from :meth:`encode_images`,
        possibly computed once and reused for several prompts). Returns ``inputs_embeds`` (B×L×D),
        ``mask_tokens`` and ``pos_tokens`` (R×D).
        """
        qwen = self.qwen
        input_ids = batch["input_ids"]
        n_regions = batch["region_masks"].shape[0] if "region_masks" in batch else 0
        embeds = qwen.get_input_embeddings()(input_ids)
        image_features = torch.cat(images.vision_tokens, dim=0).to(embeds.dtype)
        image_mask, _ = qwen.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=image_features)
        embeds = embeds.masked_scatter(image_mask, image_features)
        if n_regions:
            mask_tokens, pos_tokens = self.encode_regions(batch, images.image_embeddings, images.vision_grids)
        else:
            width = embeds.shape[-1]
            mask_tokens = pos_tokens = embeds.new_zeros((0, width))
        if n_regions or (input_ids == self.token_ids["mask"]).any() or (input_ids == self.token_ids["pos"]).any():
            in_prompt = batch.get("region_in_prompt")
            if in_prompt is None:
                in_prompt = torch.zeros(n_regions, dtype=torch.bool, device=input_ids.device)
            embeds = self._scatter_region_tokens(input_ids, embeds, in_prompt, mask_tokens, pos_tokens)
        return dict(inputs_embeds=embeds, mask_tokens=mask_tokens, pos_tokens=pos_tokens)

    def embed_inputs(self, batch: dict) -> dict[str, Any]:
        """Everything before the LLM (:meth:`encode_images` then :meth:`embed_prompt`); ``input_ids`` still go
        to the LLM beside the embeddings, for the 3-D rope positions."""
        images = self.encode_images(batch)
        return dict(self.embed_prompt(batch, images), images=images, image_embeddings=images.image_embeddings)

    def forward(self, batch: dict) -> dict[str, Any]:
        """Predictions for a batch built by :class:`~fclm.processor.FCLMProcessor` (see module docstring)."""
        qwen = self.qwen
        input_ids = batch["input_ids"]
        pre = self.embed_inputs(batch)
        out = qwen.model(
            input_ids=input_ids,
            inputs_embeds=pre["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            use_cache=False,
        )
        hidden = out.last_hidden_state
        outputs: dict[str, Any] = {"logits": qwen.lm_head(hidden)}
        outputs.update(self._ground(batch, hidden, pre["image_embeddings"], pre["images"].vision_grids))
        outputs.update(self._reconstruct(batch, pre))
        return outputs

    def _ground(self, batch: dict, hidden: torch.Tensor, image_embeddings: torch.Tensor,
                vision_grids: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """``[SEG]`` hidden states of a teacher-forced forward → :meth:`ground`."""
        input_ids = batch["input_ids"]
        seg_positions = input_ids == self.token_ids["seg"]
        seg_batch_index = seg_positions.nonzero()[:, 0]
        text_states = text_padding = None
        if bool(seg_positions.any()):
            text_states, text_padding = self._expression_states(batch, hidden, seg_positions)
        return self.ground(
            seg_hidden=hidden[seg_positions],
            seg_batch_index=seg_batch_index,
            image_embeddings=image_embeddings,
            valid_hw=batch["sam_valid_hw"],
            routes=batch.get("heads"),
            text_states=text_states,
            text_padding_mask=text_padding,
            vision_features=vision_grids,
        )

    def ground(
        self,
        *,
        seg_hidden: torch.Tensor,
        seg_batch_index: torch.Tensor,
        image_embeddings: torch.Tensor,
        valid_hw: torch.Tensor,
        routes: list[str] | None = None,
        text_states: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """``h[SEG]`` → seg projector → the head each sample routes to.

        Shared by the teacher-forced :meth:`forward` and by inference, which takes ``h[SEG]`` from the
        generation step that fed the token (:mod:`fclm.inference`).

        Arguments:
            seg_hidden: N×D last-layer hidden states at the ``[SEG]`` tokens, sample by sample.
            seg_batch_index: N, the sample (image) of each ``[SEG]``.
            image_embeddings: B×C×h×w SAM image embeddings; valid_hw: B×2.
            routes: head name per sample (default ``config.heads.default``).
            text_states, text_padding_mask: N×T×D expression states and N×T padding mask, or None.
            vision_features: B maps (gh×gw×D_vis) of the Qwen vision tower (``ImageFeatures.vision_grids``), or None.
        Returns:
            ``seg_hidden``, ``seg_embeddings``, ``seg_batch_index`` and ``heads``:
            ``{name: {"query_index": n, "pred_*": …}}``.
        """
        return route_to_heads(
            self.heads,
            seg_embeddings=self.seg_projector(seg_hidden),
            seg_hidden=seg_hidden,
            seg_batch_index=seg_batch_index,
            image_embeddings=image_embeddings,
            valid_hw=valid_hw,
            routes=routes if routes is not None else [self.config.heads.default] * image_embeddings.shape[0],
            text_states=text_states,
            text_padding_mask=text_padding_mask,
            vision_features=vision_features,
        )

    def _expression_states(
        self, batch: dict, hidden: torch.Tensor, seg_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each ``[SEG]``, the hidden states of its sample's user-text tokens before it (N×T×D, pad mask N×T).

        User text = tokens that are not labelled (prompt side), not image tokens and not padding; the
        specialist heads (C3VG, IGVG) attend over these as the expression.
        """
        labels = batch.get("labels")
        prompt = self.expression_token_mask(batch["input_ids"], batch["attention_mask"])
        if labels is not None:
            prompt &= labels == -100
        rows, cols = seg_positions.nonzero(as_tuple=True)
        return gather_expression_states(hidden, prompt, rows, cols)

    def expression_token_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """B×L bool: tokens that may belong to an expression (attended, not an image token)."""
        return attention_mask.bool() & (input_ids != self.token_ids["image_pad"])

    def _reconstruct(self, batch: dict, pre: dict) -> dict[str, Any]:
        """Self-reconstruction: decode ``z_pos`` (and ``z_mask`` if enabled) on the region's own image."""
        pos_tokens, mask_tokens = pre["pos_tokens"], pre["mask_tokens"]
        result: dict[str, Any] = {"mask_tokens": mask_tokens, "pos_tokens": pos_tokens}
        region_batch_index = batch.get("region_batch_index")
        if region_batch_index is None or pos_tokens.shape[0] == 0:
            return result
        image_embeddings = pre["image_embeddings"][region_batch_index]
        z_pos = self.pos_projector(pos_tokens)
        recon, _ = self.sam.decode(image_embeddings, z_pos[:, None, :])
        result.update(pos_embeddings=z_pos, pred_recon_masks=recon, region_batch_index=region_batch_index)
        if self.mask_projector is not None:
            z_mask = self.mask_projector(mask_tokens)
            recon_mask, _ = self.sam.decode(image_embeddings, z_mask[:, None, :])
            result.update(mask_embeddings=z_mask, pred_recon_masks_from_mask=recon_mask)
        return result

    # ------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: dict, *, max_new_tokens: int = 64, **generate_kwargs: Any) -> torch.Tensor:
        """Greedy (by default) continuation of prompts built with ``add_generation_prompt=True``.

        Region and image features are scattered into the input embeddings once; transformers'
        ``generate`` then runs with the KV cache. ``input_ids`` are passed alongside the embeddings so
        that the 3-D rope positions are computed from them (``ENVIRONMENT.md``: positions after an
        image trail the token index). Returns the new token ids only (B×T, padded with ``pad``).
        """
        qwen = self.qwen
        pre = self.embed_inputs(batch)
        qwen.model.rope_deltas = None  # never reuse positions from an earlier call
        generate_kwargs.setdefault("do_sample", False)
        out = qwen.generate(
            input_ids=batch["input_ids"],
            inputs_embeds=pre["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            use_cache=True,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.token_ids["pad"],
            eos_token_id=self.token_ids["im_end"],
            **generate_kwargs,
        )
        return out[:, batch["input_ids"].shape[1] :]

    # ------------------------------------------------------------------------------------------
    # save / load
    # ------------------------------------------------------------------------------------------

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of everything except the backbone (SAM, extractor, projectors, heads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the whole model: ``backbone/`` (HF format), ``fclm_modules.safetensors``, config, tokenizer, processor.

        A peft-wrapped backbone must be merged first (``fclm-train export`` does it).
        """
        if self.backbone is not self.qwen:
            raise ValueError("the backbone still carries LoRA adapters; merge them first (fclm-train export)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.qwen.save_pretrained(directory / BACKBONE_DIR, safe_serialization=True)
        extras = {k: v.detach().contiguous().cpu() for k, v in self.extra_state_dict().items()}
        save_file(extras, str(directory / MODULES_NAME))
        config = to_dict(self.config)
        config["backbone"]["name_or_path"] = None  # the weights are in backbone/
        config["backbone"]["tokenizer"] = None
        config["sam"]["checkpoint"] = None  # SAM weights are in fclm_modules.safetensors
        payload = {"config": config, "token_ids": self.token_ids, "format_version": 1}
        write_json(directory / CONFIG_NAME, payload)
        if self.processor is not None:
            self.processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **backbone_kwargs: Any) -> "FCLM":
        """Load a directory written by :meth:`save_pretrained` (weights checked: no missing or unexpected keys)."""
        from fclm.processor import FCLMProcessor

        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{directory} is not an FCLM model directory: {CONFIG_NAME} is missing")
        payload = json.loads(config_file.read_text())
        config = from_dict(FCLMConfig, with_legacy_position_branch(payload["config"]), prefix="config")
        processor = FCLMProcessor.from_pretrained(directory)
        model = _assemble(config, processor, backbone_path=directory / BACKBONE_DIR, load_sam_checkpoint=False)
        state = load_file(str(directory / MODULES_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(
                f"{directory / MODULES_NAME} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model


def route_to_heads(
    heads: nn.ModuleDict,
    *,
    seg_embeddings: torch.Tensor,
    seg_hidden: torch.Tensor,
    seg_batch_index: torch.Tensor,
    image_embeddings: torch.Tensor,
    valid_hw: torch.Tensor,
    routes: list[str],
    text_states: torch.Tensor | None = None,
    text_padding_mask: torch.Tensor | None = None,
    vision_features: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Send each query to the head its sample routes to (``routes``: one head name per image).

    Returns ``seg_hidden``, ``seg_embeddings``, ``seg_batch_index`` and ``heads``:
    ``{name: {"query_index": n, "pred_*": …}}`` (only heads that received queries). Shared by
    :class:`FCLM` and the head specialist (:mod:`fclm.model.specialist`).
    """
    result: dict[str, Any] = {
        "seg_hidden": seg_hidden,
        "seg_embeddings": seg_embeddings,
        "seg_batch_index": seg_batch_index,
        "heads": {},
    }
    if seg_hidden.shape[0] == 0:
        return result
    seg_routes = [routes[i] for i in seg_batch_index.tolist()]
    for name in sorted(set(seg_routes)):
        if name not in heads:
            raise ValueError(f"a sample routes [SEG] to head {name!r}, but the model has {sorted(heads)}")
        query_index = torch.tensor([i for i, r in enumerate(seg_routes) if r == name], device=seg_hidden.device)
        head_inputs = HeadInputs(
            image_embeddings=image_embeddings,
            seg_embeddings=seg_embeddings[query_index],
            seg_hidden=seg_hidden[query_index],
            seg_batch_index=seg_batch_index[query_index],
            text_states=None if text_states is None else text_states[query_index],
            text_padding_mask=None if text_padding_mask is None else text_padding_mask[query_index],
            valid_hw=valid_hw,
            vision_features=vision_features,
        )
        result["heads"][name] = {"query_index": query_index, **heads[name](head_inputs)}
    return result


def gather_expression_states(
    hidden: torch.Tensor, token_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For query i, the states ``hidden[rows[i], j]`` of the tokens j < ``cols[i]`` where ``token_mask`` holds.

    Returns N×T×D states (left-aligned, zero-padded) and the N×T padding mask (True = padding).
    """
    arange = torch.arange(token_mask.shape[1], device=token_mask.device)
    selections = [token_mask[r] & (arange < c) for r, c in zip(rows.tolist(), cols.tolist())]
    length = max([1] + [int(s.sum()) for s in selections])
    states = hidden.new_zeros((len(selections), length, hidden.shape[-1]))
    padding = torch.ones((len(selections), length), dtype=torch.bool, device=hidden.device)
    for i, (r, s) in enumerate(zip(rows.tolist(), selections)):
        n = int(s.sum())
        states[i, :n] = hidden[r][s]
        padding[i, :n] = False
    return states, padding


def _assemble(
    config: FCLMConfig, processor: Any, *, backbone_path: str | Path | None = None, load_sam_checkpoint: bool = True
) -> FCLM:
    from fclm.tokenizer import token_ids as tokenizer_token_ids

    tokenizer = processor.tokenizer
    ids = tokenizer_token_ids(tokenizer)
    backbone = build_backbone(config.backbone, ids, len(tokenizer), path=backbone_path)
    backbone.model.visual.requires_grad_(False)  # frozen in both stages (DESIGN §3); trainability may change it
    sam_cfg = config.sam
    if not load_sam_checkpoint and sam_cfg.checkpoint is not None:
        sam_cfg = from_dict(type(sam_cfg), {"checkpoint": None}, prefix="sam", base=sam_cfg)
    sam = build_sam(sam_cfg)
    llm_dim = backbone.config.text_config.hidden_size
    vision_dim = backbone.config.vision_config.out_hidden_size
    prompt_dim = config.sam.prompt_embed_dim
    extractor = build_region_extractor(
        config.region_extractor, sam_dim=prompt_dim, vision_dim=vision_dim, llm_dim=llm_dim
    )
    def project(input_norm: bool = False) -> MLPProjector:
        return MLPProjector(in_dim=llm_dim, out_dim=prompt_dim, num_layers=config.projector_layers, input_norm=input_norm)

    heads = {name: build_head(name, cfg=config, sam=sam, llm_dim=llm_dim) for name in config.heads.enabled}
    model = FCLM(
        backbone=backbone,
        sam=sam,
        region_extractor=extractor,
        seg_projector=project(input_norm=config.seg_query_norm == "standardize"),
        pos_projector=project(),
        mask_projector=project() if config.decode_mask_tokens else None,
        heads=heads,
        token_ids=ids,
        config=config,
    )
    model.processor = processor
    return model


def build_fclm(config: FCLMConfig, *, processor: Any = None, tokenizer: Any = None) -> FCLM:
    """Build FCLM from a config: backbone (random tiny or a local checkpoint), SAM, extractor, projectors, heads.

    ``processor`` / ``tokenizer`` may be passed in (e.g. a tiny tokenizer trained on a dataset's text);
    otherwise they are made from ``config.backbone``.
    """
    from fclm.processor import FCLMProcessor
    from fclm.tokenizer import load_tokenizer

    if processor is None:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.backbone)
        processor = FCLMProcessor.from_config(config, tokenizer=tokenizer)
    return _assemble(config, processor)
