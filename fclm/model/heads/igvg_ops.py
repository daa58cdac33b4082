"""Building blocks of the ``igvg`` head (seed 001, IGVG): point selectors,
Score Text Selector, SimFPN, the UNet-style global mask decoder and the (deformable or plain) query decoder.

Everything here is shape-generic and parameter-free where it can be (the selectors are plain functions),
so the tests can check each part against a reference. The head that wires them is
:mod:`fclm.model.heads.igvg`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "dist_score_point_selector", "topk_point_selector", "score_text_selector", "cell_centers", "sine_position_embedding",
    "grid_valid_mask", "gather_rows", "LayerNorm2d", "MLP", "SimFPN", "UNetMaskDecoder", "Memory", "MSDeformAttn", "QueryDecoderLayer",
    "TextToImageAttention", "inverse_sigmoid",
]

_INVALID = -1.0e6
"""Score given to cells outside the image (padding of the SAM frame): chosen only once every image cell is taken."""


def dist_score_point_selector(
    attn_logits: torch.Tensor, num_points: int, dist_weight: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Dist-Score Point Selector, seed 001 Algorithm 1, batched: greedy ``argmax(σ(M) + W_dist · D)``.

    ``D`` is each candidate cell's distance (in cells, row/column index space) to the nearest point
    already selected, divided by the grid diagonal ``sqrt(h² + w²)`` (as the authors' public code does,
    so ``dist_weight`` does not depend on the grid size). The first point is ``argmax σ(M)``; a
    selected cell is never selected again. Ties go to the first cell in row-major order.

    Arguments:
      attn_logits: (n,h,w) attention-map logits M.
      num_points: N_q ≤ h·w.
      dist_weight: W_dist.
      valid: (n,h,w) bool, cells inside the image; others are taken only when no valid cell is left.
    Returns:
      (n,N_q) long flat indices ``i·w + j`` in selection order.
    """
    n, h, w = attn_logits.shape
    if num_points > h * w:
        raise ValueError(f"cannot select {num_points} points on a {h}×{w} grid")
    score = attn_logits.detach().float().sigmoid().flatten(1)
    if valid is not None:
        score = torch.where(valid.flatten(1), score, score + _INVALID)
    ii, jj = torch.meshgrid(torch.arange(h, device=score.device), torch.arange(w, device=score.device), indexing="ij")
    cells = torch.stack([ii.flatten(), jj.flatten()], -1).float()  # (hw,2)
    diag = math.sqrt(h * h + w * w)
    out = score.new_zeros((n, num_points), dtype=torch.long)
    taken = torch.zeros_like(score, dtype=torch.bool)
    min_dist = torch.full_like(score, float("inf"))
    rows = torch.arange(n, device=score.device)
    for k in range(num_points):
        combined = score if k == 0 else score + dist_weight * min_dist / diag
        best = combined.masked_fill(taken, float("-inf")).argmax(1)
        out[:, k] = best
        taken[rows, best] = True
        min_dist = torch.minimum(min_dist, torch.cdist(cells, cells[best]).T)  # (n,hw)
    return out


def topk_point_selector(attn_logits: torch.Tensor, num_points: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ablation baseline of DPS: the N_q cells of highest σ(M) (seed 001 Tab. 6). (n,h,w) → (n,N_q) flat indices."""
    score = attn_logits.detach().float().sigmoid().flatten(1)
    if valid is not None:
        score = torch.where(valid.flatten(1), score, score + _INVALID)
    return score.topk(num_points, dim=1).indices


def cell_centers(indices: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flat grid indices (…,) → normalised frame xy of the cell centres (…,2)."""
    return torch.stack([((indices % w).float() + 0.5) / w, (torch.div(indices, w, rounding_mode="floor").float() + 0.5) / h], -1)


def score_text_selector(
    tokens: torch.Tensor, padding: torch.Tensor, k: int, *, by_score: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score Text Selector: k of the non-padding tokens, the one at position 0 (the ``[SEG]`` token) first.

    ``by_score``: the rest by descending L2 norm (seed 001 §3.1.1); off (ablation): in sequence order.
    With fewer than k valid tokens the valid ones are repeated cyclically to fill the k slots; the
    returned ``valid`` marks the first occurrence of each, so pooling over slots counts a token once.

    Arguments:
      tokens: (n,T,D); padding: (n,T) bool, True = padding (position 0 must be valid).
    Returns:
      selected (n,k,D) and valid (n,k) bool.
    """
    n, t, d = tokens.shape
    pos = torch.arange(t, device=tokens.device)
    if by_score:
        score = tokens.detach().float().norm(dim=-1)
    else:
        score = -pos.float().expand(n, t)
    score = score.masked_fill(pos == 0, float("inf")).masked_fill(padding, float("-inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    num_valid = (~padding).sum(1, keepdim=True).clamp(min=1)  # (n,1)
    slots = torch.arange(k, device=tokens.device).expand(n, k)
    idx = order.gather(1, slots % num_valid)
    selected = tokens.gather(1, idx[..., None].expand(n, k, d))
    return selected, slots < num_valid


def sine_position_embedding(h: int, w: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding of an h×w grid covering the frame → (h·w, dim), y half then x half."""
    half = dim // 2
    scale = 2 * math.pi
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * scale
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * scale
    t = 10000 ** (2 * (torch.arange(half, device=device) // 2).float() / half)
    py, px = y[:, None] / t, x[:, None] / t  # (h,half), (w,half)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], -1).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], -1).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], -1)
    if pos.shape[-1] < dim:
        pos = F.pad(pos, (0, dim - pos.shape[-1]))
    return pos.reshape(h * w, dim).to(dtype)


def grid_valid_mask(valid_hw: torch.Tensor, frame_size: int, h: int, w: int) -> torch.Tensor:
    """(n,2) image size inside the S × S frame → (n,h,w) bool, grid cells that overlap the image."""
    rows = torch.ceil(valid_hw[:, 0].float() * h / frame_size).long()
    cols = torch.ceil(valid_hw[:, 1].float() * w / frame_size).long()
    ii = torch.arange(h, device=valid_hw.device)[None, :, None]
    jj = torch.arange(w, device=valid_hw.device)[None, None, :]
    return (ii < rows[:, None, None]) & (jj < cols[:, None, None])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 as a one-hot matrix product: same values, but the backward is a small
    matmul instead of CPU ``index_add`` / ``index_put`` scatters (which dominated the head's backward)."""
    onehot = F.one_hot(index.long(), x.shape[0]).to(x.dtype)
    return (onehot @ x.reshape(x.shape[0], -1)).reshape(index.shape[0], *x.shape[1:])


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an (N,C,H,W) map (ViTDet's ``LN2d``; independent of the batch size)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (DETR's box MLP)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SimFPN(nn.Module):
    """ViTDet's simple feature pyramid from one stride-16 map: ×4 (two 2×2 deconvs), ×2 (one), ×1, ×½ (max-pool).

    Each level then goes through a 1×1 lateral conv to ``dim`` channels and a LayerNorm2d. ViTDet also
    applies a 3×3 conv per level; it is left out here because every consumer (the UNet decoder's 3×3
    convs, the decoder's value projection) transforms the levels again.

    Arguments:
      dim: channels in and out; scales: subset of (4, 2, 1, 0.5), output order as given.
    """

    def __init__(self, dim: int, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        branches, laterals = [], []
        for s in self.scales:
            if s == 4.0:
                branch = nn.Sequential(
                    nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)
                )
                c = dim // 4
            elif s == 2.0:
                branch, c = nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
            elif s == 1.0:
                branch, c = nn.Identity(), dim
            elif s == 0.5:
                branch, c = nn.MaxPool2d(2, 2, ceil_mode=True), dim
            else:
                raise ValueError(f"SimFPN scale {s} is not one of 4, 2, 1, 0.5")
            branches.append(branch)
            laterals.append(nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), LayerNorm2d(dim)))
        self.branches = nn.ModuleList(branches)
        self.laterals = nn.ModuleList(laterals)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [lat(branch(x)) for branch, lat in zip(self.branches, self.laterals)]


class UNetMaskDecoder(nn.Module):
    """The global mask decoder: fuse the SimFPN levels coarse → fine into S_global (UNet-style).

    Each step upsamples the running map, adds a 1×1 lateral of the level, and applies a 3×3 conv
    (LayerNorm2d, ReLU). Departs from the authors' ``UnetDecoder`` (concat + two 3×3 convs with
    BatchNorm at 256 channels on every level) for cost and batch-size independence: rows here are
    single expressions, and the width narrows at finer levels (``dim / scale`` above ×1), so the ×4
    map stays cheap. Its output S_global has :attr:`out_channels` channels.

    Levels come in two groups: per-row maps (n,…) and per-image maps (B,…) with an index mapping rows
    to images (the fine levels, computed once per image, see :class:`fclm.model.heads.igvg.IGVGHead`).

    Arguments:
      dim: channels of the levels; scales: every level's scale (any order).
    """

    def __init__(self, dim: int, scales: tuple[float, ...]) -> None:
        super().__init__()
        self.scales = tuple(sorted(float(s) for s in scales))  # coarse → fine
        widths = [max(8, int(dim / max(1.0, s))) for s in self.scales]
        self.stem = nn.Sequential(nn.Conv2d(dim, widths[0], 3, padding=1, bias=False), LayerNorm2d(widths[0]), nn.ReLU())
        self.up_proj = nn.ModuleList(nn.Conv2d(a, b, 1, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.lateral = nn.ModuleList(nn.Conv2d(dim, w, 1) for w in widths[1:])
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), LayerNorm2d(w), nn.ReLU()) for w in widths[1:]
        )
        self.out_channels = widths[-1]

    def forward(self, levels: dict[float, torch.Tensor], image_index: torch.Tensor | None = None) -> torch.Tensor:
        """levels: scale → map; maps of scale > 1 are per image (B,dim,H,W) and gathered with
        ``image_index`` (n,), the others per row (n,dim,H,W). Returns S_global (n,out_channels,H,W) at the finest scale."""
        x = self.stem(levels[self.scales[0]])
        for up, lat, block, s in zip(self.up_proj, self.lateral, self.blocks, self.scales[1:]):
            feat = lat(levels[s])
            if s > 1.0 and image_index is not None:
                feat = gather_rows(feat, image_index)
            x = F.interpolate(up(x), size=feat.shape[-2:], mode="bilinear", align_corners=False)
            x = block(F.relu(x + feat))
        return x


class TextToImageAttention(nn.Module):
    """Text queries attend to the image (seed 001 Eq. 1); also returns the pre-softmax attention logits.

    Arguments:
      dim, num_heads, ffn_dim, dropout: sizes.
    Forward:
      text (n,K,D), image (n,HW,D), image_pos (HW,D), image_padding (n,HW) bool or None →
      updated text (n,K,D) and logits (n,heads,K,HW) (``q·k/√d``; padding cells not masked there).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor,
                image_padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, k, d = text.shape
        hd = d // self.num_heads
        q = self.q(text).reshape(n, k, self.num_heads, hd).transpose(1, 2)
        key = self.k(image + image_pos).reshape(n, -1, self.num_heads, hd).transpose(1, 2)
        v = self.v(image).reshape(n, -1, self.num_heads, hd).transpose(1, 2)
        logits = q @ key.transpose(-1, -2) / math.sqrt(hd)  # (n,heads,K,HW)
        masked = logits if image_padding is None else logits.masked_fill(image_padding[:, None, None, :], float("-inf"))
        attn = self.dropout(masked.softmax(-1))
        out = (attn @ v).transpose(1, 2).reshape(n, k, d)
        text = self.norm1(text + self.dropout(self.out(out)))
        text = self.norm2(text + self.dropout(self.ffn(text)))
        return text, logits


class Memory:
    """The decoder's multi-scale memory: levels computed once per image (B,N_img,D) and levels computed
    per row (n,N_row,D), with ``image_index`` (n,) mapping rows to images. Per-token maps (a value
    projection) run on the image part once per image, so their cost scales with the images, not with
    the expressions.

    Attributes:
      image: (B,N_img,D) or None; row: (n,N_row,D); image_index: (n,) long;
      image_shapes / row_shapes: [(H_l,W_l)] of each part's levels, in flattening order.
    """

    def __init__(self, image: torch.Tensor | None, row: torch.Tensor, image_index: torch.Tensor,
                 image_shapes: list[tuple[int, int]], row_shapes: list[tuple[int, int]]) -> None:
        self.image, self.row, self.image_index = image, row, image_index
        self.image_shapes, self.row_shapes = list(image_shapes), list(row_shapes)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """All levels: the image part's, then the row part's."""
        return self.image_shapes + self.row_shapes

    def rows(self, fn: "nn.Module | None" = None) -> torch.Tensor:
        """(n,ΣHW,D): ``fn`` applied per part, image part gathered per row, then [image; row]."""
        parts = []
        if self.image is not None:
            parts.append(gather_rows(self.image if fn is None else fn(self.image), self.image_index))
        parts.append(self.row if fn is None else fn(self.row))
        return torch.cat(parts, 1)


def _sample(value: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Bilinear samples per head: value (N,heads,dh,H,W), loc (N,Qt,heads,P,2) in [0,1] → (N,heads,dh,Qt,P).

    Zero padding outside the map and ``align_corners=False``, as Deformable DETR's sampling.
    """
    n, h, dh, hh, ww = value.shape
    qt, p = loc.shape[1], loc.shape[3]
    grid = (2 * loc - 1).permute(0, 2, 1, 3, 4).reshape(n * h, qt, p, 2)
    out = F.grid_sample(value.reshape(n * h, dh, hh, ww), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(n, h, dh, qt, p)


def _levels(value: torch.Tensor, shapes: list[tuple[int, int]], heads: int) -> list[torch.Tensor]:
    """(N,ΣHW,D) → per level (N,heads,D/heads,H,W)."""
    n, _, d = value.shape
    out = []
    for chunk, (hh, ww) in zip(value.split([a * b for a, b in shapes], 1), shapes):
        out.append(chunk.view(n, hh, ww, heads, d // heads).permute(0, 3, 4, 1, 2))
    return out


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): per head, level and point an offset from the
    query's reference point and a softmax weight, bilinear sampling, weighted sum. Initialised as
    Deformable DETR.

    The sampling is written here rather than calling transformers' pure-PyTorch
    ``MultiScaleDeformableAttention`` (which the tests use as the reference) because that one needs a
    value map per row: here the per-image levels are sampled on the image's own map by all the rows
    (expressions) of that image at once, instead of being copied once per expression.

    Forward: query (n,Q,D), reference points (n,Q,2) normalised xy, :class:`Memory` → (n,Q,D).
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2).repeat(1, num_levels, num_points, 1)
        for i in range(num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def sampling(self, query: torch.Tensor, reference_points: torch.Tensor, shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling locations (n,Q,heads,L,P,2) in [0,1]-ish frame xy and weights (n,Q,heads,L,P)."""
        n, q, _ = query.shape
        h, lv, p = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != lv:
            raise ValueError(f"MSDeformAttn built for {lv} levels got {len(shapes)}")
        offsets = self.sampling_offsets(query).view(n, q, h, lv, p, 2)
        weights = self.attention_weights(query).view(n, q, h, lv * p).softmax(-1).view(n, q, h, lv, p)
        normalizer = torch.tensor([[w, hh] for hh, w in shapes], dtype=query.dtype, device=query.device)  # (L,2) as (w,h)
        loc = reference_points[:, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return loc, weights

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, memory: Memory) -> torch.Tensor:
        n, q, d = query.shape
        h = self.num_heads
        loc, weights = self.sampling(query, reference_points, memory.shapes)
        samples = []  # per level (n,heads,dh,Q,P)
        if memory.image is not None:
            bidx = memory.image_index.long()
            counts = torch.bincount(bidx, minlength=memory.image.shape[0])
            order = torch.argsort(bidx, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.empty_like(bidx)
            slot[order] = torch.arange(n, device=bidx.device) - starts[bidx[order]]  # rank of each row in its image
            m = int(counts.max())
            for lvl, value in enumerate(_levels(self.value_proj(memory.image), memory.image_shapes, h)):
                grid = loc.new_zeros(value.shape[0], m, q, h, self.num_points, 2)
                grid = grid.index_put((bidx, slot), loc[:, :, :, lvl])
                s = _sample(value, grid.view(value.shape[0], m * q, h, self.num_points, 2))
                s = s.view(value.shape[0], h, d // h, m, q, self.num_points).permute(0, 3, 1, 2, 4, 5)
                samples.append(s[bidx, slot])
        first_row = len(memory.image_shapes)
        for i, value in enumerate(_levels(self.value_proj(memory.row), memory.row_shapes, h)):
            samples.append(_sample(value, loc[:, :, :, first_row + i]))
        stacked = torch.stack(samples, 3)  # (n,heads,dh,L,Q,P)
        out = torch.einsum("nhdlqp,nqhlp->nqhd", stacked, weights).reshape(n, q, d)
        return self.output_proj(out)


class QueryDecoderLayer(nn.Module):
    """One decoder layer: query self-attention, [cross-attention to the expression tokens,] cross-attention
    to the multi-scale maps, FFN (post-norm). The text cross-attention (``text_attention=True``) sits where
    Grounding DINO's decoder has it, between the self-attention and the image cross-attention.

    ``attention="deformable"``: :class:`MSDeformAttn` around each query's reference point;
    ``"plain"`` (ablation, seed 001 Tab. 7 "DETR"): multi-head attention over all multi-scale tokens
    (keys carry sine position + level embeddings, padding cells masked).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, *, attention: str,
                 num_levels: int, num_points: int, text_attention: bool = False) -> None:
        super().__init__()
        self.attention = attention
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.text_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True) if text_attention else None
        self.text_norm = nn.LayerNorm(dim) if text_attention else None
        if attention == "deformable":
            self.cross_attn: nn.Module = MSDeformAttn(dim, num_heads, num_levels, num_points)
        elif attention == "plain":
            self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        else:
            raise ValueError(f"attention {attention!r} is not one of deformable, plain")
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor, memory: Memory,
                memory_pos: torch.Tensor | None = None, memory_padding: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_padding: torch.Tensor | None = None) -> torch.Tensor:
        """tgt, query_pos (n,Q,D); reference_points (n,Q,2); memory_pos (1,ΣHW,D) and memory_padding
        (n,ΣHW) bool are used by plain attention only; text (n,T,D) and text_padding (n,T) bool by the
        text cross-attention only (required when the layer has one)."""
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        if self.text_attn is not None:
            if text is None:
                raise ValueError("this decoder layer attends to the expression: pass text (n,T,D)")
            att = self.text_attn(tgt + query_pos, text, text, key_padding_mask=text_padding, need_weights=False)[0]
            tgt = self.text_norm(tgt + self.dropout(att))
        q = tgt + query_pos
        if self.attention == "deformable":
            cross = self.cross_attn(q, reference_points, memory)
        else:
            value = memory.rows()
            key = value if memory_pos is None else value + memory_pos
            cross = self.cross_attn(q, key, value, key_padding_mask=memory_padding, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(cross))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))
