"""Property tests (hypothesis): every metric stays in [0, 1] and does not depend on record order."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from metrics_testkit import gt, pred, rect, seg, write_jsonl

from fclm.metrics import load_eval_set, run_task
from fclm.metrics.scoring import ScoreOptions

S = 8  # 8×8 images

rects = st.tuples(st.integers(0, S - 1), st.integers(0, S - 1), st.integers(1, S), st.integers(1, S)).map(
    lambda t: rect(min(t[0], t[2] - 1), min(t[1], t[3] - 1), max(t[2], t[0] + 1), max(t[3], t[1] + 1), S, S)
)
pred_segs = st.lists(
    st.tuples(st.lists(rects, max_size=2), st.one_of(st.none(), st.floats(0, 1)), st.lists(st.floats(0, 1), min_size=2, max_size=2)),
    max_size=3,
)


@st.composite
def datasets(draw, task: str):
    n = draw(st.integers(1, 6))
    gts, preds = [], []
    for i in range(n):
        rid = f"r{i}"
        if task == "muse":
            targets = [[m] for m in draw(st.lists(rects, min_size=1, max_size=3))]
        else:
            targets = [draw(st.lists(rects, max_size=2))]
        meta = {"ref_id": draw(st.integers(0, 2)), "phrases": [f"p{k}" for k in range(len(targets))]}
        gts.append(gt(rid, targets, task=task, image=f"img{draw(st.integers(0, 2))}.jpg", meta=meta))
        if draw(st.booleans()) or i == 0:  # some predictions missing
            segs = [seg(*ms, exists=ex, scores=sc[: len(ms)]) for ms, ex, sc in draw(pred_segs)]
            preds.append(pred(rid, segs, text=" ".join(f"<p>p{k}</p> [SEG]" for k in range(len(segs)))))
    perm_g = draw(st.permutations(range(len(gts))))
    perm_p = draw(st.permutations(range(len(preds))))
    return gts, preds, perm_g, perm_p


def _score(task, gts, preds):
    with tempfile.TemporaryDirectory() as d:
        g = write_jsonl(Path(d) / "gt.jsonl", gts)
        p = write_jsonl(Path(d) / "pred.jsonl", preds)
        es = load_eval_set(g, p, need_masks=task not in ("grec",))
        opts = ScoreOptions(caption_metrics=False, phrase_similarity=lambda a, b: np.array([[float(x == y) for y in b] for x in a]))
        return run_task(task, es, opts).metrics


TASKS = ["res", "gres", "grec", "rrefcoco", "refzom", "muse", "gcg"]


@pytest.mark.parametrize("task", TASKS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_metrics_in_range_and_record_order_invariant(task, data):
    gts, preds, perm_g, perm_p = data.draw(datasets(task))
    a = _score(task, gts, preds)
    b = _score(task, [gts[i] for i in perm_g], [preds[i] for i in perm_p])
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert 0.0 <= v <= 1.0 + 1e-12, (k, v)
        assert b[k] == pytest.approx(v, abs=1e-12), k
