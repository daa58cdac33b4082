"""A grounding head trained alone: given features in, the head's predictions out (no LLM, no vision tower).

``HeadSpecialist`` is what ``model.kind: head_specialist`` builds. It reads the same batches as
:class:`~fclm.model.fclm.FCLM` (from :class:`~fclm.processor.FCLMProcessor`) and returns the same
``seg_*`` / ``heads`` outputs, so the trainer, the criterion, the SAM embedding cache and the
teacher-forced evaluation (:mod:`fclm.inference.grounding`) treat both alike. In place of the LLM a
small causal Transformer (:class:`TextEncoder`) reads the conversation; its state at each ``[SEG]``
is the query and the user-text states before it are the expression (as FCLM gathers them). The
image side is the SAM image encoder's embeddings (frozen and cached in the demo configs). This is
how the specialist papers (C3VG, IGVG) train their heads: on an encoder's image and text features,
without a language model; inside FCLM the same heads are fed by ``h[SEG]`` instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fclm.config import FCLMConfig, ImageStemConfig, TextEncoderConfig, from_dict, to_dict
from fclm.io import write_json
from fclm.model.fclm import CONFIG_NAME, MODULES_NAME, gather_expression_states, route_to_heads
from fclm.model.heads import build_head
from fclm.model.projectors import MLPProjector
from fclm.model.sam import SamBackend, build_sam

__all__ = ["TextEncoder", "ImageStem", "HeadSpecialist", "build_head_specialist"]

logger = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    """Token + learned position embeddings → a causal ``nn.TransformerEncoder`` (pre-norm) → final norm.

    Padding and image-placeholder tokens are keys nobody attends to (they carry no text).
    """

    def __init__(self, vocab_size: int, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_length, cfg.hidden_size)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_size, cfg.num_heads, dim_feedforward=4 * cfg.hidden_size, dropout=0.0,
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """(B,L) ids and (B,L) bool "may be attended" → (B,L,D) states."""
        b, length = input_ids.shape
        if length > self.cfg.max_length:
            raise ValueError(f"{length} tokens exceed text_encoder.max_length {self.cfg.max_length}")
        x = self.embed(input_ids) + self.position(torch.arange(length, device=input_ids.device))[None]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)
        blocked = causal[None] | ~key_mask[:, None, :]
        # a query that may attend to nothing (a leading pad) would give NaN: let it see itself
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=input_ids.device)[None]
        mask = blocked.repeat_interleave(self.cfg.num_heads, dim=0)
        return self.norm(self.encoder(x, mask=mask))


class ImageStem(nn.Module):
    """SAM-normalised image (B,3,S,S) → features (B,C_out,S/stride,S/stride) on the SAM embedding grid.

    ``log2(stride)`` blocks of 3×3 stride-2 convolution + GroupNorm + GELU, ``cfg.extra_layers`` 3×3
    stride-1 blocks, then a 1×1 projection initialised to zero (the sum with the SAM embeddings starts
    as the embeddings alone).
    """

    def __init__(self, cfg: ImageStemConfig, *, stride: int, out_dim: int) -> None:
        super().__init__()
        if stride < 2 or stride & (stride - 1):
            raise ValueError(f"image_stem needs sam.patch_size to be a power of two >= 2, got {stride}")
        c = cfg.channels
        groups = next(g for g in (8, 4, 2, 1) if c % g == 0)
        layers: list[nn.Module] = []
        in_ch = 3
        for _ in range(stride.bit_length() - 1):
            layers += [nn.Conv2d(in_ch, c, 3, stride=2, padding=1), nn.GroupNorm(groups, c), nn.GELU()]
            in_ch = c
        for _ in range(cfg.extra_layers):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, out_dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(images))


class HeadSpecialist(nn.Module):
    """SAM image embeddings + :class:`TextEncoder` → seg projector → the routed grounding heads.

    Attributes mirror :class:`~fclm.model.fclm.FCLM` where the trainer reads them (``sam``,
    ``seg_projector``, ``heads``, ``token_ids``, ``config``, ``processor``).
    """

    def __init__(
        self,
        *,
        text_encoder: TextEncoder,
        sam: SamBackend,
        seg_projector: nn.Module,
        heads: dict[str, nn.Module],
        token_ids: dict[str, int],
        config: FCLMConfig,
        image_stem: ImageStem | None = None,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.image_stem = image_stem
        self.sam = sam
        self.seg_projector = seg_projector
        self.heads = nn.ModuleDict(heads)
        self.token_ids = dict(token_ids)
        self.config = config
        self.processor: Any = None

    def trainable_parts(self) -> dict[str, list[nn.Module]]:
        """Parts for :func:`fclm.training.trainability.apply_trainability`: the text encoder is the ``llm`` part."""
        return {
            "sam_image_encoder": [self.sam.image_encoder],
            "vision_tower": [self.image_stem] if self.image_stem is not None else [],
            "sam_decoder": [self.sam.prompt_encoder, self.sam.mask_decoder],
            "llm": [self.text_encoder],
            "projectors": [self.seg_projector],
            "heads": [self.heads],
        }

    def forward(self, batch: dict) -> dict[str, Any]:
        """Predictions for an :class:`~fclm.processor.FCLMProcessor` batch: ``seg_*`` and ``heads`` (no logits)."""
        image_embeddings = batch.get("sam_image_embeddings")
        if image_embeddings is None:
            image_embeddings = self.sam.encode(batch["sam_images"])
        if self.image_stem is not None:
            image_embeddings = image_embeddings + self.image_stem(batch["sam_images"])
        input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
        text = attention & (input_ids != self.token_ids["image_pad"])
        hidden = self.text_encoder(input_ids, text)
        seg_positions = input_ids == self.token_ids["seg"]
        rows, cols = seg_positions.nonzero(as_tuple=True)
        prompt = text.clone()
        if batch.get("labels") is not None:
            prompt &= batch["labels"] == -100
        text_states, padding = gather_expression_states(hidden, prompt, rows, cols)
        seg_hidden = hidden[seg_positions]
        routes = batch.get("heads") or [self.config.heads.default] * image_embeddings.shape[0]
        return route_to_heads(
            self.heads,
            seg_embeddings=self.seg_projector(seg_hidden),
            seg_hidden=seg_hidden,
            seg_batch_index=rows,
            image_embeddings=image_embeddings,
            valid_hw=batch["sam_valid_hw"],
            routes=list(routes),
            text_states=text_states,
            text_padding_mask=padding,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """``fclm_config.json`` (``kind: head_specialist``), ``fclm_modules.safetensors`` (every weight), processor."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(directory / MODULES_NAME))
        config = to_dict(self.config)
        config["sam"]["checkpoint"] = None
        write_json(directory / CONFIG_NAME, {"config": config, "token_ids": self.token_ids, "format_version": 1})
        if self.processor is not None:
            self.processor.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "HeadSpecialist":
        """Load a directory written by :meth:`save_pretrained` (no missing or unexpected weights)."""
        from fclm.processor import FCLMProcessor

        directory = Path(directory)
        payload = json.loads((directory / CONFIG_NAME).read_text())
        config = from_dict(FCLMConfig, payload["config"], prefix="config")
        processor = FCLMProcessor.from_pretrained(directory)
        model = _assemble(config, processor, load_sam_checkpoint=False)
        model.load_state_dict(load_file(str(directory / MODULES_NAME)), strict=True)
        return model


def _assemble(config: FCLMConfig, processor: Any, *, load_sam_checkpoint: bool = True) -> HeadSpecialist:
    from fclm.tokenizer import token_ids as tokenizer_token_ids

    if config.kind != "head_specialist":
        raise ValueError(f"a head specialist needs model.kind: head_specialist, got {config.kind!r}")
    sam_cfg = config.sam
    if not load_sam_checkpoint and sam_cfg.checkpoint is not None:
        sam_cfg = from_dict(type(sam_cfg), {"checkpoint": None}, prefix="sam", base=sam_cfg)
    sam = build_sam(sam_cfg)
    tokenizer = processor.tokenizer
    dim = config.text_encoder.hidden_size
    heads = {name: build_head(name, cfg=config, sam=sam, llm_dim=dim) for name in config.heads.enabled}
    stem = None
    if config.image_stem.enabled:
        stem = ImageStem(config.image_stem, stride=config.sam.patch_size, out_dim=config.sam.prompt_embed_dim)
    model = HeadSpecialist(
        image_stem=stem,
        text_encoder=TextEncoder(len(tokenizer), config.text_encoder),
        sam=sam,
        seg_projector=MLPProjector(in_dim=dim, out_dim=config.sam.prompt_embed_dim, num_layers=config.projector_layers,
                                   input_norm=config.seg_query_norm == "standardize"),
        heads=heads,
        token_ids=tokenizer_token_ids(tokenizer),
        config=config,
    )
    model.processor = processor
    return model


def build_head_specialist(config: FCLMConfig, *, processor: Any = None, tokenizer: Any = None) -> HeadSpecialist:
    """Build a :class:`HeadSpecialist` (random weights, or SAM from ``config.sam.checkpoint``)."""
    from fclm.processor import FCLMProcessor
    from fclm.tokenizer import load_tokenizer

    if processor is None:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.backbone)
        processor = FCLMProcessor.from_config(config, tokenizer=tokenizer)
    return _assemble(config, processor)
