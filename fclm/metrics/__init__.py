"""Benchmark metrics for FCLM, each matching the official evaluation code it names.

``score(task, gt_path, pred_path, out_dir)`` scores one benchmark from a GT JSONL (FCLM record schema)
and a prediction JSONL and writes ``per_sample.jsonl``, ``summary.json`` and ``summary.md``::

    from fclm.metrics import score
    summary = score("res", "refcoco_val.jsonl", "preds.jsonl", "runs/eval/refcoco_val")
    summary["giou"], summary["ciou"]

Per-benchmark functions (``score_res``, ``score_gres`` …) take a loaded :class:`EvalSet`
(:func:`load_eval_set`) and return a :class:`TaskResult` without writing anything. DLC-Bench, which
is judged by an LLM rather than scored from a GT JSONL, is :func:`dlc_bench` / :func:`dlc_replay`.
The convention of each metric is in the docstring of the function implementing it.
"""

from .dlc import OpenAIChatJudge, dlc_bench, dlc_replay, parse_pred, replay_dlc_cache, score_answers
from .gcg import BertMeanPoolSimilarity, score_gcg
from .gres import score_gres
from .grec import score_grec
from .io import EvalInputError, EvalSet, load_eval_set
from .muse import score_muse
from .refzom import score_refzom
from .res import score_rec, score_res
from .result import TaskResult
from .roc import SentenceTransformerSimilarity, score_roc
from .rrefcoco import score_rrefcoco
from .scoring import TASKS, ScoreOptions, run_task, score

__all__ = [
    "TASKS", "BertMeanPoolSimilarity", "EvalInputError", "EvalSet", "OpenAIChatJudge", "ScoreOptions",
    "SentenceTransformerSimilarity", "TaskResult", "dlc_bench", "dlc_replay", "load_eval_set", "parse_pred",
    "replay_dlc_cache", "run_task", "score", "score_answers", "score_gcg", "score_grec", "score_gres",
    "score_muse", "score_rec", "score_refzom", "score_res", "score_roc", "score_rrefcoco",
]  # fmt: skip
