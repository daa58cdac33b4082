"""The ``sam`` head: each [SEG]'s z_seg is one sparse prompt token for the SAM mask decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fclm.losses.heads import SAM_LOSS_WEIGHTS, SamCriterion
from fclm.model.heads.base import HeadInputs, register_head

if TYPE_CHECKING:
    from fclm.config import FCLMConfig
    from fclm.model.sam import SamBackend

__all__ = ["SamHead", "build_sam_head"]


class SamHead(nn.Module):
    """One mask per [SEG]: decode z_seg as a single sparse prompt token on its own image's embeddings.

    The head shares the model's :class:`~fclm.model.sam.SamBackend` without registering it as a
    submodule: the decoder's parameters belong to ``model.sam`` only (no duplicated state-dict entries,
    one trainability policy). Move the backend itself when using the head alone.

    Returns ``{"pred_masks": (n,Hl,Wl) low-res mask logits, "pred_scores": (n,) SAM IoU predictions}``.
    """

    def __init__(self, *, sam: "SamBackend") -> None:
        super().__init__()
        object.__setattr__(self, "_sam", sam)  # a reference, not a submodule (see class docstring)

    @property
    def sam(self) -> "SamBackend":
        return self._sam

    def forward(self, inputs: HeadInputs) -> dict[str, torch.Tensor]:
        image_embeddings = inputs.image_embeddings[inputs.seg_batch_index.long()]
        pred_masks, pred_scores = self.sam.decode(image_embeddings, inputs.seg_embeddings[:, None, :])
        return {"pred_masks": pred_masks, "pred_scores": pred_scores}


def _sam_criterion(*, cfg: "FCLMConfig") -> SamCriterion:
    return SamCriterion()


@register_head("sam", criterion=_sam_criterion, loss_weights=SAM_LOSS_WEIGHTS)
def build_sam_head(*, cfg: "FCLMConfig", sam: "SamBackend", llm_dim: int) -> SamHead:
    """The ``sam`` head over the model's shared SAM backend (no sizes of its own)."""
    return SamHead(sam=sam)
