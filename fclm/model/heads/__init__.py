"""Grounding heads: the :class:`HeadInputs` contract, the registry, and the built-in heads.

Importing this package registers every built-in head: ``sam`` (:mod:`.sam_head`), ``c3vg`` (:mod:`.c3vg`) and
``igvg`` (:mod:`.igvg`).
"""

from fclm.model.heads.base import (
    HEAD_REGISTRY,
    Detections,
    HeadBuilder,
    HeadInputs,
    HeadSpec,
    build_head,
    build_head_criterion,
    default_detections,
    head_detections,
    head_loss_weights,
    register_head,
)
from fclm.model.heads.c3vg import C3VGHead, build_c3vg_head
from fclm.model.heads.igvg import IGVGHead, build_igvg_head
from fclm.model.heads.sam_head import SamHead, build_sam_head

__all__ = [
    "HEAD_REGISTRY", "Detections", "HeadBuilder", "HeadInputs", "HeadSpec", "build_head", "build_head_criterion",
    "default_detections", "head_detections", "head_loss_weights", "register_head", "SamHead", "build_sam_head",
    "C3VGHead", "build_c3vg_head", "IGVGHead", "build_igvg_head",
]
