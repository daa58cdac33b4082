"""Datasets over FCLM records: one JSONL file (or an HF ``datasets`` copy), and a weighted mixture.

:class:`JsonlDataset` scans a schema JSONL file once, checks every record
(:func:`fclm.data.schema.check_record`), reports and skips invalid ones (``strict`` raises instead)
and keeps only the byte offsets of the valid lines, so that a million-record file costs a few MB.
``dataset[i]`` parses the line and returns the record with ``image`` resolved to an absolute path and
``"_where"`` set to ``"file:line"`` for error messages further down (processor, collator, loss).
Images are not opened here: the processor does that.

:class:`MixtureDataset` concatenates datasets and draws a weighted epoch from them
(:meth:`MixtureDataset.epoch_indices`), which the batch samplers in :mod:`fclm.data.sampling` use.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from array import array
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch.utils.data

from fclm.data.schema import check_record, resolve_image_path
from fclm.io import ErrorReport, RecordError

logger = logging.getLogger(__name__)

WHERE_KEY = "_where"
"""Key added to each returned record: where it came from (``file:line`` or ``name[row]``)."""

_JSON_COLUMNS = ("messages", "regions", "targets", "meta")


class JsonlDataset(torch.utils.data.Dataset):
    """Records of one schema JSONL file, validated once, read lazily by byte offset.

    Arguments:
        path: the JSONL file.
        image_root: folder that relative ``image`` paths are resolved against; defaults to the
            JSONL file's folder (the schema's convention).
        strict: raise :class:`fclm.io.RecordError` at the first invalid record instead of
            reporting and skipping it.
        tasks: keep only these tasks (others are left out silently, not counted as problems).
        check_images: also check that each image exists, opens and matches the mask sizes (slow).
        decode_masks: decode every mask while checking (slow for big files; RLE structure and
            sizes are always checked).

    Attributes:
        report: the :class:`fclm.io.ErrorReport` of skipped records (``report.count``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_root: str | os.PathLike | None = None,
        strict: bool = False,
        tasks: Sequence[str] | None = None,
        check_images: bool = False,
        decode_masks: bool = False,
    ):
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.report = ErrorReport(strict=strict)
        self._offsets = array("q")
        self._lines = array("q")
        self._hf: Any = None
        self._hf_rows = array("q")
        self._name = str(self.path)
        self._fh: Any = None
        self._fh_pid: int | None = None
        keep = set(tasks) if tasks is not None else None
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self.report.add(RecordError(where, f"malformed JSON ({e})"))
                    continue
                if not self._admit(rec, where, keep, check_images, decode_masks):
                    continue
                self._offsets.append(start)
                self._lines.append(lineno)
        self._log_summary()

    @classmethod
    def from_hf(
        cls,
        ds: Any,
        image_root: str | os.PathLike,
        *,
        name: str = "hf",
        strict: bool = False,
        tasks: Sequence[str] | None = None,
        check_images: bool = False,
        decode_masks: bool = False,
    ) -> "JsonlDataset":
        """Records from an HF ``datasets.Dataset`` (or any sequence of row dicts) with the schema's columns.

        ``messages`` / ``regions`` / ``targets`` / ``meta`` may be nested columns or JSON strings.
        Arrow fills keys that a row lacks with ``None``; those are dropped again (so a ``null`` in
        ``meta`` does not survive the round trip). Relative ``image`` paths resolve against
        ``image_root``. ``name`` is used in error messages (``name[row]``).
        """
        self = cls.__new__(cls)
        self.path = None
        self.image_root = Path(image_root)
        self.report = ErrorReport(strict=strict)
        self._offsets, self._lines = array("q"), array("q")
        self._hf, self._hf_rows = ds, array("q")
        self._name = name
        self._fh, self._fh_pid = None, None
        keep = set(tasks) if tasks is not None else None
        for row in range(len(ds)):
            where = f"{name}[{row}]"
            try:
                rec = _normalize_hf_row(ds[row])
            except (ValueError, TypeError) as e:
                self.report.add(RecordError(where, f"unreadable row ({e})"))
                continue
            if self._admit(rec, where, keep, check_images, decode_masks):
                self._hf_rows.append(row)
        self._log_summary()
        return self

    def _admit(self, rec: Any, where: str, keep: set[str] | None, check_images: bool, decode_masks: bool) -> bool:
        if keep is not None and isinstance(rec, dict) and rec.get("task") not in keep:
            return False
        problems = check_record(rec, image_root=self.image_root, check_images=check_images, decode_masks=decode_masks)
        if problems:
            self.report.add(RecordError(where, "; ".join(problems)))
            return False
        return True

    def _log_summary(self) -> None:
        if self.report.count:
            logger.warning("%s: %d record(s) kept, %d skipped", self._name, len(self), self.report.count)

    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._hf_rows) if self._hf is not None else len(self._offsets)

    def where(self, index: int) -> str:
        """``file:line`` (or ``name[row]``) of record ``index``."""
        if self._hf is not None:
            return f"{self._name}[{self._hf_rows[index]}]"
        return f"{self.path}:{self._lines[index]}"

    def raw(self, index: int) -> dict:
        """Record ``index`` exactly as stored (``image`` not resolved, no ``_where``)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        index %= len(self)
        if self._hf is not None:
            return _normalize_hf_row(self._hf[self._hf_rows[index]])
        if self._fh is None or self._fh_pid != os.getpid():  # one handle per DataLoader worker process
            self._fh, self._fh_pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(self._offsets[index])
        return json.loads(self._fh.readline())

    def __getitem__(self, index: int) -> dict:
        rec = self.raw(index)
        rec["image"] = str(resolve_image_path(rec["image"], self.image_root))
        rec[WHERE_KEY] = self.where(index)
        return rec

    def lengths(self, length_fn: Callable[[dict], int]) -> np.ndarray:
        """``length_fn(record)`` of every record, in index order (for length-grouped batching)."""
        return np.fromiter((int(length_fn(self[i])) for i in range(len(self))), dtype=np.int64, count=len(self))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_fh_pid"] = None, None  # file handles do not cross process boundaries
        return state

    def __repr__(self) -> str:
        return f"JsonlDataset({self._name!r}, {len(self)} records, {self.report.count} skipped)"


def _normalize_hf_row(row: Any) -> dict:
    if not isinstance(row, dict):
        raise TypeError(f"expected a row dict, got {type(row).__name__}")
    rec = dict(row)
    for key in _JSON_COLUMNS:
        if isinstance(rec.get(key), str):
            rec[key] = json.loads(rec[key])
    if rec.get("head") is None:
        rec.pop("head", None)
    if isinstance(rec.get("meta"), dict):
        rec["meta"] = {k: v for k, v in rec["meta"].items() if v is not None}
    if isinstance(rec.get("regions"), list):
        rec["regions"] = [
            {k: v for k, v in r.items() if not (v is None and k in ("target_index", "in_prompt"))} if isinstance(r, dict) else r
            for r in rec["regions"]
        ]
    return rec


class MixtureDataset(torch.utils.data.Dataset):
    """Several datasets behind one index space, drawn per epoch in proportion to ``weights``.

    ``mixture[g]`` reads the concatenation (dataset 0's records, then dataset 1's, …). An epoch is
    :meth:`epoch_indices`: ``epoch_size`` draws (default: the total number of records), dataset
    ``i`` contributing ``round(epoch_size · w_i / Σw)`` of them. A dataset drawn more often than it
    has records is repeated in full permutations; one drawn less often contributes a different
    subset every epoch. Without ``weights`` the epoch is every record once.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float] | None = None,
        *,
        epoch_size: int | None = None,
    ):
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        self.datasets = list(datasets)
        sizes = [len(d) for d in self.datasets]
        if weights is None:
            weights = [float(s) for s in sizes]
        if len(weights) != len(self.datasets):
            raise ValueError(f"{len(weights)} weight(s) for {len(self.datasets)} dataset(s)")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        for i, (s, w) in enumerate(zip(sizes, weights)):
            if w > 0 and s == 0:
                raise ValueError(f"dataset {i} has weight {w} but no records")
        self.weights = [float(w) for w in weights]
        self.sizes = sizes
        self.cumulative = list(np.cumsum([0] + sizes))
        self.epoch_size = int(epoch_size) if epoch_size is not None else int(sum(sizes))
        self.quotas = _largest_remainder(self.epoch_size, self.weights)

    @classmethod
    def from_files(
        cls,
        files: Sequence[tuple[str | os.PathLike, float]] | Sequence[str | os.PathLike],
        *,
        epoch_size: int | None = None,
        **dataset_kwargs: Any,
    ) -> "MixtureDataset":
        """A mixture of JSONL files: ``[(path, weight), …]`` (or plain paths: weights = sizes).

        ``dataset_kwargs`` go to every :class:`JsonlDataset` (``strict``, ``tasks``, ``image_root`` …).
        """
        paths, weights = [], []
        for f in files:
            path, weight = (f if isinstance(f, tuple) else (f, None))
            paths.append(path)
            weights.append(weight)
        datasets = [JsonlDataset(p, **dataset_kwargs) for p in paths]
        if all(w is None for w in weights):
            return cls(datasets, epoch_size=epoch_size)
        if any(w is None for w in weights):
            raise ValueError("give a weight for every file or for none")
        return cls(datasets, [float(w) for w in weights], epoch_size=epoch_size)

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset number, index inside it)`` of global ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        d = bisect.bisect_right(self.cumulative, index) - 1
        return d, index - int(self.cumulative[d])

    def __getitem__(self, index: int) -> Any:
        d, i = self.locate(int(index))
        return self.datasets[d][i]

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        """The global indices of one epoch, shuffled; a pure function of ``(seed, epoch)``."""
        parts = []
        for d, (quota, size) in enumerate(zip(self.quotas, self.sizes)):
            if quota == 0:
                continue
            rng = np.random.default_rng([seed, epoch, d])
            reps, rest = divmod(quota, size)
            draws = [rng.permutation(size) for _ in range(reps)]
            if rest:
                draws.append(rng.permutation(size)[:rest])
            parts.append(np.concatenate(draws) + int(self.cumulative[d]))
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return np.random.default_rng([seed, epoch, len(self.datasets)]).permutation(order).astype(np.int64)

    def lengths(self, length_fn: Callable[[Any], int]) -> np.ndarray:
        """``length_fn(record)`` of every record of the concatenation, in index order."""
        return np.fromiter((int(length_fn(self[i])) for i in range(len(self))), dtype=np.int64, count=len(self))


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method; deterministic)."""
    s = float(sum(weights))
    exact = [total * w / s for w in weights]
    floors = [int(np.floor(x)) for x in exact]
    left = total - sum(floors)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in by_remainder[:left]:
        floors[i] += 1
    return floors
