"""What every per-benchmark scoring function returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskResult:
    """Outcome of scoring one benchmark.

    ``metrics``: the task's metric keys (``giou``, ``ciou``, ``n_acc`` …), fractions in [0, 1]
    (except CIDEr, which keeps pycocoevalcap's scale). A metric that cannot be computed is absent,
    with the reason in ``notes`` — never a made-up number.
    ``counts``: integers describing the data (``n_units``, ``n_refs_without_negatives`` …).
    ``per_sample``: one JSON-able dict per scoring unit, written to ``per_sample.jsonl``.
    ``hist``/``hist_label``: the per-sample values drawn by ``--plot``.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hist: list[float] = field(default_factory=list)
    hist_label: str = "per-sample IoU"
