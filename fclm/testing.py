"""Helpers for tests and benchmarks: making a random tiny model exercise the grounding path.

A randomly initialised LLM (almost) never generates ``[SEG]``, so without help the heads, masks and
every consumer of them (``fclm-infer``, ``fclm-chat``, ``fclm-serve``, the benchmarks) would never run
on a model built from config. :func:`rig_seg_answers` edits three weight rows so that the model always
answers exactly ``[SEG]<|im_end|>`` — through real generation, real hidden states and the real heads:

* the embedding of the prompt's last token (the ``\\n`` after ``assistant``) becomes ``-big · e`` and
  that of ``[SEG]`` becomes ``+big · e`` (a large residual dominates the last hidden state's direction);
* ``lm_head`` rows: ``[SEG]`` = ``-e``, ``<|im_end|>`` = ``+e``, every other row 0.

So after the prompt ``[SEG]`` wins, and after ``[SEG]`` ``<|im_end|>`` wins. Never use it on a model
you want to keep: it destroys the language model's answers.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["rig_seg_answers"]


def rig_seg_answers(model: Any, scale: float = 200.0) -> Any:
    """Make ``model`` (an :class:`~fclm.model.FCLM`) answer ``[SEG]`` then stop, for any prompt; returns it."""
    qwen = model.qwen
    ids = model.token_ids
    last = model.processor._text("assistant\n")[-1]
    emb = qwen.get_input_embeddings().weight
    g = torch.Generator().manual_seed(1)
    e = torch.randn(emb.shape[1], generator=g)
    e = e / e.norm()
    with torch.no_grad():
        emb[last] = -scale * e
        emb[ids["seg"]] = scale * e
        qwen.lm_head.weight.zero_()
        qwen.lm_head.weight[ids["seg"]] = -e
        qwen.lm_head.weight[ids["im_end"]] = e
    return model
