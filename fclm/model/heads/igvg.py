"""The ``igvg`` head (seed 001, IGVG's Point-guided Instance-aware Perception Head) over SAM embeddings.

Per routed ``[SEG]`` (one row = one expression on its image):

1. **Text-image fusion** (ours). IGVG's image features come out of a multimodal encoder that has
   already fused the expression; SAM's embeddings know nothing of it. So the projected SAM embedding
   F_i attends to the expression tokens (the ``[SEG]`` token z_seg first, then the LLM's expression
   states) and is modulated by z_seg, before everything else.
2. **Attention-guided Query Generation** (§3.1.1): the Score Text Selector picks N_q text queries
   (``[SEG]`` always first, then by L2 norm); they attend to F_i (Eq. 1); the attention logits
   averaged over heads and selected tokens are the map M (``pred_text_attn``, supervised by the union
   mask); the Dist-Score Point Selector (Algorithm 1) picks N_q cells; Inject Text Query builds
   Q_init = MLP([attended text query; F_i at the point]) (Eq. 2).
3. **SimFPN** turns F_i into a ×4/×2/×1/×½ pyramid (the ×4 and ×2 levels from the SAM embeddings once
   per image, the ×1 and ×½ levels from the fused map per row — a cost choice: per-expression ×4 maps
   would dominate the head); a multi-scale **deformable decoder** refines the
   queries around the selected points (reference points fixed, as in the authors' code); each layer
   predicts object/no-object logits and a box (centre offset from the point).
4. **Global mask decoder** (UNet over the pyramid) → S_global; the global mask is a conv of it,
   the no-target logit a pixel MLP averaged over the image, and the instance masks
   ``Q_s = MLP(Q_d) · S_global`` (the MLP maps queries to S_global's narrower width).

Other departures from the paper / the authors' public code, and why:

* M is the mean of the pre-softmax logits ``q·k/√d`` (heads and selected tokens), not of the softmax
  weights (the authors max-pool the weights and then apply a sigmoid, Eq. 2 says average): the BCE/dice
  supervision and Algorithm 1's σ(M) then act on a real logit scale.
* STS always keeps the ``[SEG]`` token (it carries the expression in FCLM) and ranks the rest by L2
  norm as the paper says (the public code ranks by the mean); with fewer valid tokens than N_q the
  valid ones are repeated (the public code pads with zeros).
* ``seg_hidden`` is not read: the head sees the ``[SEG]`` state through z_seg = seg_projector(h[SEG]),
  so the projector is trained by this head like by the others.
* Norms are LayerNorms (rows are single expressions; BatchNorm statistics would depend on the routing).
* Two switches, off by default (the paper's head): ``decoder_text_attention`` adds a cross-attention to
  the expression tokens in each decoder layer (Grounding DINO's decoder), because the finer pyramid
  levels here come from text-blind SAM embeddings; ``class_head: text`` makes the object logit a scaled
  dot product of the query and z_seg (Grounding DINO's contrastive classification). A third,
  ``nms_iou``, adds box NMS to the post-processing (the paper has none). Their effect at demo scale is
  measured in ``docs/benchmarks.md`` ("Grounding heads", finding 7).

Outputs (n rows, Q = N_q, L decoder layers, Hl × Wl = finest pyramid level, h × w = SAM grid):
``pred_masks`` (n,Q,Hl,Wl) logits, ``pred_boxes`` (n,Q,4) frame xyxy, ``pred_scores`` (n,Q),
``pred_exists`` (n,) logits, ``pred_global_masks`` (n,Hl,Wl), ``pred_points`` (n,Q,2) frame xy,
``pred_text_attn`` (n,h,w) logits, ``pred_logits`` (n,Q,2), ``pred_logits_layers`` (n,L,Q,2),
``pred_boxes_layers`` (n,L,Q,4) cx,cy,w,h — the criterion is :class:`fclm.losses.igvg.IGVGCriterion`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from fclm.losses.igvg import IGVGCriterion, build_igvg_criterion
from fclm.model.heads.base import Detections, HeadInputs, register_head
from fclm.model.heads.igvg_ops import (
    MLP, Memory, QueryDecoderLayer, SimFPN, TextToImageAttention, UNetMaskDecoder, cell_centers, dist_score_point_selector,
    gather_rows, grid_valid_mask, inverse_sigmoid, score_text_selector, sine_position_embedding, topk_point_selector,
)

if TYPE_CHECKING:
    from fclm.config import FCLMConfig, IGVGConfig
    from fclm.model.sam import SamBackend

__all__ = ["IGVGHead", "build_igvg_head"]


class IGVGHead(nn.Module):
    """The ``igvg`` head (module docstring). Owns all its parameters; does not use the SAM decoder.

    Arguments:
      cfg: ``heads.igvg``; prompt_dim: C of the SAM embeddings and z_seg; llm_dim: D of the LLM states;
      embedding_size: h = w of the SAM grid; frame_size: S of the SAM frame.
    """

    def __init__(self, *, cfg: "IGVGConfig", prompt_dim: int, llm_dim: int, embedding_size: int, frame_size: int) -> None:
        super().__init__()
        d = cfg.hidden_dim or prompt_dim
        if d % cfg.num_heads or d % 4:
            raise ValueError(f"heads.igvg: hidden width {d} must be a multiple of num_heads {cfg.num_heads} and of 4")
        if cfg.num_queries > embedding_size * embedding_size:
            raise ValueError(f"heads.igvg.num_queries {cfg.num_queries} exceeds the {embedding_size}² SAM grid cells")
        self.cfg = cfg
        self.dim, self.num_queries = d, cfg.num_queries
        self.frame_size, self.embedding_size = frame_size, embedding_size
        self.score_threshold = cfg.score_threshold
        ffn = cfg.ffn_dim or 4 * d
        heads = cfg.num_heads

        self.image_proj = nn.Conv2d(prompt_dim, d, 1)
        self.seg_proj = nn.Linear(prompt_dim, d)
        self.text_proj = nn.Linear(llm_dim, d)
        # 1. text-image fusion (see module docstring)
        self.fuse_attn = nn.MultiheadAttention(d, heads, dropout=cfg.dropout, batch_first=True)
        self.fuse_norm1, self.fuse_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fuse_gate = nn.Linear(d, d)
        self.fuse_ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d))
        # 2. AQG
        self.t2i = TextToImageAttention(d, heads, ffn, cfg.dropout)
        if cfg.query_init == "points":
            self.query_mlp = MLP(2 * d if cfg.inject_text_query else d, d, d, 3)
        else:
            self.query_embed = nn.Embedding(cfg.num_queries, d)
            self.reference_head = nn.Linear(d, 2)
        self.query_pos = nn.Linear(2, d)
        # 3. pyramid + decoder
        # levels above ×1 are computed once per image from the SAM embeddings, the others per row from
        # the text-fused map (the fine maps dominate the cost; this keeps it per image, not per expression)
        self.fine_scales = tuple(sorted((float(s) for s in cfg.fpn_scales if s > 1), reverse=True))
        self.coarse_scales = tuple(sorted((float(s) for s in cfg.fpn_scales if s <= 1), reverse=True))
        self.fpn_image = SimFPN(d, self.fine_scales) if self.fine_scales else None
        self.fpn_row = SimFPN(d, self.coarse_scales)
        self.level_embed = nn.Parameter(torch.zeros(len(cfg.fpn_scales), d))
        nn.init.normal_(self.level_embed, std=0.02)
        self.decoder = nn.ModuleList(
            QueryDecoderLayer(d, heads, ffn, cfg.dropout, attention=cfg.attention, num_levels=len(cfg.fpn_scales),
                              num_points=cfg.num_points, text_attention=cfg.decoder_text_attention)
            for _ in range(cfg.decoder_layers)
        )
        # object / no object, shared by the layers (as the authors' code)
        if cfg.class_head == "linear":
            self.class_head = nn.Linear(d, 2)
        else:  # "text": <W_q q, W_t z_seg>/√d + b against a fixed no-object logit 0
            self.class_query = nn.Linear(d, d)
            self.class_text = nn.Linear(d, d)
            self.class_bias = nn.Parameter(torch.zeros(()))
        self.box_head = MLP(d, d, 4, 3)
        nn.init.constant_(self.box_head.layers[-1].bias.data[2:], -2.0)
        # 4. global branch
        self.mask_decoder = UNetMaskDecoder(d, tuple(cfg.fpn_scales))
        cm = self.mask_decoder.out_channels
        self.mask_embed = MLP(d, d, cm, 3)
        self.global_head = nn.Conv2d(cm, 1, 1)
        self.exists_head = MLP(cm, cm, 1, 3)

    # ------------------------------------------------------------------------------------------------
    def forward(self, inputs: HeadInputs) -> dict[str, torch.Tensor]:
        n = inputs.num_queries
        h, w = inputs.image_embeddings.shape[-2:]
        if n == 0:
            return self._empty(inputs, h, w)
        d, nq = self.dim, self.num_queries
        bidx = inputs.seg_batch_index.long()
        valid_hw = inputs.valid_hw[bidx]
        image = self.image_proj(inputs.image_embeddings)  # (B,d,h,w), once per image
        dtype, device = image.dtype, image.device
        pos = sine_position_embedding(h, w, d, device=device, dtype=dtype)  # (hw,d)
        valid = grid_valid_mask(valid_hw, self.frame_size, h, w)  # (n,h,w)

        tokens, token_pad = self._text_tokens(inputs, dtype)
        seg_token = tokens[:, 0]
        # 1. fusion: pixels attend to the expression, then z_seg modulates them
        x = gather_rows(image, bidx).flatten(2).transpose(1, 2)  # (n,hw,d)
        att = self.fuse_attn(x + pos, tokens, tokens, key_padding_mask=token_pad, need_weights=False)[0]
        x = self.fuse_norm1(x + att)
        x = x * (1 + torch.tanh(self.fuse_gate(seg_token)))[:, None, :]
        x = self.fuse_norm2(x + self.fuse_ffn(x))
        fused = x.transpose(1, 2).reshape(n, d, h, w)

        # 2. AQG: STS → text→image attention → map → points → initial queries
        selected, selected_valid = score_text_selector(tokens, token_pad, nq, by_score=self.cfg.score_text_selector)
        text_q, logits = self.t2i(selected, x, pos, ~valid.flatten(1))
        weights = selected_valid.to(dtype)[:, None, :, None]  # (n,1,K,1)
        attn_map = ((logits * weights).sum(2) / weights.sum(2)).mean(1).reshape(n, h, w)  # heads, tokens averaged
        if self.cfg.point_selector == "dps":
            cells = dist_score_point_selector(attn_map, nq, self.cfg.dist_weight, valid)
        else:
            cells = topk_point_selector(attn_map, nq, valid)
        point_feat = x.gather(1, cells[..., None].expand(n, nq, d))
        if self.cfg.query_init == "points":
            points = cell_centers(cells, h, w).to(dtype)
            query_in = torch.cat([text_q, point_feat], -1) if self.cfg.inject_text_query else point_feat
            tgt = self.query_mlp(query_in)
        else:
            tgt = self.query_embed.weight[None].expand(n, nq, d)
            points = self.reference_head(self.query_embed.weight).sigmoid()[None].expand(n, nq, 2)
        query_pos = self.query_pos(points)

        # 3. pyramid + decoder
        image_levels = self.fpn_image(image) if self.fpn_image is not None else []
        row_levels = self.fpn_row(fused)
        levels = {**dict(zip(self.fine_scales, image_levels)), **dict(zip(self.coarse_scales, row_levels))}
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in [*image_levels, *row_levels]]
        memory = Memory(
            torch.cat([f.flatten(2).transpose(1, 2) for f in image_levels], 1) if image_levels else None,
            torch.cat([f.flatten(2).transpose(1, 2) for f in row_levels], 1),
            bidx, shapes[: len(image_levels)], shapes[len(image_levels):],
        )
        memory_pos = memory_pad = None
        if self.cfg.attention == "plain":
            memory_pos = torch.cat([sine_position_embedding(sh, sw, d, device=device, dtype=dtype) + self.level_embed[i]
                                    for i, (sh, sw) in enumerate(shapes)])[None]
            memory_pad = torch.cat([~grid_valid_mask(valid_hw, self.frame_size, sh, sw).flatten(1) for sh, sw in shapes], 1)
        ref = inverse_sigmoid(points)
        layer_logits, layer_boxes = [], []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, points, memory, memory_pos, memory_pad, tokens, token_pad)
            layer_logits.append(self._class_logits(tgt, seg_token))
            delta = self.box_head(tgt)
            layer_boxes.append(torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid())
        logits_layers = torch.stack(layer_logits, 1)  # (n,L,Q,2)
        boxes_layers = torch.stack(layer_boxes, 1)  # (n,L,Q,4) cx,cy,w,h

        # 4. global branch, instance masks, exists
        s_global = self.mask_decoder(levels, bidx)  # (n,cm,Hl,Wl)
        hl, wl = s_global.shape[-2:]
        pred_masks = torch.einsum("nqc,nchw->nqhw", self.mask_embed(tgt), s_global)
        global_masks = self.global_head(s_global)[:, 0]
        mask_valid = grid_valid_mask(valid_hw, self.frame_size, hl, wl).flatten(1).to(dtype)
        pixel_exists = self.exists_head(s_global.flatten(2).transpose(1, 2))[..., 0]  # (n,HlWl)
        exists = (pixel_exists * mask_valid).sum(1) / mask_valid.sum(1).clamp(min=1)

        pred_logits = logits_layers[:, -1]
        scores = pred_logits.softmax(-1)[..., 0]
        if self.cfg.score_weighted:
            scores = scores * exists.sigmoid()[:, None]
        cx, cy, bw, bh = boxes_layers[:, -1].unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).clamp(0, 1)
        return {
            "pred_masks": pred_masks,
            "pred_boxes": boxes,
            "pred_scores": scores,
            "pred_exists": exists,
            "pred_global_masks": global_masks,
            "pred_points": points,
            "pred_text_attn": attn_map,
            "pred_logits": pred_logits,
            "pred_logits_layers": logits_layers,
            "pred_boxes_layers": boxes_layers,
        }

    def _class_logits(self, tgt: torch.Tensor, seg_token: torch.Tensor) -> torch.Tensor:
        """(n,Q,2) object / no-object logits of the queries ``tgt`` (n,Q,d); ``seg_token`` (n,d) is z_seg
        projected, read by ``class_head: text`` only."""
        if self.cfg.class_head == "linear":
            return self.class_head(tgt)
        sim = torch.einsum("nqd,nd->nq", self.class_query(tgt), self.class_text(seg_token)) / self.dim ** 0.5
        obj = sim + self.class_bias
        return torch.stack([obj, torch.zeros_like(obj)], -1)

    def _text_tokens(self, inputs: HeadInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[z_seg; expression states] projected to the head's width (n,1+T,d) and their padding mask."""
        seg = self.seg_proj(inputs.seg_embeddings.to(dtype))[:, None]
        pad0 = torch.zeros(seg.shape[0], 1, dtype=torch.bool, device=seg.device)
        if inputs.text_states is None:
            return seg, pad0
        text = self.text_proj(inputs.text_states.to(dtype))
        pad = inputs.text_padding_mask
        if pad is None:
            pad = torch.zeros(text.shape[:2], dtype=torch.bool, device=seg.device)
        return torch.cat([seg, text], 1), torch.cat([pad0, pad.to(seg.device).bool()], 1)

    def _empty(self, inputs: HeadInputs, h: int, w: int) -> dict[str, torch.Tensor]:
        """n = 0: every output with zero rows, attached to the graph of the (empty) [SEG] embeddings."""
        zero = inputs.seg_embeddings.reshape(-1)[:0].sum()
        scale = max(self.cfg.fpn_scales)
        hl, wl = int(h * scale), int(w * scale)
        q, layers = self.num_queries, self.cfg.decoder_layers

        def z(*shape: int) -> torch.Tensor:
            return inputs.seg_embeddings.new_zeros(shape) + zero

        return {
            "pred_masks": z(0, q, hl, wl), "pred_boxes": z(0, q, 4), "pred_scores": z(0, q), "pred_exists": z(0),
            "pred_global_masks": z(0, hl, wl), "pred_points": z(0, q, 2), "pred_text_attn": z(0, h, w),
            "pred_logits": z(0, q, 2), "pred_logits_layers": z(0, layers, q, 2), "pred_boxes_layers": z(0, layers, q, 4),
        }

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def detections(self, preds: dict[str, torch.Tensor], j: int, score_threshold: float) -> Detections:
        """Post-processing of query ``j``: no target when exists < 0.5; else the instances whose score
        reaches ``score_threshold`` (then box NMS at ``nms_iou`` when set), fused with the global mask
        (``output_masks``, see the config).

        ``merge``: every pixel of the global mask goes to the kept instance whose mask logit is highest
        there (its logit becomes ``max(instance, global)``), so the union of the returned masks is the
        union of the kept instances and the global mask (the authors' ``merge`` output) while each
        instance keeps its own box and score. With no instance kept but a non-empty global mask, the
        global mask is returned as one instance scored by the best query's score (below the threshold,
        so box-level evaluation keeps nothing, as in the authors' code); with ``global_fallback`` false,
        nothing (no target).
        """
        exists = float(torch.sigmoid(preds["pred_exists"][j].float()))
        masks, scores, boxes = preds["pred_masks"][j], preds["pred_scores"][j].float(), preds["pred_boxes"][j]
        glob = preds["pred_global_masks"][j]
        if exists < 0.5:
            return Detections(masks=masks[:0], scores=scores[:0], boxes=boxes[:0], exists=exists)
        mode = self.cfg.output_masks
        if mode == "global":
            if not bool((glob > 0).any()):
                return Detections(masks=masks[:0], scores=scores[:0], boxes=boxes[:0], exists=exists)
            return Detections(masks=glob[None], scores=scores.max().reshape(1), boxes=None, exists=exists)
        keep = scores >= score_threshold
        if self.cfg.nms_iou is not None and bool(keep.any()):
            idx = keep.nonzero()[:, 0]
            survivors = torchvision.ops.nms(boxes[idx].float(), scores[idx], self.cfg.nms_iou)
            keep = torch.zeros_like(keep)
            keep[idx[survivors]] = True
        inst, kept_scores, kept_boxes = masks[keep], scores[keep], boxes[keep]
        if mode == "instance":
            return Detections(masks=inst, scores=kept_scores, boxes=kept_boxes, exists=exists)
        if inst.shape[0] == 0:
            if not self.cfg.global_fallback or not bool((glob > 0).any()):
                return Detections(masks=inst, scores=kept_scores, boxes=kept_boxes, exists=exists)
            return Detections(masks=glob[None], scores=scores.max().reshape(1), boxes=None, exists=exists)
        owner = inst.argmax(0)  # (Hl,Wl): the kept instance responding most at each pixel
        own = torch.arange(inst.shape[0], device=inst.device)[:, None, None] == owner[None]
        fused = torch.where(own, torch.maximum(inst, glob[None].to(inst.dtype)), inst)
        return Detections(masks=fused, scores=kept_scores, boxes=kept_boxes, exists=exists)


@register_head("igvg", criterion=build_igvg_criterion, loss_weights=IGVGCriterion.LOSS_WEIGHTS)
def build_igvg_head(*, cfg: "FCLMConfig", sam: "SamBackend", llm_dim: int) -> IGVGHead:
    """The ``igvg`` head sized from ``cfg.heads.igvg`` and the SAM config (it does not use ``sam``'s modules)."""
    return IGVGHead(cfg=cfg.heads.igvg, prompt_dim=cfg.sam.prompt_embed_dim, llm_dim=llm_dim,
                    embedding_size=cfg.sam.embedding_size, frame_size=cfg.sam.img_size)
