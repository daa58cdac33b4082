"""One function decides what a training stage updates: :func:`apply_trainability`.

Parts (attribute names fixed in CONTRACTS.md) and their modes:

============================  ==========================================  ==================
part                          modules                                     modes
============================  ==========================================  ==================
``vision_tower``              ``backbone.model.visual``                   frozen / full
``sam_image_encoder``         ``sam.image_encoder``                       frozen / full
``llm``                       ``backbone.model.language_model``,          frozen / lora / full
                              ``backbone.lm_head``
``new_token_rows``            rows of ``<mask>``, ``<pos>``, ``[SEG]`` in  on / off
                              the input embeddings and ``lm_head``
                              (with ``llm: lora``, ``lm_head: full`` /
                              ``embed_tokens: full`` train that whole matrix)
``region_extractor``          ``region_extractor``                        frozen / full
``projectors``                ``seg_projector``, ``pos_projector``,       frozen / full
                              ``mask_projector``
``sam_decoder``               ``sam.prompt_encoder``, ``sam.mask_decoder`` frozen / full
``heads``                     ``heads`` (what they do not share with SAM)  frozen / full
============================  ==========================================  ==================

LoRA (and the new token rows) come from peft: ``model.backbone`` is replaced by
``get_peft_model(backbone, LoraConfig(target_modules=<regex on language_model>,
trainable_token_indices=…))``, which injects the adapter layers in place, so ``model.qwen`` (the
HF model under the wrapper) runs them. peft freezes everything it does not add; this function then
sets ``requires_grad`` on every parameter of the model explicitly from the policy, so the result does
not depend on what was frozen before. A parameter shared by two parts (a head holding SAM's mask
decoder) belongs to the first part in :data:`PART_ORDER` that contains it.
"""

from __future__ import annotations

import logging
import re
from typing import Iterator

import torch.nn as nn

from fclm.training.config import TrainabilityPolicy

logger = logging.getLogger(__name__)

LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
TOKEN_MARKER = "trainable_tokens_delta"
NEW_TOKEN_NAMES = ("mask", "pos", "seg")
"""``model.token_ids`` keys of the tokens FCLM adds to the Qwen vocabulary."""

PART_ORDER = (
    "sam_image_encoder",
    "sam_decoder",
    "vision_tower",
    "llm",
    "region_extractor",
    "projectors",
    "heads",
)


def lora_target_regex(target_modules: tuple[str, ...]) -> str:
    """The peft ``target_modules`` regex (full match on names inside the backbone) for the LLM only."""
    names = "|".join(re.escape(m) for m in target_modules)
    return rf"model\.language_model\..*\.({names})"


def has_lora(model: nn.Module) -> bool:
    """Whether ``model.backbone`` carries peft adapters (LoRA or trainable token rows)."""
    return hasattr(getattr(model, "backbone", None), "peft_config")


def _part_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    custom = getattr(model, "trainable_parts", None)
    if custom is not None:  # a model without the Qwen backbone (fclm.model.specialist) names its own parts
        return {part: list(custom().get(part, [])) for part in PART_ORDER}
    qwen = model.qwen
    projectors = [m for m in (model.seg_projector, model.pos_projector, getattr(model, "mask_projector", None)) if m is not None]
    return {
        "sam_image_encoder": [model.sam.image_encoder],
        "sam_decoder": [model.sam.prompt_encoder, model.sam.mask_decoder],
        "vision_tower": [qwen.model.visual],
        "llm": [qwen.model.language_model, qwen.lm_head],
        "region_extractor": [model.region_extractor],
        "projectors": projectors,
        "heads": [model.heads],
    }


def parameter_parts(model: nn.Module) -> dict[int, str]:
    """``id(parameter) → part name`` for every parameter of ``model`` (first claim in :data:`PART_ORDER` wins)."""
    owner: dict[int, str] = {}
    modules = _part_modules(model)
    for part in PART_ORDER:
        for module in modules[part]:
            for p in module.parameters():
                owner.setdefault(id(p), part)
    unclaimed = [n for n, p in model.named_parameters() if id(p) not in owner]
    if unclaimed:
        raise ValueError(f"parameters outside every known part (update fclm.training.trainability): {unclaimed[:5]}")
    return owner


def new_token_ids(model: nn.Module) -> list[int]:
    """Ids of ``<mask>``, ``<pos>``, ``[SEG]`` (sorted)."""
    return sorted({int(model.token_ids[name]) for name in NEW_TOKEN_NAMES})


def add_adapters(model: nn.Module, policy: TrainabilityPolicy) -> None:
    """Wrap ``model.backbone`` with peft (LoRA on the LLM and/or trainable new token rows), as the policy asks.

    Idempotent: a backbone that already carries adapters is left as it is.
    """
    want_lora = policy.llm == "lora"
    want_rows = policy.new_token_rows and policy.llm != "full"
    if not hasattr(model, "backbone"):  # a head specialist: its "llm" part is a small text encoder
        if want_lora:
            raise ValueError("trainability.llm: lora needs the Qwen backbone; a head specialist's text encoder is "
                             "trained full or frozen")
        return
    if has_lora(model) or not (want_lora or want_rows):
        return
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    ids = new_token_ids(model)
    # lm_head is untied in FCLM's backbones; when tied, peft shares the embedding's adapter with it.
    tied = getattr(model.qwen.config, "tie_word_embeddings", False)
    embed_full = policy.llm == "lora" and policy.embed_tokens == "full"
    row_modules = [] if embed_full else ["embed_tokens"]
    if not (tied or policy.lm_head == "full"):
        row_modules.append("lm_head")
    want_rows = want_rows and bool(row_modules)
    if not (want_lora or want_rows):
        return
    if want_lora:
        lora = policy.lora
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(lora.target_modules),
            trainable_token_indices={name: ids for name in row_modules} if want_rows else None,
        )
    else:
        config = TrainableTokensConfig(target_modules=row_modules, token_indices=ids)
    model.backbone = get_peft_model(model.backbone, config)


def _mode(policy: TrainabilityPolicy, part: str) -> str:
    return getattr(policy, part)


def _iter_decisions(model: nn.Module, policy: TrainabilityPolicy) -> Iterator[tuple[str, nn.Parameter, bool]]:
    owner = parameter_parts(model)
    for name, p in model.named_parameters():
        part = owner[id(p)]
        if any(m in name for m in LORA_MARKERS):
            yield name, p, policy.llm == "lora"
        elif TOKEN_MARKER in name:
            yield name, p, policy.new_token_rows
        elif part == "llm" and policy.llm == "lora" and policy.lm_head == "full" and _is_lm_head(name):
            yield name, p, True
        elif part == "llm" and policy.llm == "lora" and policy.embed_tokens == "full" and _is_embed_tokens(name):
            yield name, p, True
        else:
            yield name, p, _mode(policy, part) == "full"


def _is_lm_head(name: str) -> bool:
    return name.endswith("lm_head.weight") or name.endswith("lm_head.bias")


def _is_embed_tokens(name: str) -> bool:
    return name.endswith("embed_tokens.weight")


def apply_trainability(model: nn.Module, policy: TrainabilityPolicy) -> int:
    """Add LoRA / token-row adapters as needed, set ``requires_grad`` of every parameter from ``policy``.

    Returns the number of trainable parameters (shared parameters counted once) and logs it with a
    per-part breakdown.
    """
    add_adapters(model, policy)
    for part, modules in _part_modules(model).items():
        for module in modules:
            for sub in module.modules():
                if hasattr(sub, "update_stats"):  # running statistics follow their part's mode
                    sub.update_stats = _mode(policy, part) == "full"
    owner = parameter_parts(model)
    per_part: dict[str, int] = {}
    total = 0
    for name, p, trainable in _iter_decisions(model, policy):
        p.requires_grad_(trainable)
        if trainable:
            key = "lora" if any(m in name for m in LORA_MARKERS) else "new_token_rows" if TOKEN_MARKER in name else owner[id(p)]
            per_part[key] = per_part.get(key, 0) + p.numel()
            total += p.numel()
    n_all = sum(p.numel() for p in model.parameters())
    breakdown = ", ".join(f"{k} {v:,}" for k, v in sorted(per_part.items()))
    logger.info("trainable parameters: %s of %s (%.3f%%): %s", f"{total:,}", f"{n_all:,}", 100.0 * total / max(n_all, 1), breakdown)
    return total


def merge_adapters(model: nn.Module) -> None:
    """Fold LoRA and the trainable token rows into the base weights and drop the peft wrapper (for export)."""
    if has_lora(model):
        model.backbone = model.backbone.merge_and_unload()


def stateful_buffer_names(model: nn.Module) -> list[str]:
    """Buffers that training changes (running statistics of modules with ``update_stats`` on)."""
    names = []
    for prefix, module in model.named_modules():
        if getattr(module, "update_stats", False):
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers(recurse=False)]
    return names


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def tracked_names(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys training changes, i.e. what a checkpoint keeps: :func:`trainable_names`
    and :func:`stateful_buffer_names`."""
    return trainable_names(model) + stateful_buffer_names(model)


def trainable_state_dict(model: nn.Module) -> dict:
    """The entries of ``model.state_dict()`` named by :func:`tracked_names`."""
    names = set(tracked_names(model))
    return {k: v for k, v in model.state_dict().items() if k in names}


__all__ = [
    "apply_trainability",
    "add_adapters",
    "merge_adapters",
    "parameter_parts",
    "new_token_ids",
    "lora_target_regex",
    "trainable_state_dict",
    "stateful_buffer_names",
    "tracked_names",
    "trainable_names",
    "has_lora",
]
