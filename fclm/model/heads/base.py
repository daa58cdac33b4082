"""The grounding-head contract: :class:`HeadInputs` in, a dict of ``pred_*`` tensors out.

Every head is an ``nn.Module`` whose ``forward(inputs: HeadInputs) -> dict[str, Tensor]`` returns
prefixed predictions (``pred_masks``, ``pred_boxes``, ``pred_scores``, ``pred_exists`` …), one row per
``[SEG]`` routed to it. What inference (:mod:`fclm.inference.predictor`) reads:

* ``pred_masks``: (n,Hl,Wl) low-res mask logits in the S × S SAM frame, one mask per query; or
  (n,Q,Hl,Wl), Q candidate instances per query, kept when their ``pred_scores`` reach the score threshold;
* ``pred_boxes``: (n,4) or (n,Q,4) boxes, normalised xyxy of the S × S SAM frame (optional; without them an
  instance's box is its mask's tight box);
* ``pred_scores``: (n,) or (n,Q) confidences in [0, 1];
* ``pred_exists``: (n,) logits of "the expression refers to something" (heads with a no-target branch);
  below 0.5 after the sigmoid the query grounds nothing.

A head may replace that reading with a ``detections(preds, j, score_threshold) -> Detections`` method
(e.g. IGVG fuses its global and instance masks there); :func:`head_detections` picks it.

Heads are built by name from :data:`HEAD_REGISTRY`. A head module registers its builder *and* its
criterion with :func:`register_head` (the criterion's ``loss_*`` names and default weights declared
there, so a config can be checked without building anything) and never imports another head.
Criteria live in :mod:`fclm.losses` (losses outside the model); they receive the head's outputs and
:class:`~fclm.losses.heads.HeadTargets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from fclm.config import FCLMConfig
    from fclm.model.sam import SamBackend

__all__ = [
    "HeadInputs", "HeadBuilder", "HeadSpec", "HEAD_REGISTRY", "register_head", "build_head", "build_head_criterion",
    "head_loss_weights", "Detections", "default_detections", "head_detections",
]


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

CriterionBuilder = Callable[..., Any]
"""``criterion_builder(*, cfg: FCLMConfig) -> criterion``; the criterion is called as
``criterion(preds: dict, targets: HeadTargets) -> dict[str, Tensor]`` and returns every declared
``loss_*`` name (exact graph zeros when it has nothing to learn from) plus, optionally, detached
``metric_*`` diagnostics that are logged but never weighted."""


@dataclass(frozen=True)
class HeadSpec:
    """A registered head: its builder, its criterion builder and the loss names (→ default weights) it declares."""

    name: str
    builder: HeadBuilder
    criterion: CriterionBuilder
    loss_weights: dict[str, float]


HEAD_REGISTRY: dict[str, HeadSpec] = {}
"""Head name → :class:`HeadSpec`. Filled by :func:`register_head` when ``fclm.model.heads`` is imported."""


def register_head(
    name: str, *, criterion: CriterionBuilder, loss_weights: dict[str, float]
) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator registering a head builder under ``name`` with its criterion and declared loss weights.

    A name registered twice, a loss name not starting with ``loss_``, a negative weight, or a loss name
    another head already declares is an error (names are global: the trainer logs them side by side).
    """
    bad = [k for k, v in loss_weights.items() if not k.startswith("loss_") or v < 0]
    if bad:
        raise ValueError(f"head {name!r}: loss names must start with 'loss_' and weights be >= 0, got {bad}")

    def decorator(builder: HeadBuilder) -> HeadBuilder:
        if name in HEAD_REGISTRY:
            raise ValueError(f"head {name!r} is already registered (by {HEAD_REGISTRY[name].builder.__module__})")
        for other in HEAD_REGISTRY.values():
            shared = sorted(set(other.loss_weights) & set(loss_weights))
            if shared:
                raise ValueError(f"head {name!r} declares loss name(s) {shared} that head {other.name!r} already declares")
        HEAD_REGISTRY[name] = HeadSpec(name, builder, criterion, dict(loss_weights))
        return builder

    return decorator


def _spec(name: str) -> HeadSpec:
    if name not in HEAD_REGISTRY:
        raise ValueError(f"unknown head {name!r}; registered heads: {sorted(HEAD_REGISTRY)}")
    return HEAD_REGISTRY[name]


def build_head(name: str, *, cfg: "FCLMConfig", sam: "SamBackend", llm_dim: int) -> nn.Module:
    """Build the head registered as ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    return _spec(name).builder(cfg=cfg, sam=sam, llm_dim=llm_dim)


def build_head_criterion(name: str, *, cfg: "FCLMConfig") -> Any:
    """The criterion registered with head ``name``."""
    return _spec(name).criterion(cfg=cfg)


def head_loss_weights(names: Sequence[str]) -> dict[str, float]:
    """Declared loss name → default weight, over the heads ``names`` (unknown heads raise ``ValueError``)."""
    out: dict[str, float] = {}
    for name in names:
        out.update(_spec(name).loss_weights)
    return out


@dataclass
class Detections:
    """What one query grounds after post-processing (SAM-frame coordinates; inference maps them to the image).

    Attributes:
      masks: (k,Hl,Wl) low-res mask logits of the k kept instances.
      scores: (k,) confidences.
      boxes: (k,4) normalised frame xyxy, or None (boxes then come from the masks).
      exists: probability that the expression refers to something, or None (head without that branch).
    """

    masks: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor | None = None
    exists: float | None = None


def default_detections(preds: dict[str, torch.Tensor], j: int, score_threshold: float) -> Detections:
    """The contract's reading of query ``j`` (module docstring): one mask, or the Q candidates whose score
    reaches ``score_threshold``; nothing when ``pred_exists`` says "no target"."""
    masks = preds["pred_masks"][j]
    scores = preds.get("pred_scores")
    boxes = preds.get("pred_boxes")
    scores = scores[j] if scores is not None else None
    boxes = boxes[j] if boxes is not None else None
    exists = None
    if "pred_exists" in preds:
        exists = float(torch.sigmoid(preds["pred_exists"][j].float()).reshape(-1)[0])
    if masks.ndim == 2:
        masks = masks[None]
        scores = torch.ones(1, device=masks.device) if scores is None else scores.reshape(1)
        boxes = None if boxes is None else boxes.reshape(1, 4)
        keep = torch.ones(1, dtype=torch.bool, device=masks.device)
    else:
        scores = torch.ones(masks.shape[0], device=masks.device) if scores is None else scores
        keep = scores.float() >= score_threshold
    if exists is not None and exists < 0.5:
        keep = torch.zeros_like(keep)
    return Detections(masks=masks[keep], scores=scores[keep].float(), boxes=None if boxes is None else boxes[keep], exists=exists)


def head_detections(head: nn.Module, preds: dict[str, torch.Tensor], j: int, score_threshold: float) -> Detections:
    """``head.detections(...)`` when the head defines it, else :func:`default_detections`."""
    custom = getattr(head, "detections", None)
    if custom is not None:
        return custom(preds, j, score_threshold)
    return default_detections(preds, j, score_threshold)
