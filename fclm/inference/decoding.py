"""One pass over the prompt: generate the answer and keep each ``[SEG]``'s hidden state on the way.

:func:`decode` runs the language model once over the prompt embeddings (prefill, KV cache on) and
then one token at a time. A token's last-layer hidden state is computed in the step that *feeds* it,
so the state of a generated ``[SEG]`` is taken from the step after the one that sampled it — the
same state a teacher-forced forward over prompt + answer gives (causal attention), without that
second forward and without running the vision tower, SAM or the region crops again. When the
token budget ends right after a ``[SEG]``, one more step feeds it (no token is sampled there).

Positions: the 3-D rope positions of the prompt come from ``get_rope_index`` (image tokens take
fewer positions than tokens); each new token then takes the sample's largest position + 1 on all
three axes, as transformers' Qwen2.5-VL generation does. Batches are left-padded, so every sample's
next token lands in the same column.

Sampling: greedy by default; ``do_sample`` with ``temperature`` / ``top_k`` / ``top_p`` /
``repetition_penalty`` uses transformers' logits processors, and ``seed`` makes sampling repeatable.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

MIN_TEMPERATURE = 1e-3
"""Smaller temperatures overflow the scaled logits; greedy decoding is what they approach."""

__all__ = ["MIN_TEMPERATURE", "SamplingConfig", "Generation", "PrefixCache", "decode", "encode_prefix", "run"]


@dataclass
class SamplingConfig:
    """How the answer is decoded (greedy unless ``do_sample``)."""

    max_new_tokens: int = 64
    """Largest number of generated tokens (the closing ``<|im_end|>`` included)."""
    do_sample: bool = False
    """Sample from the distribution instead of taking the most likely token."""
    temperature: float = 1.0
    """Divides the logits before sampling (only with ``do_sample``)."""
    top_k: int = 0
    """Keep the k most likely tokens before sampling; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches ``top_p``; 1.0 keeps all."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens of the prompt and the answer (CTRL's penalty)."""
    seed: int | None = None
    """Seed of the sampling generator; the same seed and inputs give the same answer."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} (greedy decoding is do_sample=False), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    def processors(self) -> LogitsProcessorList:
        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                out.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(self.top_p))
        return out


@dataclass
class Generation:
    """What :func:`decode` returns for a batch of B prompts.

    Attributes:
        tokens: B lists of generated ids, the stop token excluded.
        finish_reasons: ``"stop"`` (a stop token was generated) or ``"length"`` (budget spent), per sample.
        seg_hidden: B tensors (n_b×D), the last-layer hidden state of each generated ``[SEG]``, in order.
        prompt_hidden: B×L×D last-layer hidden states of the (left-padded) prompt.
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    seg_hidden: list[torch.Tensor]
    prompt_hidden: torch.Tensor


@dataclass
class PrefixCache:
    """The language model's KV cache and last-layer states for the first ``length`` prompt tokens of one image.

    Every question about an image starts with the same tokens (system turn, user header, the image);
    :class:`~fclm.inference.FCLMPredictor` computes them once per image (:func:`encode_prefix`) and
    :func:`decode` continues from a copy. Batch size 1.
    """

    length: int
    token_ids: tuple[int, ...]
    cache: Any
    hidden: torch.Tensor
    """1×length×D last-layer states of the prefix (the expression states of the heads include them)."""


def _cache_kwarg(language_model: torch.nn.Module) -> str:
    """The name the language model's ``forward`` gives its KV cache (``cache`` in newer transformers).

    Read from the class, so a wrapper or hook on the instance's ``forward`` does not hide it.
    """
    params = inspect.signature(type(language_model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _rope_positions(qwen: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                    mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    position_ids, _ = qwen.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    return position_ids


@torch.no_grad()
def encode_prefix(qwen: Any, *, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  image_grid_thw: torch.Tensor, mm_token_type_ids: torch.Tensor, length: int) -> PrefixCache:
    """Run the language model over the first ``length`` tokens of one (unpadded) prompt and keep its cache."""
    if input_ids.shape[0] != 1 or not bool(attention_mask.all()):
        raise ValueError("encode_prefix takes one unpadded prompt")
    lm = qwen.model.language_model
    position_ids = _rope_positions(qwen, input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
    cache = DynamicCache()
    out = lm(inputs_embeds=inputs_embeds[:, :length], attention_mask=attention_mask[:, :length],
             position_ids=position_ids[:, :, :length], use_cache=True, **{_cache_kwarg(lm): cache})
    return PrefixCache(length=length, token_ids=tuple(input_ids[0, :length].tolist()), cache=cache, hidden=out.last_hidden_state)


def decode(
    qwen: Any,
    *,
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    seg_id: int,
    stop_ids: set[int],
    pad_id: int,
    sampling: SamplingConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    prefix: PrefixCache | None = None,
) -> Iterator[list[int | None]]:
    """Generate from left-padded prompts; a generator that yields each step's new token per sample.

    Yields, once per step, a list of B token ids (``None`` for samples that had already finished) and
    returns a :class:`Generation` (``StopIteration.value``; :func:`run` collects it).

    Arguments:
        qwen: the Hugging Face ``Qwen2_5_VLForConditionalGeneration`` (LoRA merged or peft-wrapped).
        input_ids, attention_mask, mm_token_type_ids: B×L, left-padded.
        inputs_embeds: B×L×D with image and region features already scattered in.
        image_grid_thw: B×3.
        seg_id, stop_ids, pad_id: the ``[SEG]`` id, the ids that end an answer, the padding id.
        sampling: :class:`SamplingConfig` (default greedy, 64 tokens).
        logits_processor: extra transformers logits processors, applied after the sampling ones.
        prefix: the cached first tokens of this (single, unpadded) prompt; the prompt's other tokens
            are run on a copy of its cache (the cache itself is left as it is, for the next question).
    """
    sampling = sampling or SamplingConfig()
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("decode expects left-padded prompts (every row's last token attended)")
    processors = sampling.processors()
    if logits_processor is not None:
        processors.extend(logits_processor)
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=inputs_embeds.device).manual_seed(sampling.seed)
    lm = qwen.model.language_model
    position_ids = _rope_positions(qwen, input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
    next_position = position_ids.amax(dim=(0, 2)) + 1  # B
    start = 0
    if prefix is not None:
        if input_ids.shape[0] != 1 or tuple(input_ids[0, : prefix.length].tolist()) != prefix.token_ids:
            raise ValueError("decode: the prompt does not start with the cached prefix")
        start = prefix.length
        cache = copy.deepcopy(prefix.cache)
    else:
        cache = DynamicCache()
    cache_arg = {_cache_kwarg(lm): cache}
    out = lm(inputs_embeds=inputs_embeds[:, start:], attention_mask=attention_mask,
             position_ids=position_ids[:, :, start:], use_cache=True, **cache_arg)
    prompt_hidden = out.last_hidden_state
    if prefix is not None:
        prompt_hidden = torch.cat([prefix.hidden.to(prompt_hidden.dtype), prompt_hidden], dim=1)
    last_hidden = prompt_hidden[:, -1]
    b = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(b)]
    seg_states: list[list[torch.Tensor]] = [[] for _ in range(b)]
    finish = [""] * b
    history = input_ids
    mask = attention_mask
    embed = qwen.get_input_embeddings()
    for step in range(sampling.max_new_tokens):
        logits = qwen.lm_head(last_hidden).float()
        logits = processors(history, logits)
        if sampling.do_sample:
            probs = torch.softmax(logits, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            chosen = logits.argmax(dim=-1)
        active = [not finish[i] for i in range(b)]
        chosen = torch.where(torch.tensor(active, device=chosen.device), chosen, torch.full_like(chosen, pad_id))
        step_tokens: list[int | None] = []
        for i, t in enumerate(chosen.tolist()):
            if not active[i]:
                step_tokens.append(None)
                continue
            step_tokens.append(t)
            if t in stop_ids:
                finish[i] = "stop"
            else:
                tokens[i].append(t)
        yield step_tokens
        seg_unfed = any(active[i] and step_tokens[i] == seg_id for i in range(b))
        if all(finish) and not seg_unfed:
            break
        if step == sampling.max_new_tokens - 1 and not seg_unfed:
            break
        # Feed the chosen tokens: their hidden states (a [SEG]'s is the one the heads decode).
        history = torch.cat([history, chosen[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        positions = (next_position + step).view(1, b, 1).expand(3, b, 1)
        out = lm(inputs_embeds=embed(chosen[:, None]), attention_mask=mask, position_ids=positions,
                 use_cache=True, **cache_arg)
        last_hidden = out.last_hidden_state[:, -1]
        for i in range(b):
            if active[i] and step_tokens[i] == seg_id:
                seg_states[i].append(last_hidden[i])
    width = prompt_hidden.shape[-1]
    return Generation(
        tokens=tokens,
        finish_reasons=[f or "length" for f in finish],
        seg_hidden=[torch.stack(s) if s else prompt_hidden.new_zeros((0, width)) for s in seg_states],
        prompt_hidden=prompt_hidden,
    )


def run(steps: Iterator[list[int | None]]) -> Generation:
    """Drive a :func:`decode` generator to its end and return its :class:`Generation`."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
