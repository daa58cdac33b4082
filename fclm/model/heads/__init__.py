"""Grounding heads: the :class:`HeadInputs` contract, the registry, and the built-in heads.

Importing this package registers every built-in head (``sam``; ``c3vg`` and ``igvg`` join later).
"""

from fclm.model.heads.base import HEAD_REGISTRY, HeadBuilder, HeadInputs, build_head, register_head
from fclm.model.heads.sam_head import SamHead, build_sam_head

__all__ = ["HEAD_REGISTRY", "HeadBuilder", "HeadInputs", "build_head", "register_head", "SamHead", "build_sam_head"]
