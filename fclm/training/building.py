"""The model a training config describes, and the fingerprint that proves a rebuild gave the same weights.

Shared by the loop (:mod:`fclm.training.loop`) and the export (:mod:`fclm.training.export`), which
rebuilds a checkpoint's model before loading its trained weights.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from fclm.training.config import TrainConfig

__all__ = ["build_model", "weights_fingerprint"]


def build_model(cfg: TrainConfig) -> nn.Module:
    """Stage 1: ``build_fclm(cfg.model)``; with ``init_from``: ``FCLM.from_pretrained`` of the export."""
    from fclm.model import FCLM, build_fclm

    if cfg.init_from is not None:
        return FCLM.from_pretrained(cfg.init_from)
    return build_fclm(cfg.model)


def weights_fingerprint(model: nn.Module, only_frozen: bool = True) -> str:
    """sha256 of the (frozen) parameters: a resumed run must rebuild exactly the weights it did not save."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if only_frozen and p.requires_grad:
            continue
        t = p.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
