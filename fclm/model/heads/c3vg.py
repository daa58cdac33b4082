"""The ``c3vg`` head (seed 000, C3VG): coarse box + mask from the ``[SEG]`` query, then a mask-guided refinement.

Before stage 1 the image tokens attend to the expression (``heads.c3vg.text_fusion``): C3VG reads the
image through BEiT-3, a multimodal encoder whose image tokens have seen the text; SAM's have not.

Stage 1, Rough Semantic Perception: the query (z_seg and h[SEG], projected) attends to the expression
and to the image, and gives a coarse box (MLP) and a coarse mask (a pixel decoder: the image features
upscaled 4×, SAM-style, dotted with a kernel made from the query).

Stage 2, Refined Consistency Interaction, the Mask-guided Interaction Module (:class:`MaskGuidedInteraction`):
the image features weighted by the coarse mask, by the coarse box and by both are fused into pixel
tokens; a box query (the stage-1 query + the features pooled in the coarse box + the box coordinates)
attends to the expression then to the pixel tokens; the pixel tokens attend to the expression and the
box query. The refined box is the coarse box moved by the box query (in inverse-sigmoid space, as
Deformable DETR refines boxes); the refined mask comes from the pixel tokens upscaled and dotted with a
kernel of the box query. The bidirectional consistency losses that tie box and mask are in
:mod:`fclm.losses.c3vg`.

Where ours departs from the public code (``UniHeadCoarseToFine`` in github Dmmm1997/C3VG):

* its query comes from a text encoder's [CLS]; ours is the LLM's ``[SEG]`` (z_seg + h[SEG]), and its
  expression tokens are the LLM's hidden states of the expression (``HeadInputs.text_states``);
* its box weighting rounds the coarse box to whole cells (no gradient); ours uses each cell's covered
  fraction (:func:`fclm.losses.c3vg.box_coverage`), so the refined losses reach the coarse box too;
* its pixel→text attention output is overwritten by a pixel self-attention; ours keeps pixel→text
  (with the box query as one more key, attention without a feed-forward layer, as SAM's image side)
  and leaves out pixel self-attention (4096 pixels per query at SAM's 64 × 64 grid);
* its stage-1 mask is a text-conditioned 1 × 1 conv at the feature grid; ours is SAM-style (4×
  upscaled features · a kernel from the query), and the refined mask is made the same way;
* a learned "null" key is always attended besides the expression, so a query without text
  (``text_states`` None) or with all of it padded runs the same blocks;
* boxes are two sorted sigmoids per axis, so they lie in [0, 1] with x1 ≤ x2 by construction;
* optionally (``heads.c3vg.coarse_box_anchor: mask``) the coarse box is centred on the coarse mask's soft
  centre of mass plus a regressed offset, not regressed from the query alone; off by default (the paper's);
* the image features get the fixed 2-D sine position added (values, not only keys): BEiT-3's tokens carry
  their learned position embedding, SAM's need not (a randomly initialised SAM encoder's ``pos_embed`` is
  zero), and a query that attends to position-free values cannot tell where it looked. Measured on the
  demo's ShapesRef (docs/benchmarks.md, "Grounding heads"): without it the coarse box's training IoU stayed
  at the mean box's 0.134 for 600 steps; with it, it rose from step ~500 (0.196 at 1,000).

Outputs (n rows): ``pred_masks`` (n,4h,4w) refined mask logits, ``pred_boxes`` (n,4) refined box,
``pred_scores`` (n,) the mean refined-mask probability over its foreground (p > 0.5; 0 when empty),
detached, ``pred_coarse_masks`` (n,4h,4w), ``pred_coarse_boxes`` (n,4). Masks are in the S × S SAM
frame on 4× the embedding grid (SAM's low resolution); boxes are normalised xyxy of that frame.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from fclm.losses.c3vg import C3VGCriterion, box_coverage, build_c3vg_criterion
from fclm.model.heads.base import HeadInputs, register_head

if TYPE_CHECKING:
    from fclm.config import FCLMConfig
    from fclm.model.sam import SamBackend

__all__ = ["C3VGHead", "MaskGuidedInteraction", "CrossAttentionBlock", "build_c3vg_head"]


def _sine_position_encoding(h: int, w: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h·w, dim) fixed 2-D sine encoding of cell centres (DETR's normalised ``PositionEmbeddingSine``)."""
    quarter = dim // 4
    freq = 10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    ey = torch.cat([(ys[:, None] / freq).sin(), (ys[:, None] / freq).cos()], dim=-1)  # (h, dim/2)
    ex = torch.cat([(xs[:, None] / freq).sin(), (xs[:, None] / freq).cos()], dim=-1)  # (w, dim/2)
    pe = torch.cat([ey[:, None].expand(h, w, -1), ex[None].expand(h, w, -1)], dim=-1)
    return pe.reshape(h * w, -1).to(dtype)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _ordered_boxes(logits: torch.Tensor) -> torch.Tensor:
    """(n,4) logits → normalised xyxy in [0,1]: per axis, the two sigmoids sorted (x1 ≤ x2, y1 ≤ y2)."""
    p = logits.float().sigmoid()
    x1, x2 = torch.minimum(p[:, 0], p[:, 2]), torch.maximum(p[:, 0], p[:, 2])
    y1, y2 = torch.minimum(p[:, 1], p[:, 3]), torch.maximum(p[:, 1], p[:, 3])
    return torch.stack([x1, y1, x2, y2], dim=-1)


def _upscaler(dim: int) -> nn.Sequential:
    """(N,dim,h,w) → (N,dim/8,4h,4w), SAM's ``output_upscaling``."""
    return nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )


class Attention(nn.Module):
    """Multi-head attention over ``F.scaled_dot_product_attention`` (works with an empty batch, where
    ``nn.MultiheadAttention`` with a key padding mask does not)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        return x.reshape(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (N,L,d), k and v (N,M,d), key_padding_mask (N,M) True = ignore → (N,L,d)."""
        mask = None if key_padding_mask is None else ~key_padding_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(self._split(self.q_proj(q)), self._split(self.k_proj(k)),
                                             self._split(self.v_proj(v)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then feed-forward, both residual: ``x`` (N,L,d) attends to ``memory`` (N,M,d).

    Positions are added to queries and keys (not values), DETR-style; ``memory_padding`` (N,M) is True
    at keys to ignore. ``mlp_dim`` None: attention only (for pixel tokens, as SAM's two-way transformer
    runs no MLP on the image side).
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int | None) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_memory = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim) if mlp_dim is not None else None
        self.mlp = MLPBlock(dim, mlp_dim) if mlp_dim is not None else None

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        *,
        x_pos: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
        memory_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.norm_x(x)
        v = self.norm_memory(memory)
        k = v if memory_pos is None else v + memory_pos
        q = q if x_pos is None else q + x_pos
        x = x + self.attn(q, k, v, key_padding_mask=memory_padding)
        if self.mlp is None:
            return x
        return x + self.mlp(self.norm_mlp(x))


class MaskGuidedInteraction(nn.Module):
    """C3VG's Mask-guided Interaction Module: coarse mask and box guide the refined box query and pixel tokens.

    Arguments:
      dim: feature width d; num_heads, mlp_dim: of the attention blocks; num_layers: interaction rounds;
      box_outside_weight: weight of features outside the coarse box (inside 1).
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, num_layers: int, box_outside_weight: float) -> None:
        super().__init__()
        self.box_outside_weight = box_outside_weight
        # seg-weighted, box-weighted, both, plain → d (the public "boxmask" composition), added to the plain features
        self.compose = nn.Sequential(nn.Conv2d(4 * dim, dim, 1), LayerNorm2d(dim), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.box_coordinates = nn.Linear(4, dim)
        self.box_token = MLP(3 * dim, dim, dim, 2)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "box_to_text": CrossAttentionBlock(dim=dim, num_heads=num_heads, mlp_dim=mlp_dim),
                "box_to_image": CrossAttentionBlock(dim=dim, num_heads=num_heads, mlp_dim=mlp_dim),
                "pixel_to_text": CrossAttentionBlock(dim=dim, num_heads=num_heads, mlp_dim=None),
            })
            for _ in range(num_layers)
        )

    def forward(
        self,
        query: torch.Tensor,
        features: torch.Tensor,
        coarse_boxes: torch.Tensor,
        coarse_masks: torch.Tensor,
        text: torch.Tensor,
        text_padding: torch.Tensor,
        pixel_pos: torch.Tensor,
        pixel_padding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Arguments:
          query: (n,1,d) stage-1 query; features: (n,d,h,w) each query's image features;
          coarse_boxes: (n,4) normalised xyxy; coarse_masks: (n,Hl,Wl) logits over the same frame;
          text: (n,M,d) expression keys (null key first) and text_padding (n,M);
          pixel_pos: (h·w,d); pixel_padding: (n,h·w) True at cells outside the image.
        Returns:
          box query (n,1,d) and pixel features (n,d,h,w).
        """
        n, d, h, w = features.shape
        mask_weight = F.adaptive_avg_pool2d(coarse_masks.float().sigmoid()[:, None], (h, w)).to(features.dtype)
        coverage = box_coverage(coarse_boxes, h, w)[:, None].to(features.dtype)  # (n,1,h,w), differentiable in the box
        box_weight = self.box_outside_weight + (1 - self.box_outside_weight) * coverage
        composed = torch.cat(
            [features * mask_weight, features * box_weight, features * mask_weight * box_weight, features], dim=1
        )
        pixels = features + self.compose(composed)

        pooled = (features * coverage).sum((2, 3)) / coverage.sum((2, 3)).clamp(min=1e-6)
        box_query = query + self.box_token(
            torch.cat([query[:, 0], pooled, self.box_coordinates(coarse_boxes.to(features.dtype))], dim=-1)
        )[:, None]

        tokens = pixels.flatten(2).transpose(1, 2)  # (n, h·w, d)
        no_pad = text_padding.new_zeros((n, 1))
        for layer in self.layers:
            box_query = layer["box_to_text"](box_query, text, memory_padding=text_padding)
            box_query = layer["box_to_image"](box_query, tokens, memory_pos=pixel_pos, memory_padding=pixel_padding)
            tokens = layer["pixel_to_text"](
                tokens,
                torch.cat([text, box_query], dim=1),
                x_pos=pixel_pos,
                memory_padding=torch.cat([text_padding, no_pad], dim=1),
            )
        return box_query, tokens.transpose(1, 2).reshape(n, d, h, w)


class C3VGHead(nn.Module):
    """Coarse box + mask from each ``[SEG]``, refined by the mask-guided interaction (module docstring).

    Arguments:
      prompt_dim: C, channels of SAM image embeddings and of z_seg; llm_dim: width of h[SEG] and of the
        expression states; frame_size: S, side of the SAM frame (to tell padding cells from valid_hw);
      hidden_dim, num_heads, mlp_dim: the head's sizes; mim: build and use the interaction module
        (off: the refined stage reads the stage-1 query and the plain features); mim_layers,
        box_outside_weight: of the interaction module; text_fusion: the pixels attend to the expression
        before stage 1; coarse_box_anchor: "none" (the coarse box regressed from the query) or "mask" (centred
        on the coarse mask; ``C3VGConfig.coarse_box_anchor``).
    """

    def __init__(
        self,
        *,
        prompt_dim: int,
        llm_dim: int,
        frame_size: int,
        hidden_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 1024,
        mim: bool = True,
        mim_layers: int = 1,
        box_outside_weight: float = 0.1,
        text_fusion: bool = True,
        coarse_box_anchor: str = "none",
    ) -> None:
        super().__init__()
        d = hidden_dim
        self.frame_size = frame_size
        self.hidden_dim = d
        self.image_proj = nn.Sequential(nn.Conv2d(prompt_dim, d, 1), LayerNorm2d(d))
        self.seg_proj = nn.Linear(prompt_dim, d)
        self.hidden_proj = nn.Linear(llm_dim, d)
        self.query_norm = nn.LayerNorm(d)
        self.text_proj = nn.Sequential(nn.Linear(llm_dim, d), nn.LayerNorm(d))
        self.null_text = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.null_text, std=0.02)

        # C3VG's image tokens come out of a multimodal encoder (BEiT-3) that has already read the
        # expression; SAM's have not, so the pixels attend to the expression first (heads.c3vg.text_fusion)
        self.text_fusion = CrossAttentionBlock(dim=d, num_heads=num_heads, mlp_dim=None) if text_fusion else None

        # stage 1: Rough Semantic Perception
        self.query_to_text = CrossAttentionBlock(dim=d, num_heads=num_heads, mlp_dim=mlp_dim)
        self.query_to_image = CrossAttentionBlock(dim=d, num_heads=num_heads, mlp_dim=mlp_dim)
        self.coarse_box = MLP(d, d, 4, 3)
        if coarse_box_anchor not in ("none", "mask"):
            raise ValueError(f"coarse_box_anchor must be 'none' or 'mask', not {coarse_box_anchor!r}")
        self.coarse_box_anchor = coarse_box_anchor
        with torch.no_grad():
            if coarse_box_anchor == "none":  # start from a centred box of half the frame, not a degenerate point
                self.coarse_box.layers[-1].bias.copy_(torch.tensor([-1.1, -1.1, 1.1, 1.1]))
            else:  # (centre offset, size logits): no offset from the mask's centre, a fifth of the frame
                self.coarse_box.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, -1.4, -1.4]))
        self.coarse_upscaler = _upscaler(d)
        self.coarse_kernel = MLP(d, d, d // 8, 3)

        # stage 2: Refined Consistency Interaction
        self.mim = (
            MaskGuidedInteraction(dim=d, num_heads=num_heads, mlp_dim=mlp_dim, num_layers=mim_layers,
                                  box_outside_weight=box_outside_weight)
            if mim else None
        )
        self.refine_box = MLP(d, d, 4, 3)
        with torch.no_grad():  # the refined box starts as the coarse one
            self.refine_box.layers[-1].weight.zero_()
            self.refine_box.layers[-1].bias.zero_()
        self.refine_upscaler = _upscaler(d)
        self.refine_kernel = MLP(d, d, d // 8, 3)

    def _text_memory(self, inputs: HeadInputs, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expression keys (n,1+T,d), the null key first, and their padding mask (n,1+T), True = ignore."""
        null = self.null_text.to(dtype).expand(n, 1, -1)
        keep = torch.zeros((n, 1), dtype=torch.bool, device=null.device)
        if inputs.text_states is None:
            return null, keep
        text = self.text_proj(inputs.text_states.to(dtype))
        pad = inputs.text_padding_mask
        if pad is None:
            pad = torch.zeros(text.shape[:2], dtype=torch.bool, device=text.device)
        return torch.cat([null, text], dim=1), torch.cat([keep, pad.to(text.device).bool()], dim=1)

    def _pixel_padding(self, valid_hw: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B,h·w) bool, True at embedding cells that start outside the image's valid area of the frame."""
        valid_hw = valid_hw.long()
        rows = torch.arange(h, device=valid_hw.device)[None] * self.frame_size >= valid_hw[:, :1] * h  # (B,h)
        cols = torch.arange(w, device=valid_hw.device)[None] * self.frame_size >= valid_hw[:, 1:] * w  # (B,w)
        return (rows[:, :, None] | cols[:, None, :]).flatten(1)

    def _coarse_boxes(self, query: torch.Tensor, coarse_masks: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Stage 1's (n,4) xyxy boxes from the (n,d) query: regressed (``coarse_box_anchor`` "none"), or
        centred on the soft centre of mass of the (n,H,W) coarse mask logits over its valid cells ("mask";
        ``padding`` (n,h,w) True at padding cells of the embedding grid) plus the regressed offset."""
        out = self.coarse_box(query).float()
        if self.coarse_box_anchor == "none":
            return _ordered_boxes(out)
        hh, ww = coarse_masks.shape[-2:]
        pad = padding.repeat_interleave(hh // padding.shape[1], 1).repeat_interleave(ww // padding.shape[2], 2)
        weights = coarse_masks.float().flatten(1).masked_fill(pad.flatten(1), float("-inf")).softmax(-1)  # (n,H·W)
        ys = (torch.arange(hh, device=query.device, dtype=torch.float32) + 0.5) / hh
        xs = (torch.arange(ww, device=query.device, dtype=torch.float32) + 0.5) / ww
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # (H·W,2) cell centres, (x,y)
        centre = (_inverse_sigmoid(weights @ grid) + out[:, :2]).sigmoid()
        half = out[:, 2:].sigmoid() / 2
        return torch.cat([centre - half, centre + half], -1).clamp(0, 1)

    def forward(self, inputs: HeadInputs) -> dict[str, torch.Tensor]:
        dtype = self.seg_proj.weight.dtype
        n = inputs.num_queries
        batch_index = inputs.seg_batch_index.long()
        images = self.image_proj(inputs.image_embeddings.to(dtype))  # (B,d,h,w)
        _, d, h, w = images.shape
        pixel_pos = _sine_position_encoding(h, w, d, device=images.device, dtype=dtype)
        # Each cell's features carry its place (module docstring: without it the box cannot be regressed).
        images = images + pixel_pos.transpose(0, 1).reshape(1, d, h, w)
        pixel_padding = self._pixel_padding(inputs.valid_hw.to(images.device), h, w)[batch_index]
        features = images[batch_index]  # (n,d,h,w)
        tokens = features.flatten(2).transpose(1, 2)
        text, text_padding = self._text_memory(inputs, n, dtype)
        if self.text_fusion is not None:
            tokens = self.text_fusion(tokens, text, x_pos=pixel_pos, memory_padding=text_padding)
            features = tokens.transpose(1, 2).reshape(n, d, h, w)

        query = self.seg_proj(inputs.seg_embeddings.to(dtype)) + self.hidden_proj(inputs.seg_hidden.to(dtype))
        query = self.query_norm(query)[:, None]  # (n,1,d)

        # Stage 1: Rough Semantic Perception.
        query = self.query_to_text(query, text, memory_padding=text_padding)
        query = self.query_to_image(query, tokens, memory_pos=pixel_pos, memory_padding=pixel_padding)
        # (n,d/8,4h,4w): once per image, or per query when the features have read its expression
        upscaled = self.coarse_upscaler(features) if self.text_fusion is not None else self.coarse_upscaler(images)[batch_index]
        coarse_masks = torch.einsum("nc,nchw->nhw", self.coarse_kernel(query[:, 0]), upscaled)
        coarse_boxes = self._coarse_boxes(query[:, 0], coarse_masks, pixel_padding.view(n, h, w))

        # Stage 2: Refined Consistency Interaction.
        if self.mim is not None:
            box_query, pixels = self.mim(
                query, features, coarse_boxes, coarse_masks, text, text_padding, pixel_pos, pixel_padding
            )
        else:
            box_query, pixels = query, features
        boxes = _ordered_boxes(_inverse_sigmoid(coarse_boxes) + self.refine_box(box_query[:, 0]).float())
        masks = torch.einsum("nc,nchw->nhw", self.refine_kernel(box_query[:, 0]), self.refine_upscaler(pixels))

        with torch.no_grad():
            prob = masks.float().sigmoid().flatten(1)
            fg = prob > 0.5
            scores = (prob * fg).sum(1) / fg.sum(1).clamp(min=1)
        return {
            "pred_masks": masks,
            "pred_boxes": boxes,
            "pred_scores": scores,
            "pred_coarse_masks": coarse_masks,
            "pred_coarse_boxes": coarse_boxes,
        }


@register_head("c3vg", criterion=build_c3vg_criterion, loss_weights=C3VGCriterion.LOSS_WEIGHTS)
def build_c3vg_head(*, cfg: "FCLMConfig", sam: "SamBackend", llm_dim: int) -> C3VGHead:
    """The ``c3vg`` head sized by ``cfg.heads.c3vg`` over SAM's prompt space (``cfg.sam``); it owns all its weights
    (``sam`` is not used: the head reads only the image embeddings it is given)."""
    c = cfg.heads.c3vg
    hidden_dim = c.hidden_dim if c.hidden_dim is not None else cfg.sam.prompt_embed_dim
    if hidden_dim % c.num_heads:
        raise ValueError(f"heads.c3vg: the head's width {hidden_dim} (hidden_dim, else sam.prompt_embed_dim) "
                         f"is not a multiple of heads.c3vg.num_heads {c.num_heads}")
    return C3VGHead(
        prompt_dim=cfg.sam.prompt_embed_dim,
        llm_dim=llm_dim,
        frame_size=cfg.sam.img_size,
        hidden_dim=hidden_dim,
        num_heads=c.num_heads,
        mlp_dim=c.mlp_dim if c.mlp_dim is not None else 4 * hidden_dim,
        mim=c.mim,
        mim_layers=c.mim_layers,
        box_outside_weight=c.box_outside_weight,
        text_fusion=c.text_fusion,
        coarse_box_anchor=c.coarse_box_anchor,
    )
