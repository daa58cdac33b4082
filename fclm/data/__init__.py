"""FCLM data: the record schema, prompt templates, datasets over JSONL, and batch samplers.

* :mod:`fclm.data.schema` — the record as code (:data:`TASKS`, :func:`validate_record`, constructors).
* :mod:`fclm.data.templates` — the prompts every builder, the processor and inference share.
* :mod:`fclm.data.dataset` — :class:`JsonlDataset` (also over an HF ``datasets`` copy) and
  :class:`MixtureDataset` (weighted mixture of several files).
* :mod:`fclm.data.sampling` — :class:`RandomBatchSampler`, :class:`LengthGroupedBatchSampler`.
* :mod:`fclm.data.safe_pickle` — unpickling plain data without running code.

The builders that write records from each benchmark's own format are the program
``python -m data_builders`` (``fclm-data``).
"""

from typing import Any

from fclm.data.schema import (
    TASKS,
    check_record,
    count_seg_tokens,
    make_record,
    placeholder_region_indices,
    prompt_region_indices,
    resolve_image_path,
    validate_record,
)

# The datasets and samplers need torch; they load on first use so that the builders (which only
# need the schema) start quickly and without torch's memory.
_LAZY = {
    "JsonlDataset": "fclm.data.dataset",
    "MixtureDataset": "fclm.data.dataset",
    "RandomBatchSampler": "fclm.data.sampling",
    "LengthGroupedBatchSampler": "fclm.data.sampling",
    "estimate_tokens": "fclm.data.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fclm.data' has no attribute {name!r}")


__all__ = [
    "TASKS",
    "JsonlDataset",
    "MixtureDataset",
    "RandomBatchSampler",
    "LengthGroupedBatchSampler",
    "estimate_tokens",
    "check_record",
    "count_seg_tokens",
    "make_record",
    "placeholder_region_indices",
    "prompt_region_indices",
    "resolve_image_path",
    "validate_record",
]
