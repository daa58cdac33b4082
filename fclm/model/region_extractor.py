"""Hybrid Region Extractor (seed 002): a region mask → the ``<mask>`` and ``<pos>`` tokens.

Semantic branch → ``<mask>`` (three steps, each switchable; a switched-off step is skipped and its
layers are not built, so no parameter goes unused):

1. *Local aggregation* — the region's crop (box enlarged by a context margin, encoded by the frozen
   SAM image encoder by the caller) gives features ``(C,h,w)``; the crop mask is area-pooled to
   ``h × w``; foreground cells (coverage > 0) are kept, projected ``C → hidden`` and mask-pooled
   (weighted by coverage) into ``T_mask``. Off: the same on the full-image SAM embeddings with the
   region mask (Osprey-style mask pooling).
2. *Pixel enhancement* — ``T_mask`` attends (multi-head cross-attention, background cells masked
   out as key padding) over the projected foreground pixel features; residual + LayerNorm.
3. *Semantic guidance* — single-scale deformable attention (Deformable DETR): from the region
   centre as reference point, the query predicts K offsets and K attention weights per head; the
   Qwen vision-tower feature map of the region's image is sampled bilinearly (``F.grid_sample``) at
   those points; the result is fused with ``T_mask`` by an MLP (residual + LayerNorm).

Position branch → ``<pos>``: an MLP over the mask pooled to ``P × P`` over the valid image area and
over the region's own box (``torchvision.ops.roi_align`` on the SAM-frame mask: the box-pooled mask
makes small shapes visible), plus the box centre and width/height (normalised to the image).

Both tokens come out in the LLM hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from fclm.config import RegionExtractorConfig

__all__ = ["HybridRegionExtractor", "build_region_extractor", "with_legacy_position_branch"]

LEGACY_POSITION_BRANCH = {"pos_hidden_dim": None, "pos_layers": 3, "pos_activation": "gelu", "pos_norm": "none"}
"""The position branch of models saved before its options existed (3 GELU layers ``hidden_dim`` wide)."""


def with_legacy_position_branch(config: dict) -> dict:
    """A saved model config (plain data) whose ``region_extractor`` names no position-branch option gets
    :data:`LEGACY_POSITION_BRANCH`, so that older exports still load with the weights they hold."""
    ext = config.get("region_extractor")
    if isinstance(ext, dict) and not any(k in ext for k in LEGACY_POSITION_BRANCH):
        return {**config, "region_extractor": {**ext, **LEGACY_POSITION_BRANCH}}
    return config


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *, activation: str = "gelu", norm: bool = False) -> nn.Sequential:
    """``Linear → [LayerNorm] → act → … → Linear`` (no activation after the last layer)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            if norm:
                layers.append(nn.LayerNorm(dims[i + 1]))
            layers.append(nn.GELU() if activation == "gelu" else nn.ReLU())
    return nn.Sequential(*layers)


class HybridRegionExtractor(nn.Module):
    """Region masks → ``<mask>`` tokens (semantic branch) and ``<pos>`` tokens (position branch).

    Arguments (keyword-only):
      sam_dim: channels C of SAM image embeddings.
      vision_dim: channels D_vis of the Qwen vision feature maps (merged grid).
      llm_dim: LLM hidden size D_llm (width of both output tokens).
      hidden_dim: internal width; divisible by ``num_heads``.
      num_heads: heads of the pixel-enhancement attention and of the deformable sampling.
      num_points: deformable sampling points per head.
      pooled_mask_size: P, the position branch's pooled-mask side.
      pos_hidden_dim, pos_layers, pos_activation, pos_norm: the position MLP (width, default ``hidden_dim``;
        Linear layers; ``gelu``/``relu``; ``layernorm`` after each hidden layer or ``none``).
      local_aggregation, pixel_enhancement, semantic_guidance: the three semantic steps.
    """

    def __init__(
        self,
        *,
        sam_dim: int,
        vision_dim: int,
        llm_dim: int,
        hidden_dim: int = 128,
        num_heads: int = 4,
        num_points: int = 4,
        pooled_mask_size: int = 16,
        pos_hidden_dim: int | None = None,
        pos_layers: int = 3,
        pos_activation: str = "gelu",
        pos_norm: str = "none",
        local_aggregation: bool = True,
        pixel_enhancement: bool = True,
        semantic_guidance: bool = True,
    ) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        if pos_activation not in ("gelu", "relu") or pos_norm not in ("none", "layernorm"):
            raise ValueError(f"pos_activation must be gelu|relu and pos_norm none|layernorm, got {pos_activation!r}, {pos_norm!r}")
        self.sam_dim = sam_dim
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.num_points = num_points
        self.pooled_mask_size = pooled_mask_size
        self.local_aggregation = local_aggregation
        self.pixel_enhancement = pixel_enhancement
        self.semantic_guidance = semantic_guidance

        # Semantic branch.
        self.feature_proj = _mlp(sam_dim, hidden_dim, hidden_dim, 2)  # "Proj" of step 1 (per pixel)
        if pixel_enhancement:
            self.pixel_attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
            self.pixel_norm = nn.LayerNorm(hidden_dim)
        if semantic_guidance:
            self.sampling_offsets = nn.Linear(hidden_dim, num_heads * num_points * 2)
            self.attention_weights = nn.Linear(hidden_dim, num_heads * num_points)
            self.value_proj = nn.Linear(vision_dim, hidden_dim)
            self.output_proj = nn.Linear(hidden_dim, hidden_dim)
            self.guidance_fuse = _mlp(2 * hidden_dim, hidden_dim, hidden_dim, 2)
            self.guidance_norm = nn.LayerNorm(hidden_dim)
            self._reset_deformable()
        self.mask_out = _mlp(hidden_dim, hidden_dim, llm_dim, 2)

        # Position branch: pooled mask over the image + over its box, centre (2), size (2).
        self.pos_mlp = _mlp(2 * pooled_mask_size**2 + 4, pos_hidden_dim or hidden_dim, llm_dim, pos_layers,
                            activation=pos_activation, norm=pos_norm == "layernorm")

    def _reset_deformable(self) -> None:
        """Deformable DETR's initialisation: zero offset weights, bias = one direction per head with
        the k-th point k cells out, uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 2).repeat(1, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    # ---------------------------------------------------------------------------------------------
    def forward(
        self,
        *,
        region_masks: torch.Tensor,
        region_boxes: torch.Tensor,
        region_batch_index: torch.Tensor,
        valid_hw: torch.Tensor,
        image_embeddings: torch.Tensor,
        crop_embeddings: torch.Tensor | None = None,
        crop_masks: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the two visual-prompt tokens of R regions of B images.

        Arguments:
          region_masks: (R,S,S) float {0,1}, the region masks in the SAM frame.
          region_boxes: (R,4) normalised xyxy in [0,1] of the original image.
          region_batch_index: (R,) long, the image of each region.
          valid_hw: (B,2) size (h, w) of the resized image inside the S × S SAM frame.
          image_embeddings: (B,C,h,w) SAM embeddings of the full images.
          crop_embeddings: (R,C,h,w) SAM embeddings of the region crops (needed with local aggregation).
          crop_masks: (R,S,S) the region masks in their crop frames (needed with local aggregation).
          vision_features: B tensors (gh_b,gw_b,D_vis), each image's Qwen vision features on the merged
            grid, covering the whole original image (needed with semantic guidance).
        Returns:
          mask_tokens (R,D_llm), pos_tokens (R,D_llm). R = 0 gives (0,D_llm) tensors.
        """
        dtype = self.mask_out[0].weight.dtype
        r = region_masks.shape[0]
        if region_masks.ndim != 3 or region_masks.shape[-1] != region_masks.shape[-2]:
            raise ValueError(f"region_masks must be (R,S,S), got {tuple(region_masks.shape)}")
        if region_boxes.shape != (r, 4) or region_batch_index.shape != (r,):
            raise ValueError(
                f"region_boxes (R,4) and region_batch_index (R,) must match region_masks' R = {r}, got "
                f"{tuple(region_boxes.shape)} and {tuple(region_batch_index.shape)}"
            )
        if r == 0:
            # Run the output layers on empty inputs so the result is part of the graph.
            empty_mask = self.mask_out(region_masks.new_zeros(0, self.hidden_dim, dtype=dtype))
            empty_pos = self.pos_mlp(region_masks.new_zeros(0, 2 * self.pooled_mask_size**2 + 4, dtype=dtype))
            return empty_mask, empty_pos

        mask_tokens = self._semantic_branch(
            region_masks=region_masks,
            region_boxes=region_boxes,
            region_batch_index=region_batch_index,
            image_embeddings=image_embeddings,
            crop_embeddings=crop_embeddings,
            crop_masks=crop_masks,
            vision_features=vision_features,
            dtype=dtype,
        )
        pos_tokens = self.position_token(self.position_features(region_masks, region_boxes, region_batch_index, valid_hw).to(dtype))
        return mask_tokens, pos_tokens

    def position_token(self, features: torch.Tensor) -> torch.Tensor:
        """(R, 2·P² + 4) position features (:meth:`position_features`) → (R, D_llm) ``<pos>`` tokens."""
        return self.pos_mlp(features)

    # ---------------------------------------------------------------------------------------------
    def _semantic_branch(
        self,
        *,
        region_masks: torch.Tensor,
        region_boxes: torch.Tensor,
        region_batch_index: torch.Tensor,
        image_embeddings: torch.Tensor,
        crop_embeddings: torch.Tensor | None,
        crop_masks: torch.Tensor | None,
        vision_features: list[torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        r = region_masks.shape[0]
        if self.local_aggregation:
            if crop_embeddings is None or crop_masks is None:
                raise ValueError("local_aggregation needs crop_embeddings (R,C,h,w) and crop_masks (R,S,S)")
            features, masks = crop_embeddings, crop_masks
        else:
            features, masks = image_embeddings[region_batch_index], region_masks
        if features.shape[0] != r or masks.shape != region_masks.shape or features.shape[1] != self.sam_dim:
            raise ValueError(
                f"expected {r} feature maps with {self.sam_dim} channels and masks of shape {tuple(region_masks.shape)}, "
                f"got features {tuple(features.shape)} and masks {tuple(masks.shape)}"
            )
        h, w = features.shape[-2:]
        # Coverage of each feature cell by the mask (exact area pooling when S is a multiple of h).
        coverage = F.adaptive_avg_pool2d(masks[:, None].to(dtype), (h, w)).flatten(1)  # (R,h*w)
        # A region with no foreground cell (empty mask) falls back to the whole grid rather than NaN.
        empty = coverage.sum(1, keepdim=True) <= 0
        coverage = torch.where(empty, torch.ones_like(coverage), coverage)
        pixels = self.feature_proj(features.to(dtype).flatten(2).transpose(1, 2))  # (R,h*w,hidden)
        token = (coverage[..., None] * pixels).sum(1) / coverage.sum(1, keepdim=True)  # mask pooling

        if self.pixel_enhancement:
            background = coverage <= 0  # key padding: True = ignored
            attended, _ = self.pixel_attn(token[:, None], pixels, pixels, key_padding_mask=background, need_weights=False)
            token = self.pixel_norm(token + attended[:, 0])

        if self.semantic_guidance:
            if vision_features is None:
                raise ValueError("semantic_guidance needs vision_features, one (gh,gw,D_vis) map per image")
            centre = torch.stack(
                [(region_boxes[:, 0] + region_boxes[:, 2]) / 2, (region_boxes[:, 1] + region_boxes[:, 3]) / 2], -1
            ).to(dtype)
            guided = self._deformable_sample(token, centre, region_batch_index, vision_features)
            token = self.guidance_norm(token + self.guidance_fuse(torch.cat([token, guided], -1)))
        return self.mask_out(token)

    def _deformable_sample(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        batch_index: torch.Tensor,
        vision_features: list[torch.Tensor],
    ) -> torch.Tensor:
        """Single-scale deformable attention: (R,hidden) queries at (R,2) reference points (x, y in
        [0,1]) over each region's own vision feature map → (R,hidden)."""
        r = query.shape[0]
        nh, k = self.num_heads, self.num_points
        head_dim = self.hidden_dim // nh
        offsets = self.sampling_offsets(query).view(r, nh, k, 2)
        weights = self.attention_weights(query).view(r, nh, k).softmax(-1)
        out = query.new_zeros(r, nh, head_dim)
        for b in torch.unique(batch_index).tolist():
            if b >= len(vision_features):
                raise ValueError(f"region of image {b} but only {len(vision_features)} vision feature maps were given")
            fmap = vision_features[b]
            if fmap.ndim != 3 or fmap.shape[-1] != self.vision_dim:
                raise ValueError(f"vision_features[{b}] must be (gh,gw,{self.vision_dim}), got {tuple(fmap.shape)}")
            gh, gw = fmap.shape[:2]
            idx = (batch_index == b).nonzero(as_tuple=True)[0]
            value = self.value_proj(fmap.to(query.dtype)).view(gh, gw, nh, head_dim).permute(2, 3, 0, 1)  # (nh,hd,gh,gw)
            # Offsets are in feature cells (Deformable DETR normalises them by the map size).
            scale = torch.tensor([gw, gh], dtype=query.dtype, device=query.device)
            loc = reference[idx][:, None, None, :] + offsets[idx] / scale  # (n,nh,k,2) in [0,1]
            grid = (2.0 * loc - 1.0).permute(1, 0, 2, 3)  # (nh,n,k,2)
            sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (nh,hd,n,k)
            pooled = (sampled * weights[idx].permute(1, 0, 2)[:, None]).sum(-1)  # (nh,hd,n)
            out = out.index_copy(0, idx, pooled.permute(2, 0, 1))
        return self.output_proj(out.reshape(r, self.hidden_dim))

    # ---------------------------------------------------------------------------------------------
    def position_features(
        self,
        region_masks: torch.Tensor,
        region_boxes: torch.Tensor,
        region_batch_index: torch.Tensor,
        valid_hw: torch.Tensor,
    ) -> torch.Tensor:
        """Input of the position MLP: (R, 2·P² + 4) = [mask pooled over the valid image area (P²),
        mask pooled over its own box (P²), centre x, y, width, height (normalised)].

        Pooling is ``roi_align`` (aligned, adaptive sampling) on the SAM-frame mask; the valid area
        and the box are mapped to the frame with each image's ``valid_hw``.
        """
        p = self.pooled_mask_size
        r = region_masks.shape[0]
        masks = region_masks[:, None].float()
        hw = valid_hw.to(region_masks.device)[region_batch_index].float()  # (R,2) = (h, w)
        vh, vw = hw[:, 0], hw[:, 1]
        rows = torch.arange(r, device=masks.device, dtype=torch.float32)
        zeros = torch.zeros_like(vh)
        boxes = region_boxes.float().clamp(0.0, 1.0)
        valid_rois = torch.stack([rows, zeros, zeros, vw, vh], -1)
        box_rois = torch.stack([rows, boxes[:, 0] * vw, boxes[:, 1] * vh, boxes[:, 2] * vw, boxes[:, 3] * vh], -1)
        pooled = roi_align(masks, torch.cat([valid_rois, box_rois]), output_size=p, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        on_image, on_box = pooled[:r].flatten(1), pooled[r:].flatten(1)
        centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
        size = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], -1)
        return torch.cat([on_image, on_box, centre, size], -1)


def build_region_extractor(cfg: RegionExtractorConfig, *, sam_dim: int, vision_dim: int, llm_dim: int) -> HybridRegionExtractor:
    """Build the extractor with the sizes and ablation flags of ``cfg``."""
    return HybridRegionExtractor(
        sam_dim=sam_dim,
        vision_dim=vision_dim,
        llm_dim=llm_dim,
        hidden_dim=cfg.hidden_dim,
        num_heads=cfg.num_heads,
        num_points=cfg.num_points,
        pooled_mask_size=cfg.pooled_mask_size,
        pos_hidden_dim=cfg.pos_hidden_dim,
        pos_layers=cfg.pos_layers,
        pos_activation=cfg.pos_activation,
        pos_norm=cfg.pos_norm,
        local_aggregation=cfg.local_aggregation,
        pixel_enhancement=cfg.pixel_enhancement,
        semantic_guidance=cfg.semantic_guidance,
    )
