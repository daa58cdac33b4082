"""Teacher-forced grounding: what the heads predict for the reference answer's ``[SEG]`` tokens.

:func:`ground_records` feeds each record's own conversation (its assistant turn with the ``[SEG]``
tokens it should produce) through a model in one forward pass, reads every routed head's
post-processed detections (:func:`fclm.model.heads.base.head_detections`) and yields predictions
in the evaluator's format (``{"id", "text", "segs": [{"phrase", "head", "instances", "exists"}]}``).
It measures the grounding heads apart from text generation — the way the specialist papers
(C3VG, IGVG) evaluate — and works for :class:`~fclm.model.fclm.FCLM` and for the head specialist
(:mod:`fclm.model.specialist`), which generates no text. ``fclm-eval run`` measures the whole model
(generation included) through :mod:`fclm.inference.predictor`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from fclm.io import ErrorReport, RecordError
from fclm.model.heads import head_detections

__all__ = ["ground_records", "detections_to_instances"]


def detections_to_instances(model: Any, name: str, preds: dict, j: int, valid_hw: torch.Tensor,
                            original_hw: torch.Tensor, score_threshold: float | None = None) -> tuple[list[dict], float | None]:
    """The j-th query of head ``name`` as eval-format instances (RLE mask, image-pixel box, score) and ``exists``."""
    from fclm.inference.predictor import _head_instances

    threshold = score_threshold if score_threshold is not None else getattr(model.heads[name], "score_threshold", 0.5)
    instances, exists = _head_instances(model, name, preds, j, valid_hw, original_hw, threshold)
    return [i.to_json() for i in instances], exists


@torch.no_grad()
def ground_records(
    model: Any,
    records: Iterable[dict],
    image_root: str | Path,
    *,
    batch_size: int = 8,
    score_threshold: float | None = None,
    report: ErrorReport | None = None,
) -> Iterator[dict]:
    """Yield one prediction per record, in input order, from a teacher-forced forward of its conversation.

    A record that cannot be encoded is reported in ``report`` and skipped (raised without ``report``).
    """
    from fclm.processor import load_image

    processor = model.processor
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pending: list[tuple[str, dict, dict]] = []

    def flush() -> Iterator[dict]:
        if not pending:
            return
        batch = processor.collate([e for _, _, e in pending])
        batch = {k: (v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        outputs = model(batch)
        where: dict[int, tuple[str, int]] = {}
        for name, preds in outputs["heads"].items():
            for j, q in enumerate(preds["query_index"].tolist()):
                where[q] = (name, j)
        seg_image = outputs["seg_batch_index"].tolist()
        for i, (rid, record, _) in enumerate(pending):
            segs = []
            for q in [q for q, b in enumerate(seg_image) if b == i]:
                name, j = where[q]
                instances, exists = detections_to_instances(
                    model, name, outputs["heads"][name], j, batch["sam_valid_hw"][i], batch["original_hw"][i], score_threshold
                )
                seg: dict[str, Any] = {"phrase": "", "head": name, "instances": instances}
                if exists is not None:
                    seg["exists"] = exists
                segs.append(seg)
            text = next((m["content"] for m in reversed(record["messages"]) if m.get("role") == "assistant"), "")
            yield {"id": rid, "text": text, "segs": segs}
        pending.clear()

    for record in records:
        rid = str(record.get("id")) if isinstance(record, dict) else "?"
        try:
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise RecordError(rid, "a record must be an object with an 'image' path")
            path = Path(record["image"])
            path = path if path.is_absolute() else Path(image_root) / path
            encoded = processor.encode_record(record, load_image(path, rid))
        except (RecordError, OSError, ValueError) as e:
            if report is None:
                raise
            report.add(e if isinstance(e, RecordError) else RecordError(rid, str(e)))
            continue
        pending.append((rid, record, encoded))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
