"""The grounding-head contract: :class:`HeadInputs` in, a dict of ``pred_*`` tensors out.

Every head is an ``nn.Module`` whose ``forward(inputs: HeadInputs) -> dict[str, Tensor]`` returns
prefixed predictions (``pred_masks``, ``pred_boxes``, ``pred_scores``, ``pred_exists`` …), one row per
``[SEG]`` routed to it. What inference (:mod:`fclm.inference.predictor`) reads:

* ``pred_masks``: (n,Hl,Wl) low-res mask logits, one mask per query; or (n,Q,Hl,Wl), Q candidate
  instances per query, kept when their ``pred_scores`` reach the score threshold;
* ``pred_scores``: (n,) or (n,Q) confidences in [0, 1];
* ``pred_exists``: (n,) logits of "the expression refers to something" (heads with a no-target branch).

Heads are built by name from :data:`HEAD_REGISTRY`; a head module registers
its builder with :func:`register_head` and never imports another head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from fclm.config import FCLMConfig
    from fclm.model.sam import SamBackend

__all__ = ["HeadInputs", "HeadBuilder", "HEAD_REGISTRY", "register_head", "build_head"]


@dataclass
class HeadInputs:
    """What every grounding head receives, for the n ``[SEG]`` tokens routed to it.

    Attributes:
      image_embeddings: (B,C,h,w) SAM image embeddings of the batch's B images.
      seg_embeddings: (n,C_prompt) z_seg = seg_projector(h[SEG]) of the routed [SEG]s.
      seg_hidden: (n,D_llm) the LLM hidden states at those [SEG]s.
      seg_batch_index: (n,) long, the image of each [SEG] (index into the B images).
      valid_hw: (B,2) long, size (h, w) of each resized image inside the S × S SAM frame.
      text_states: (n,T,D_llm) hidden states of each [SEG]'s expression tokens, or None (heads that
        attend to the text, C3VG / IGVG, need it).
      text_padding_mask: (n,T) bool, True at padding positions of ``text_states`` (PyTorch
        ``key_padding_mask`` convention), or None.
      vision_features: B tensors (gh_b,gw_b,D_vis) of the Qwen vision tower on the merged grid, or
        None (for heads that use the vision tower's features).
    """

    image_embeddings: torch.Tensor
    seg_embeddings: torch.Tensor
    seg_hidden: torch.Tensor
    seg_batch_index: torch.Tensor
    valid_hw: torch.Tensor
    text_states: torch.Tensor | None = None
    text_padding_mask: torch.Tensor | None = None
    vision_features: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        n = self.seg_embeddings.shape[0]
        b = self.image_embeddings.shape[0]
        if self.image_embeddings.ndim != 4:
            raise ValueError(f"HeadInputs.image_embeddings must be (B,C,h,w), got {tuple(self.image_embeddings.shape)}")
        if self.seg_embeddings.ndim != 2 or self.seg_hidden.ndim != 2 or self.seg_hidden.shape[0] != n:
            raise ValueError(
                f"HeadInputs.seg_embeddings (n,C) and seg_hidden (n,D) must agree on n, got "
                f"{tuple(self.seg_embeddings.shape)} and {tuple(self.seg_hidden.shape)}"
            )
        if self.seg_batch_index.shape != (n,):
            raise ValueError(f"HeadInputs.seg_batch_index must be ({n},), got {tuple(self.seg_batch_index.shape)}")
        if n and (int(self.seg_batch_index.min()) < 0 or int(self.seg_batch_index.max()) >= b):
            raise ValueError(f"HeadInputs.seg_batch_index must index the {b} images, got {self.seg_batch_index.tolist()}")
        if self.valid_hw.shape != (b, 2):
            raise ValueError(f"HeadInputs.valid_hw must be ({b},2), got {tuple(self.valid_hw.shape)}")
        if self.text_states is not None:
            if self.text_states.ndim != 3 or self.text_states.shape[0] != n:
                raise ValueError(f"HeadInputs.text_states must be ({n},T,D), got {tuple(self.text_states.shape)}")
            if self.text_padding_mask is not None and self.text_padding_mask.shape != self.text_states.shape[:2]:
                raise ValueError(
                    f"HeadInputs.text_padding_mask must be {tuple(self.text_states.shape[:2])}, got "
                    f"{tuple(self.text_padding_mask.shape)}"
                )
        elif self.text_padding_mask is not None:
            raise ValueError("HeadInputs.text_padding_mask given without text_states")
        if self.vision_features is not None and len(self.vision_features) != b:
            raise ValueError(f"HeadInputs.vision_features must hold {b} maps, got {len(self.vision_features)}")

    @property
    def num_queries(self) -> int:
        """n, the number of [SEG] tokens routed to the head."""
        return int(self.seg_embeddings.shape[0])


HeadBuilder = Callable[..., nn.Module]
"""``builder(*, cfg: FCLMConfig, sam: SamBackend, llm_dim: int) -> nn.Module``."""

HEAD_REGISTRY: dict[str, HeadBuilder] = {}
"""Head name → builder. Filled by :func:`register_head` when ``fclm.model.heads`` is imported."""


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator registering a head builder under ``name``; a name registered twice is an error."""

    def decorator(builder: HeadBuilder) -> HeadBuilder:
        if name in HEAD_REGISTRY:
            raise ValueError(f"head {name!r} is already registered (by {HEAD_REGISTRY[name].__module__})")
        HEAD_REGISTRY[name] = builder
        return builder

    return decorator


def build_head(name: str, *, cfg: "FCLMConfig", sam: "SamBackend", llm_dim: int) -> nn.Module:
    """Build the head registered as ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in HEAD_REGISTRY:
        raise ValueError(f"unknown head {name!r}; registered heads: {sorted(HEAD_REGISTRY)}")
    return HEAD_REGISTRY[name](cfg=cfg, sam=sam, llm_dim=llm_dim)
