"""DataLoader collate function: records → images loaded → :class:`fclm.processor.FCLMProcessor` batch.

A record that cannot be encoded (unreadable image, count mismatch, bad mask …) is reported with its
id and skipped, and counted in :attr:`FCLMCollator.report`; with ``strict=True`` it raises instead. A
batch in which every record fails raises a ``ValueError`` listing the reasons.

With ``DataLoader(num_workers > 0)`` each worker process has its own copy of the collator, so the
counts live in the workers; every skip is also logged (``logging`` warning) with the record's id and
reason, which is what a long run should be read for.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from fclm.io import ErrorReport, RecordError
from fclm.processor import FCLMProcessor, load_image

logger = logging.getLogger(__name__)


class FCLMCollator:
    """``collate_fn`` for a ``torch.utils.data.DataLoader`` over FCLM records (dicts).

    Arguments:
        processor: the :class:`FCLMProcessor` that encodes and batches.
        image_root: folder that a relative ``image`` is resolved against (records from
            ``fclm.data.dataset.JsonlDataset`` are already absolute). A ``_image_path`` key, when
            present, is used as is.
        strict: raise at the first record that fails instead of skipping it.
        add_generation_prompt: build generation prompts (see :meth:`FCLMProcessor.encode_record`).

    Attributes:
        report: :class:`fclm.io.ErrorReport` of the skipped records (``report.count``).
    """

    def __init__(
        self,
        processor: FCLMProcessor,
        *,
        image_root: str | os.PathLike | None = None,
        strict: bool = False,
        add_generation_prompt: bool = False,
    ) -> None:
        self.processor = processor
        self.image_root = Path(image_root) if image_root is not None else None
        self.strict = strict
        self.add_generation_prompt = add_generation_prompt
        self.report = ErrorReport(strict=strict)

    @property
    def skipped(self) -> int:
        """How many records this collator has skipped so far (in this process)."""
        return self.report.count

    def image_path(self, record: dict) -> Path:
        """Where a record's image is: ``_image_path``, else ``image`` (absolute, or under ``image_root``)."""
        if record.get("_image_path"):
            return Path(record["_image_path"])
        image = record.get("image")
        if not isinstance(image, str) or not image:
            raise RecordError(_where(record), "has no 'image' path")
        p = Path(image)
        if not p.is_absolute() and self.image_root is not None:
            p = self.image_root / p
        return p

    def encode(self, record: dict) -> dict:
        """Load the record's image and encode it (raises :class:`RecordError` naming the record)."""
        if not isinstance(record, dict):
            raise RecordError("record", f"expected a dict, got {type(record).__name__}")
        try:
            image = load_image(self.image_path(record), record.get("id"))
        except RecordError as e:
            raise RecordError(_where(record), e.problem) from None
        return self.processor.encode_record(record, image, add_generation_prompt=self.add_generation_prompt)

    def __call__(self, records: Sequence[dict]) -> dict[str, Any]:
        encoded, failures = [], []
        for record in records:
            try:
                encoded.append(self.encode(record))
            except RecordError as e:
                self.report.add(e)  # raises when strict
                failures.append(e)
            except ValueError as e:  # a check without a RecordError wrapper: name the record ourselves
                err = RecordError(_where(record), str(e))
                self.report.add(err)
                failures.append(err)
        if not encoded:
            reasons = "\n  ".join(str(e) for e in failures)
            raise ValueError(f"every record of the batch failed ({len(failures)}):\n  {reasons}")
        return self.processor.collate(encoded)


def _where(record: Any) -> str:
    if not isinstance(record, dict):
        return "record"
    where = f"record {str(record.get('id', '<no id>'))!r}"
    return where + (f" ({record['_where']})" if record.get("_where") else "")
