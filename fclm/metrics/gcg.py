"""Grounded conversation generation (GranD-f GCG), as GLaMM scores it."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import rle as R
from .io import EvalInputError, EvalSet
from .result import TaskResult

PhraseSimilarity = Callable[[Sequence[str], Sequence[str]], np.ndarray]
"""``sim(a, b)`` → ``len(a)×len(b)`` matrix of phrase similarities."""

GCG_IOU_THRESHOLD = 0.5
GCG_TEXT_SIM_THRESHOLD = 0.5
_PHRASE = re.compile(r"<p>(.*?)</p>")
_TAG = re.compile(r"<.*?>")


def clean_caption(text: str) -> str:
    """A grounded caption as plain text, as GLaMM ``eval/gcg/infer.py::inference`` writes ``caption``:
    newlines dropped, double spaces → one, every ``<…>`` tag removed, ``[SEG]`` removed, whitespace
    collapsed, ``'`` and spaces stripped from both ends."""
    text = text.replace("\n", "").replace("  ", " ")
    text = _TAG.sub("", text).replace("[SEG]", "")
    return " ".join(text.split()).strip("'").strip()


def extract_phrases(text: str) -> list[str]:
    """Phrases of a grounded caption: every ``<p>…</p>``, stripped (GLaMM ``infer.py``)."""
    return [p.strip() for p in _PHRASE.findall(text)]


def seg_phrases(text: str) -> list[Optional[str]]:
    """For each ``[SEG]`` of ``text`` in order, the last ``<p>…</p>`` phrase written since the previous
    ``[SEG]`` (None when there is none), so that a phrase stays with its own mask even when some
    ``[SEG]``\\ s are dropped as no-target. (GLaMM pairs the i-th phrase with the i-th mask, which is
    the same whenever every phrase is followed by its ``[SEG]``.)"""
    out: list[Optional[str]] = []
    for chunk in text.split("[SEG]")[:-1]:
        found = extract_phrases(chunk)
        out.append(found[-1] if found else None)
    return out


def greedy_pair_ious(iou: np.ndarray) -> list[float]:
    """GLaMM ``compute_miou`` pairing: while the highest IoU left is > 0, take it (first occurrence in
    row-major order: lowest prediction index, then lowest target index) and delete its row and column."""
    m = np.array(iou, dtype=np.float64, copy=True)
    out = []
    while m.size > 0 and m.max() > 0:
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        out.append(float(m[r, c]))
        m = np.delete(np.delete(m, r, axis=0), c, axis=1)
    return out


def greedy_recall_matches(iou_gt_pred: np.ndarray, sim_gt_pred: np.ndarray, iou_thr: float = GCG_IOU_THRESHOLD, sim_thr: float = GCG_TEXT_SIM_THRESHOLD) -> list[tuple[int, int]]:
    """GLaMM ``find_best_matches``: repeatedly take the highest IoU (G×P, first occurrence); stop as soon
    as it is below ``iou_thr`` or its text similarity below ``sim_thr``; else keep the pair and zero
    its row and column in both matrices."""
    ious = np.array(iou_gt_pred, dtype=np.float64, copy=True)
    sims = np.array(sim_gt_pred, dtype=np.float64, copy=True)
    matches = []
    while ious.size > 0:
        r, c = np.unravel_index(int(np.argmax(ious)), ious.shape)
        if ious[r, c] < iou_thr or sims[r, c] < sim_thr:
            break
        matches.append((int(r), int(c)))
        ious[r, :] = 0
        ious[:, c] = 0
        sims[r, :] = 0
        sims[:, c] = 0
    return matches


def _iou_matrix(preds: list, gts: list) -> np.ndarray:
    inter = R.pairwise_intersection(preds, gts).astype(np.float64)
    union = np.array([R.area(p) for p in preds], dtype=np.float64)[:, None] + np.array([R.area(g) for g in gts], dtype=np.float64)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def coco_ap50(gt_masks: list[list[Optional[R.Rle]]], dt_masks: list[list[R.Rle]], sizes: list[tuple[int, int]]) -> float:
    """Mask AP at IoU 0.5: pycocotools ``COCOeval(…, "segm")`` on one category, ``stats[1]``.

    As GLaMM ``evaluate.py``: every GT target mask is an annotation (``iscrowd`` 0, category 1, area
    from the mask), every detection has score 1.0; image ids are 1, 2, … in the order given. Empty GT targets are not annotations. With no
    detection at all, pycocotools cannot load results; AP is then 0 (nothing is recalled).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for img_id, (gts, dts, (h, w)) in enumerate(zip(gt_masks, dt_masks, sizes), start=1):
        images.append({"id": img_id, "height": h, "width": w})
        for m in gts:
            if m is None:
                continue
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "segmentation": m, "area": float(R.area(m)), "bbox": [float(v) for v in _xywh(m)], "iscrowd": 0})
        for m in dts:
            dets.append({"id": len(dets) + 1, "image_id": img_id, "category_id": 1, "segmentation": m, "area": float(R.area(m)), "bbox": [float(v) for v in _xywh(m)], "iscrowd": 0, "score": 1.0})
    if not anns:
        raise EvalInputError("GCG: no GT masks, AP50 is undefined")
    if not dets:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        gt.createIndex()
        dt = COCO()
        dt.dataset = {"images": images, "annotations": dets, "categories": [{"id": 1, "name": "object"}]}
        dt.createIndex()
        ev = COCOeval(gt, dt, "segm")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def _xywh(m: R.Rle) -> list[float]:
    from pycocotools import mask as mask_utils

    return mask_utils.toBbox(m).tolist()


def caption_metrics(gts: dict[int, str], res: dict[int, str]) -> dict[str, float]:
    """METEOR and CIDEr as pycocoevalcap's ``COCOEvalCap.evaluate`` computes them (PTBTokenizer, then
    ``Meteor`` and ``Cider`` on the tokenized captions). Needs Java (both PTBTokenizer and METEOR run
    jars). CIDEr keeps its own scale (0–10), as GLaMM prints it."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()), _quiet_fd2():
        tok = PTBTokenizer()
        g = tok.tokenize({k: [{"caption": v}] for k, v in gts.items()})
        r = tok.tokenize({k: [{"caption": v}] for k, v in res.items()})
        meteor = Meteor()
        try:
            m, _ = meteor.compute_score(g, r)
        finally:
            del meteor
        c, _ = Cider().compute_score(g, r)
    return {"meteor": float(m), "cider": float(c)}


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 for child processes (PTBTokenizer's Java prints a status line there)."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class BertMeanPoolSimilarity:
    """GLaMM's phrase similarity: cosine of bert-base-uncased embeddings, each the mean of the last
    hidden state over all tokens (``[CLS]`` and ``[SEP]`` included; ``max_length=512``, truncation),
    loaded from a local directory only (never downloaded)."""

    def __init__(self, model_path: str | Path):
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path)
        if not path.is_dir():
            raise EvalInputError(f"--bert-model {path}: not a directory")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise EvalInputError(f"--bert-model {path}: cannot load a BERT model ({str(e).splitlines()[0]})") from None
        self._cache: dict[str, np.ndarray] = {}

    def _embed(self, text: str) -> np.ndarray:
        if text not in self._cache:
            import torch

            with torch.no_grad():
                inputs = self.tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
                self._cache[text] = self.model(**inputs).last_hidden_state[0].mean(dim=0).double().numpy()
        return self._cache[text]

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        ea = np.stack([self._embed(t) for t in a]) if a else np.zeros((0, 1))
        eb = np.stack([self._embed(t) for t in b]) if b else np.zeros((0, ea.shape[1]))
        na = np.linalg.norm(ea, axis=1, keepdims=True)
        nb = np.linalg.norm(eb, axis=1, keepdims=True)
        # sklearn cosine_similarity treats a zero vector's norm as 1 (similarity 0).
        return (ea / np.where(na == 0, 1, na)) @ (eb / np.where(nb == 0, 1, nb)).T


def score_gcg(es: EvalSet, *, phrase_similarity: Optional[PhraseSimilarity] = None, caption_scores: bool = True) -> TaskResult:
    """AP50, mIoU, recall, METEOR and CIDEr following GLaMM ``eval/gcg/evaluate.py``.

    * one record per image; GT phrases are ``meta.phrases`` (else the ``<p>…</p>`` of the assistant
      turn), GT masks the targets in ``[SEG]`` order; GT caption = :func:`clean_caption` of the
      assistant turn, predicted caption = :func:`clean_caption` of ``text``;
    * every predicted ``[SEG]`` that does not predict no-target is one detection (its union mask) with
      score 1.0 — the official code ignores scores — and carries the phrase of :func:`seg_phrases`;
    * ``ap50`` = :func:`coco_ap50`;
    * ``miou``: per image :func:`greedy_pair_ious` on the detection×target IoU matrix (``I / U``),
      mean of the paired IoUs, 0 for an image with no pair; mean over images;
    * ``recall`` = Σ matches of :func:`greedy_recall_matches` (IoU ≥ 0.5 and phrase similarity ≥ 0.5)
      ÷ Σ number of GT phrases; a detection without a phrase has similarity 0. Reported only with a
      ``phrase_similarity`` (the official one is :class:`BertMeanPoolSimilarity`);
    * ``meteor``, ``cider`` = :func:`caption_metrics` when Java is available.
    """
    res = TaskResult(hist_label="per-image mIoU")
    gt_masks, dt_masks, sizes, mious = [], [], [], []
    gt_caps, dt_caps = {}, {}
    tp = positives = 0
    for n, (gt, pred) in enumerate(es.pairs):
        phrases = gt.meta.get("phrases")
        if phrases is None:
            phrases = extract_phrases(gt.assistant)
        if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
            raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): meta.phrases must be a list of strings")
        gts = [t.mask for t in gt.targets]
        if len(phrases) != len(gts):
            raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): {len(phrases)} phrase(s) but {len(gts)} target(s)")
        pred_phr = seg_phrases(pred.text)
        dets, det_phr = [], []
        for k, s in enumerate(pred.segs):
            if not s.no_target and s.mask is not None:
                dets.append(s.mask)
                det_phr.append(pred_phr[k] if k < len(pred_phr) else None)
        gt_masks.append(gts)
        dt_masks.append(dets)
        sizes.append(gt.size or (1, 1))
        paired = greedy_pair_ious(_iou_matrix(dets, gts)) if dets and gts else []
        miou = float(np.mean(paired)) if paired else 0.0
        mious.append(miou)
        row = {"id": gt.id, "n_gt": len(gts), "n_det": len(dets), "miou": miou, "paired_ious": paired}
        if phrase_similarity is not None:
            positives += len(phrases)
            if dets and gts:
                sims = np.zeros((len(gts), len(dets)))
                have = [j for j, p in enumerate(det_phr) if p is not None]
                if have:
                    sims[:, have] = np.asarray(phrase_similarity(list(phrases), [det_phr[j] for j in have]), dtype=np.float64).reshape(len(gts), len(have))
                matches = greedy_recall_matches(_iou_matrix(dets, gts).T, sims)
            else:
                matches = []
            tp += len(matches)
            row["recall_matches"] = [list(m) for m in matches]
        gt_caps[n] = clean_caption(gt.assistant)
        dt_caps[n] = clean_caption(pred.text)
        res.per_sample.append(row)
    res.hist = mious
    res.counts.update(n_images=len(es.pairs), n_gt_masks=sum(m is not None for g in gt_masks for m in g), n_detections=sum(len(d) for d in dt_masks))
    if any(m is not None for g in gt_masks for m in g):
        # COCO image ids follow the sorted record ids, not the file order: all scores are 1.0, so
        # COCOeval's tie order (by image id) must not depend on how the file happens to be sorted.
        order = sorted(range(len(es.pairs)), key=lambda n: es.pairs[n][0].id)
        res.metrics["ap50"] = coco_ap50([gt_masks[n] for n in order], [dt_masks[n] for n in order], [sizes[n] for n in order])
    else:
        res.notes.append("ap50 not reported: no GT masks")
    res.metrics["miou"] = float(np.mean(mious))
    if phrase_similarity is None:
        res.notes.append("recall not reported: it needs the phrase-similarity model (bert-base-uncased, GLaMM's choice); pass --bert-model PATH to a local copy")
    elif positives:
        res.metrics["recall"] = tp / positives
        res.counts.update(n_gt_phrases=positives, n_recalled=tp)
    else:
        res.notes.append("recall not reported: no GT phrases")
    if not caption_scores:
        res.notes.append("meteor/cider not computed (caption metrics switched off)")
    elif shutil.which("java") is None:
        res.notes.append("meteor/cider not reported: pycocoevalcap's PTB tokenizer and METEOR need Java, which is not on PATH")
    else:
        res.metrics.update(caption_metrics(gt_caps, dt_caps))
        if len(gt_caps) < 2:
            res.notes.append("cider is 0 by construction with one image: its document frequencies come from the evaluated set")
    return res
