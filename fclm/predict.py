"""Prediction over schema records: generate the answer, decode every ``[SEG]`` into masks, write the eval format.

One prediction per record, in the layout ``fclm-eval score`` reads::

    {"id": …, "text": "answer text with [SEG]", "segs": [{"instances": [{"mask": RLE, "box": [x1,y1,x2,y2],
     "score": s}], "exists": p}]}

The prompt is the record's conversation up to its last user turn (the reference answer and its targets
are dropped); the answer is generated greedily; then one teacher-forced forward over prompt + answer
gives the hidden state of each generated ``[SEG]``, which the record's head decodes. A ``[SEG]``'s mask is
its logits > 0 at the original image size; an empty mask is written as an empty ``instances`` list
(the metric treats it as "no target").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from fclm.io import ErrorReport, RecordError
from fclm.masks import encode_mask, mask_to_box

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100


def prompt_record(record: dict) -> dict:
    """The record cut before its last assistant turn: the prompt a model answers (no targets, no pair-only regions)."""
    messages = list(record["messages"])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise RecordError(str(record.get("id")), "has no user turn to answer")
    regions = [r for r in record.get("regions", []) if r.get("in_prompt", True)]
    regions = [{k: v for k, v in r.items() if k != "target_index"} for r in regions]
    out = {"id": record.get("id"), "messages": messages, "regions": regions, "targets": []}
    if "head" in record:
        out["head"] = record["head"]
    return out


def _teacher_forced_batch(batch: dict, answer_ids: torch.Tensor) -> dict:
    """``batch`` (one prompt) extended by ``answer_ids``: labels on the answer, as in training."""
    full = dict(batch)
    prompt = batch["input_ids"]
    answer = answer_ids.view(1, -1).to(prompt)
    full["input_ids"] = torch.cat([prompt, answer], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    full["labels"] = torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer], dim=1)
    return full


@torch.no_grad()
def predict_batch(model: Any, batch: dict, *, max_new_tokens: int = 48) -> dict:
    """Answer one prompt batch (B = 1) and decode its ``[SEG]`` tokens; returns the eval-format prediction."""
    processor = model.processor
    tokenizer = processor.tokenizer
    ids = model.token_ids
    generated = model.generate(batch, max_new_tokens=max_new_tokens)[0]
    stop = (generated == ids["im_end"]) | (generated == ids["pad"])
    end = int(stop.nonzero()[0, 0]) if bool(stop.any()) else generated.shape[0]
    answer = generated[:end]
    text = tokenizer.decode(answer.tolist(), skip_special_tokens=False)
    segs: list[dict] = []
    if bool((answer == ids["seg"]).any()):
        full = _teacher_forced_batch(batch, torch.cat([answer, answer.new_tensor([ids["im_end"]])]))
        outputs = model(full)
        n_seg = int(outputs["seg_batch_index"].shape[0])
        segs = [{"instances": []} for _ in range(n_seg)]
        valid_hw, original_hw = batch["sam_valid_hw"][0], batch["original_hw"][0]
        for head in outputs["heads"].values():
            if "pred_masks" not in head:
                continue
            logits = model.sam.postprocess_masks(head["pred_masks"], valid_hw, original_hw)
            scores = head.get("pred_scores")
            for j, q in enumerate(head["query_index"].tolist()):
                mask = (logits[j] > 0).cpu().numpy()
                score = float(scores[j]) if scores is not None else 1.0
                if mask.any():
                    segs[q]["instances"] = [{"mask": encode_mask(mask), "box": mask_to_box(mask), "score": score}]
                if "pred_exists" in head:
                    segs[q]["exists"] = float(head["pred_exists"][j])
    return {"text": text, "segs": segs}


def predict_records(
    model: Any,
    records: Iterable[dict],
    image_root: str | Path,
    *,
    max_new_tokens: int = 48,
    report: ErrorReport | None = None,
) -> Iterator[dict]:
    """Yield one prediction per record (``image`` paths relative to ``image_root``).

    A record that cannot be encoded is reported (``report``) and skipped; the evaluator then scores it as
    an empty prediction. Without ``report`` the error is raised.
    """
    from fclm.processor import load_image

    processor = model.processor
    model.eval()
    for record in records:
        rid = record.get("id")
        try:
            image_path = Path(record["image"])
            if not image_path.is_absolute():
                image_path = Path(image_root) / image_path
            image = load_image(image_path, rid)
            batch = processor.collate([processor.encode_record(prompt_record(record), image, add_generation_prompt=True)])
        except (RecordError, ValueError, OSError) as e:
            if report is None:
                raise
            report.add(e if isinstance(e, RecordError) else RecordError(str(rid), str(e)))
            continue
        pred = predict_batch(model, batch, max_new_tokens=max_new_tokens)
        yield {"id": rid, **pred}


def masks_from_prediction(pred: dict, height: int, width: int) -> list[np.ndarray]:
    """The union mask of each predicted ``[SEG]`` (for overlays)."""
    from fclm.masks import decode_rle

    out = []
    for seg in pred.get("segs", []):
        m = np.zeros((height, width), dtype=bool)
        for inst in seg.get("instances", []):
            m |= decode_rle(inst["mask"])
        out.append(m)
    return out
