"""The mask backend: a narrow interface over the ``segment-anything`` package's modules.

:class:`SamBackend` holds SAM's three parts (``image_encoder`` frozen, ``prompt_encoder``,
``mask_decoder``) under the attribute names of the official checkpoint, so that
``sam_vit_h_4b8939.pth`` (keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) loads
directly. The rest of FCLM sees only:

* :meth:`SamBackend.encode` — SAM-preprocessed images → image embeddings;
* :meth:`SamBackend.decode` — image embeddings + sparse prompt embeddings, paired one to one →
  one low-resolution mask (logits) and its predicted IoU per pair;
* :meth:`SamBackend.decode_prompts` — SAM's own prompts (clicks, a box) on one image → candidate
  masks, for region prompts given as boxes, points or scribbles at inference;
* :meth:`SamBackend.upsample_to_frame` / :meth:`SamBackend.postprocess_masks` — low-res logits →
  the S × S SAM frame / the original image.

A later backend (SAM 2/3 from transformers) only has to provide the same methods.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from fclm.config import SAM_VARIANTS, SamConfig, preset

__all__ = ["SamBackend", "SamCheckpointError", "build_sam", "load_sam_checkpoint", "SAM_BUILDERS"]

# Keys that some re-saved SAM checkpoints carry but that are not weights (non-persistent buffers of
# segment_anything's ``Sam``; the SAM-frame normalisation lives in the processor here).
_IGNORED_CHECKPOINT_KEYS = ("pixel_mean", "pixel_std")


class SamCheckpointError(ValueError):
    """A SAM checkpoint that cannot be used; the message names the file and the problem."""


def _as_hw(size: torch.Tensor | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    h, w = (int(v) for v in size)
    return h, w


class SamBackend(nn.Module):
    """SAM image encoder (frozen), prompt encoder and mask decoder behind one small interface.

    Arguments:
      image_encoder: ``segment_anything`` ``ImageEncoderViT`` (its parameters are frozen here and it
        stays in eval mode, whatever ``train()`` is called with).
      prompt_encoder: ``PromptEncoder``; only its no-mask dense embedding and ``get_dense_pe()`` are
        used, the sparse prompt comes from FCLM's projectors.
      mask_decoder: ``MaskDecoder``; :meth:`decode` runs its submodules with one image per prompt.
    """

    def __init__(self, *, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_encoder.requires_grad_(False)
        self.image_encoder.eval()

    @property
    def img_size(self) -> int:
        """Side S of the square SAM frame."""
        return int(self.image_encoder.img_size)

    @property
    def embed_dim(self) -> int:
        """Channels C of image embeddings and of prompt tokens."""
        return int(self.mask_decoder.transformer_dim)

    @property
    def embedding_size(self) -> tuple[int, int]:
        """(h, w) of the image-embedding grid."""
        return tuple(self.prompt_encoder.image_embedding_size)  # type: ignore[return-value]

    @property
    def low_res_size(self) -> tuple[int, int]:
        """(Hl, Wl) of decoded masks: 4 × the embedding grid."""
        h, w = self.embedding_size
        return 4 * h, 4 * w

    def _apply(self, fn: Callable, recurse: bool = True) -> "SamBackend":
        super()._apply(fn, recurse)
        # segment_anything's PositionEmbeddingRandom casts click/box coordinates to float32 before the
        # product with its Gaussian matrix; keep that buffer float32 when the model moves to bf16/fp16.
        pe = self.prompt_encoder.pe_layer
        if pe.positional_encoding_gaussian_matrix.dtype != torch.float32:
            pe.positional_encoding_gaussian_matrix = pe.positional_encoding_gaussian_matrix.float()
        return self

    def train(self, mode: bool = True) -> "SamBackend":
        super().train(mode)
        # The encoder is frozen: keep it in eval mode so that a model-wide .train() does not change it.
        self.image_encoder.eval()
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """SAM-preprocessed images → image embeddings; without autograd unless the encoder is being trained
        (some of its parameters require gradients, ``trainability.sam_image_encoder: full``).

        Arguments:
          images: (B,3,S,S) normalised with SAM's pixel mean/std and padded bottom/right to S × S.
        Returns:
          (B,C,h,w) image embeddings (h = w = S / patch).
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"SamBackend.encode expects images of shape (B,3,{self.img_size},{self.img_size}), got {tuple(images.shape)}")
        dtype = self.image_encoder.patch_embed.proj.weight.dtype
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in self.image_encoder.parameters())
        with torch.set_grad_enabled(trained):
            return self.image_encoder(images.to(dtype))

    def decode(self, image_embeddings: torch.Tensor, sparse_prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one mask per (image embedding, prompt) pair, paired one to one.

        ``MaskDecoder.predict_masks`` repeats every image embedding once per prompt, so calling it on
        a batch of N images with N prompts would decode N × N pairs. This runs the same submodules
        (transformer, output upscaling, hypernetwork MLPs, IoU head) on the N pairs only. The dense
        prompt is the prompt encoder's no-mask embedding and the positional encoding is
        ``get_dense_pe()``, as in SAM. Output is SAM's single-mask output (mask token 0,
        ``multimask_output=False``).

        Arguments:
          image_embeddings: (N,C,h,w); row i is the image that prompt i refers to (index the batch's
            embeddings with the prompts' batch index first).
          sparse_prompt_embeddings: (N,K,C) prompt tokens (K = 1 for a [SEG] or a <pos> token).
        Returns:
          low_res_mask_logits (N,Hl,Wl) with Hl = 4h, Wl = 4w; iou_pred (N,).
        """
        if image_embeddings.ndim != 4 or sparse_prompt_embeddings.ndim != 3:
            raise ValueError(
                "SamBackend.decode expects image_embeddings (N,C,h,w) and sparse_prompt_embeddings (N,K,C), got "
                f"{tuple(image_embeddings.shape)} and {tuple(sparse_prompt_embeddings.shape)}"
            )
        n, c, h, w = image_embeddings.shape
        if sparse_prompt_embeddings.shape[0] != n or sparse_prompt_embeddings.shape[2] != c:
            raise ValueError(
                f"SamBackend.decode pairs images and prompts one to one: got {n} image embeddings with {c} channels "
                f"and prompts of shape {tuple(sparse_prompt_embeddings.shape)}"
            )
        md = self.mask_decoder
        dtype = md.iou_token.weight.dtype
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(dtype)], dim=1)

        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dtype)
        src = image_embeddings.to(dtype) + dense
        pos_src = self.prompt_encoder.get_dense_pe().to(dtype).expand(n, -1, -1, -1)
        hs, src = md.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + md.num_mask_tokens, :]

        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        # All hypernetwork MLPs run, as in SAM, so every decoder parameter is in the graph
        # (distributed training without find_unused_parameters); only mask token 0 is returned.
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        _, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(n, c_up, h_up * w_up)).reshape(n, md.num_mask_tokens, h_up, w_up)
        iou_pred = md.iou_prediction_head(iou_token_out)
        return masks[:, 0], iou_pred[:, 0]

    def decode_prompts(
        self,
        image_embedding: torch.Tensor,
        *,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        box: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's own prompts (clicks and/or a box) on one image → candidate masks, as ``SamPredictor`` does.

        Runs SAM's prompt encoder and its mask decoder unchanged. As in SAM, one prompt is ambiguous
        enough to ask for three candidates (``multimask_output``) when it is points only; a box, or
        points with a box, gives one mask.

        Arguments:
          image_embedding: (1,C,h,w) the image's embedding (from :meth:`encode`).
          points: (K,2) click coordinates (x, y) in the SAM frame's pixels; point_labels: (K,) 1 = positive,
            0 = negative.
          box: (4,) x1, y1, x2, y2 in the SAM frame's pixels.
        Returns:
          low_res_mask_logits (M,Hl,Wl) and iou_pred (M,), M = 3 for points only, else 1.
        """
        if points is None and box is None:
            raise ValueError("SamBackend.decode_prompts needs points or a box")
        dtype = self.mask_decoder.iou_token.weight.dtype
        point_arg = None
        if points is not None:
            if point_labels is None or point_labels.shape != points.shape[:1]:
                raise ValueError("SamBackend.decode_prompts: give one label per point")
            point_arg = (points[None].to(dtype), point_labels[None].to(torch.int))
        box_arg = None if box is None else box.reshape(1, 4).to(dtype)
        sparse, dense = self.prompt_encoder(points=point_arg, boxes=box_arg, masks=None)
        multimask = box is None
        masks, iou = self.mask_decoder(
            image_embeddings=image_embedding.to(dtype),
            image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=multimask,
        )
        return masks[0], iou[0]

    def upsample_to_frame(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N,Hl,Wl) low-res logits → (N,S,S) logits in the SAM frame (bilinear, align_corners=False)."""
        return F.interpolate(low_res.unsqueeze(1), (self.img_size, self.img_size), mode="bilinear", align_corners=False).squeeze(1)

    def postprocess_masks(
        self,
        low_res: torch.Tensor,
        valid_hw: torch.Tensor | Sequence[int],
        original_hw: torch.Tensor | Sequence[int],
    ) -> torch.Tensor:
        """Low-res logits of masks of ONE image → logits at the original image size (SAM's convention).

        Upsample to S × S, keep the valid (unpadded) top-left ``valid_hw`` area, resize to
        ``original_hw``; all bilinear with ``align_corners=False``.

        Arguments:
          low_res: (N,Hl,Wl) logits, all for the same image.
          valid_hw: (h_valid, w_valid) of the resized image inside the SAM frame.
          original_hw: (H, W) of the original image.
        Returns:
          (N,H,W) logits (threshold at 0 for binary masks).
        """
        vh, vw = _as_hw(valid_hw)
        oh, ow = _as_hw(original_hw)
        if not (0 < vh <= self.img_size and 0 < vw <= self.img_size):
            raise ValueError(f"valid_hw {(vh, vw)} must lie inside the {self.img_size} × {self.img_size} SAM frame")
        if low_res.shape[0] == 0:
            return low_res.new_zeros(0, oh, ow, dtype=torch.float32)
        masks = self.upsample_to_frame(low_res.float())[:, :vh, :vw]
        return F.interpolate(masks.unsqueeze(1), (oh, ow), mode="bilinear", align_corners=False).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _guess_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The official variant whose encoder sizes match a checkpoint, or None."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor):
        return None
    depth = 1 + max(
        (int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.") and k.split(".")[2].isdigit()),
        default=-1,
    )
    for name, sizes in SAM_VARIANTS.items():
        if sizes["encoder_embed_dim"] == w.shape[0] and sizes["encoder_depth"] == depth:
            return name
    return None


def _describe_encoder(state_dict: Mapping[str, torch.Tensor]) -> str:
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(w, torch.Tensor):
        return "an unknown encoder"
    depth = 1 + max(
        (int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.") and k.split(".")[2].isdigit()),
        default=-1,
    )
    return f"an encoder of width {w.shape[0]}, depth {depth}, patch {w.shape[-1]}"


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"SAM checkpoint {path}: file not found (set sam.checkpoint to a local copy of the official "
            "sam_vit_h_4b8939.pth / sam_vit_l_0b3195.pth / sam_vit_b_01ec64.pth; nothing is downloaded)"
        )
    if os.path.isdir(path):
        raise SamCheckpointError(f"SAM checkpoint {path}: is a directory, expected a .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for corrupt or unsafe files
        raise SamCheckpointError(
            f"SAM checkpoint {path}: could not be read with torch.load(weights_only=True): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(obj, Mapping) or not obj:
        raise SamCheckpointError(
            f"SAM checkpoint {path}: not a state dict (got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}); "
            "expected a mapping of parameter names (image_encoder.*, prompt_encoder.*, mask_decoder.*) to tensors"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SamCheckpointError(
            f"SAM checkpoint {path}: not a state dict: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor"
        )
    return dict(obj)


def load_sam_checkpoint(sam: SamBackend, path: str | os.PathLike) -> None:
    """Load an official SAM ``.pth`` (``torch.load(..., weights_only=True)``) into ``sam``, strictly.

    Raises ``FileNotFoundError`` for a missing file and :class:`SamCheckpointError` (a ``ValueError``)
    for an unreadable file, an object that is not a state dict, a shape mismatch (naming the first
    mismatching key, both shapes and the variant whose sizes the checkpoint has), and missing or
    unexpected keys. The image encoder stays frozen.
    """
    path = os.fspath(path)
    state_dict = _read_state_dict(path)
    for k in _IGNORED_CHECKPOINT_KEYS:
        state_dict.pop(k, None)
    own = sam.state_dict()
    for key, value in state_dict.items():
        if key in own and own[key].shape != value.shape:
            guess = _guess_variant(state_dict)
            hint = (
                f"the checkpoint has {_describe_encoder(state_dict)}"
                + (f", which matches sam.variant={guess!r}" if guess else "")
                + f"; the config builds {_describe_encoder(own)}, img_size {sam.img_size}, prompt dim {sam.embed_dim}"
            )
            raise SamCheckpointError(
                f"SAM checkpoint {path}: shape mismatch at {key}: checkpoint {tuple(value.shape)} vs model "
                f"{tuple(own[key].shape)} ({hint})"
            )
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        raise SamCheckpointError(
            f"SAM checkpoint {path}: {'; '.join(parts)} (expected the official layout image_encoder.*, "
            "prompt_encoder.*, mask_decoder.*)"
        )
    sam.load_state_dict(state_dict, strict=True)
    sam.image_encoder.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def build_sam(cfg: SamConfig) -> SamBackend:
    """Build a :class:`SamBackend` with the sizes of ``cfg``; load ``cfg.checkpoint`` when set.

    Mirrors ``segment_anything.build_sam._build_sam`` (mlp ratio 4, LayerNorm eps 1e-6, qkv bias,
    mask_in_chans 16, IoU head depth 3) with every size taken from the config.
    """
    emb = cfg.embedding_size
    previous = torch.get_default_dtype()
    # Built directly in its dtype (``sam.encoder_dtype``): no float32 copy of a 2.5 GB ViT-H on the way.
    torch.set_default_dtype(getattr(torch, cfg.encoder_dtype))
    try:
        image_encoder = ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=cfg.use_rel_pos,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
            window_size=cfg.encoder_window_size,
            out_chans=cfg.prompt_embed_dim,
        )
    finally:
        torch.set_default_dtype(previous)
    prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(emb, emb),
        input_image_size=(cfg.img_size, cfg.img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=cfg.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_embed_dim,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_num_heads,
        ),
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )
    sam = SamBackend(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
    if cfg.checkpoint is not None:
        load_sam_checkpoint(sam, cfg.checkpoint)
    return sam


def _variant_builder(variant: str) -> Callable[..., SamBackend]:
    def builder(checkpoint: str | None = None) -> SamBackend:
        return build_sam(SamConfig(variant=variant, img_size=1024, patch_size=16, checkpoint=checkpoint))  # type: ignore[arg-type]

    builder.__name__ = f"build_sam_{variant}"
    builder.__doc__ = f"Official SAM {variant} sizes (1024 px frame, patch 16, prompt dim 256)."
    return builder


def build_sam_tiny(checkpoint: str | None = None) -> SamBackend:
    """The tiny preset's SAM (112 px frame, patch 8, width 64 × 2 blocks): tests and demos."""
    cfg = preset("tiny").sam
    cfg.checkpoint = checkpoint
    return build_sam(cfg)


SAM_BUILDERS: dict[str, Callable[..., SamBackend]] = {
    "vit_h": _variant_builder("vit_h"),
    "vit_l": _variant_builder("vit_l"),
    "vit_b": _variant_builder("vit_b"),
    "tiny": build_sam_tiny,
}
"""Named builders ``(checkpoint=None) -> SamBackend``, like segment_anything's ``sam_model_registry``."""
