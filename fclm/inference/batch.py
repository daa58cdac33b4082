"""Batch inference over a schema JSONL: resumable, sharded, with bad records reported and skipped.

:func:`infer_file` answers every record of a ground-truth / prompt file (DESIGN §4 schema) and appends
one prediction line per record to the output, in the format ``fclm-eval score`` reads (see
:mod:`fclm.inference.predictor`). A rerun skips ids already in the output (:class:`~fclm.io.ResumableJsonl`),
so a killed job resumes where it stopped and writes every id exactly once. With ``world_size`` > 1 each
rank answers the records whose index ≡ rank (mod world size) into its own shard file;
:func:`merge_shards` joins the shards in input order. Starting processes and process groups is the
program's job (``fclm-infer``), not this module's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fclm.inference.decoding import SamplingConfig
from fclm.inference.grounding import ground_records
from fclm.inference.predictor import predict_records
from fclm.io import ErrorReport, RecordError, ResumableJsonl, iter_jsonl, write_jsonl

logger = logging.getLogger(__name__)

__all__ = ["InferStats", "read_records", "infer_file", "shard_path", "merge_shards"]


@dataclass
class InferStats:
    """What one :func:`infer_file` call did."""

    n_records: int = 0
    """Valid records in this rank's shard."""
    n_skipped_done: int = 0
    """Records already in the output (resumed)."""
    n_written: int = 0
    """Predictions written by this call."""
    report: ErrorReport = field(default_factory=ErrorReport)
    """Inputs reported and skipped (malformed lines, records without id, duplicates, unreadable images …)."""


def read_records(path: str | Path, report: ErrorReport) -> list[dict]:
    """The records of a JSONL in file order; malformed lines, missing ids and repeated ids are reported and skipped."""
    path = Path(path)
    records, seen = [], {}
    for lineno, rec in iter_jsonl(path, report):
        rid = rec.get("id")
        if rid is None or isinstance(rid, (dict, list, bool)):
            report.add(RecordError(f"{path}:{lineno}", f"record has no usable 'id' (got {rid!r})"))
            continue
        if str(rid) in seen:
            report.add(RecordError(f"{path}:{lineno}", f"id {rid!r} repeats line {seen[str(rid)]}; only the first is answered"))
            continue
        seen[str(rid)] = lineno
        records.append(rec)
    return records


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its predictions (``OUT`` itself for one process)."""
    out = Path(out)
    if world_size == 1:
        return out
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}")


def infer_file(
    model: Any,
    data: str | Path,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    batch_size: int = 1,
    head: str | None = None,
    sampling: SamplingConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    progress: bool = True,
    report: ErrorReport | None = None,
    teacher_forced: bool = False,
) -> InferStats:
    """Answer the records of ``data`` (this rank's share) and append predictions to ``out`` (or the rank's shard).

    Arguments:
        image_root: folder that record ``image`` paths are relative to (default: ``data``'s folder).
        batch_size: prompts generated together (left padding).
        head: grounding head for every record (default: each record's ``head``, else the model's).
        limit: answer only the first ``limit`` records of the file (before sharding).
        report: collects skipped inputs; a strict report raises on the first one instead.
        teacher_forced: ground each record's own answer (:func:`fclm.inference.grounding.ground_records`)
            instead of generating one: the grounding heads measured apart from generation.
    """
    from tqdm.auto import tqdm

    data = Path(data)
    stats = InferStats(report=report if report is not None else ErrorReport())
    records = read_records(data, stats.report)
    if limit is not None:
        records = records[:limit]
    shard = records[rank::world_size]
    stats.n_records = len(shard)
    with ResumableJsonl(shard_path(out, rank, world_size)) as writer:
        todo = [r for r in shard if str(r["id"]) not in writer.done]
        stats.n_skipped_done = len(shard) - len(todo)
        bar = tqdm(total=len(todo), desc=f"fclm-infer[{rank}]" if world_size > 1 else "fclm-infer",
                   disable=not progress, unit="rec")
        seen_before = stats.report.count
        root = image_root if image_root is not None else data.parent
        if teacher_forced:
            if head is not None:
                todo = [{**r, "head": head} for r in todo]
            preds = ground_records(model, todo, root, batch_size=batch_size, report=stats.report)
        else:
            preds = predict_records(model, todo, root, batch_size=batch_size, sampling=sampling, head=head, report=stats.report)
        for pred in preds:
            writer.append(pred)
            stats.n_written += 1
            if stats.n_written % batch_size == 0:
                writer.flush()
            bar.update(1 + stats.report.count - seen_before)
            seen_before = stats.report.count
        bar.update(len(todo) - bar.n)
        bar.close()
    return stats


def merge_shards(data: str | Path, out: str | Path, world_size: int) -> int:
    """Join the ranks' shard files (and predictions already in ``out``) into ``out`` in input order.

    Written atomically; the shards are removed afterwards. Returns the number of predictions in ``out``.
    """
    out = Path(out)
    lines: dict[str, str] = {}
    sources = [out] + [shard_path(out, r, world_size) for r in range(world_size)]
    for src in sources:
        if not src.exists():
            continue
        for line in src.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines.setdefault(str(json.loads(line).get("id")), line)
    order = [str(r["id"]) for r in read_records(data, ErrorReport())]
    ordered = [json.loads(lines.pop(i)) for i in order if i in lines]
    ordered += [json.loads(v) for v in lines.values()]  # ids no longer in the data file: kept, at the end
    n = write_jsonl(out, ordered)
    for src in sources[1:]:
        src.unlink(missing_ok=True)
    return n
