"""Inference: one path for everything that runs a trained FCLM (chat, batch inference, evaluation, serving).

* :class:`FCLMPredictor` — set an image once, ask many questions (regions as masks, boxes, clicks or
  scribbles), get text with ``[SEG]`` kept in place and, per ``[SEG]``, its phrase and instances.
* :func:`predict_records` — batched answers to schema records in the prediction format that
  ``fclm-eval score`` reads.
* :mod:`fclm.inference.decoding` — the single-pass generation loop that keeps ``[SEG]`` hidden states.
"""

from fclm.inference.decoding import SamplingConfig
from fclm.inference.predictor import (
    Answer,
    AnswerStream,
    Chat,
    FCLMPredictor,
    Instance,
    Segment,
    answer_batch,
    predict_records,
    prompt_record,
)
from fclm.inference.regions import ResolvedRegion

__all__ = [
    "Answer", "AnswerStream", "Chat", "FCLMPredictor", "Instance", "ResolvedRegion", "SamplingConfig",
    "Segment", "answer_batch", "predict_records", "prompt_record",
]
