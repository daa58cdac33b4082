"""The model a training config describes, and the fingerprint that proves a rebuild gave the same weights.

Shared by the loop (:mod:`fclm.training.loop`) and the export (:mod:`fclm.training.export`), which
rebuilds a checkpoint's model before loading its trained weights.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from fclm.training.config import TrainConfig

__all__ = ["build_model", "prepare_for_training", "weights_fingerprint"]


def build_model(cfg: TrainConfig) -> nn.Module:
    """Stage 1: ``build_fclm(cfg.model)``; with ``init_from``: ``FCLM.from_pretrained`` of the export.

    ``model.kind: head_specialist`` builds (or loads) :class:`fclm.model.specialist.HeadSpecialist` instead.
    """
    from fclm.model import build_fclm
    from fclm.model.loading import load_pretrained
    from fclm.model.specialist import build_head_specialist

    if cfg.init_from is not None:
        return load_pretrained(cfg.init_from)
    if cfg.model.kind == "head_specialist":
        return build_head_specialist(cfg.model)
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


def prepare_for_training(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Apply the run's compute options to a built (and adapted) model; return what was switched on.

    ``gradient_checkpointing``: the LLM's decoder layers and the vision tower's blocks recompute their
    activations in backward (:func:`fclm.model.backbone.enable_gradient_checkpointing`).
    ``compile``: each LLM decoder layer is ``torch.compile``-d in place (regional compilation).
    Models without a Qwen backbone (head specialists) are left as they are.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(model, "qwen"):
        return []
    done: list[str] = []
    if cfg.gradient_checkpointing:
        from fclm.model.backbone import enable_gradient_checkpointing

        done += [f"gradient_checkpointing:{part}" for part in enable_gradient_checkpointing(backbone)]
    if cfg.compile:
        for layer in model.qwen.model.language_model.layers:
            layer.compile()
        done.append("compile:language_model.layers")
    return done
