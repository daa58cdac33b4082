"""Language-modelling loss."""

from __future__ import annotations

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from fclm.losses._utils import graph_zero

__all__ = ["causal_lm_loss"]


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``labels[t+1]`` (transformers' ``ForCausalLMLoss``).

    Arguments:
      logits: (B,L,V) (upcast to float32 inside).
      labels: (B,L) long, ``ignore_index`` everywhere except the supervised (assistant) tokens.
      num_items_in_batch: divide the summed loss by this instead of the number of supervised tokens
        here (gradient accumulation over several micro-batches).
    Returns:
      scalar mean over supervised tokens; an exact 0 (still in the graph) when there are none.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits (B,L,V) {tuple(logits.shape)} and labels (B,L) {tuple(labels.shape)} disagree")
    if not bool((labels[:, 1:] != ignore_index).any()):
        return graph_zero(logits)
    return ForCausalLMLoss(
        logits.contiguous(), labels, logits.shape[-1], num_items_in_batch=num_items_in_batch, ignore_index=ignore_index
    )
