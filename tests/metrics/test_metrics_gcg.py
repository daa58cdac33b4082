"""GCG (GLaMM eval/gcg/evaluate.py): AP50, mIoU, recall, METEOR/CIDEr, caption and phrase parsing."""

from __future__ import annotations

import numpy as np
import pytest
from metrics_testkit import eval_set, gt, pred, rect, seg, write_jsonl

from fclm.metrics import score, score_gcg
from fclm.metrics.gcg import BertMeanPoolSimilarity, clean_caption, coco_ap50, extract_phrases, greedy_pair_ious, greedy_recall_matches, seg_phrases

A = rect(0, 0, 4, 5)  # 20 px
B = rect(5, 5, 9, 9)  # 16 px
C = rect(0, 0, 3, 5)  # 15 px, IoU 0.75 with A


def exact_match(a, b):
    return np.array([[1.0 if x == y else 0.0 for y in b] for x in a])


def _records():
    g = [
        gt("i1", [[A], [B]], task="gcg", answer="A <p>man</p> [SEG] next to a <p>dog</p> [SEG].", meta={"phrases": ["man", "dog"]}),
        gt("i2", [[B]], task="gcg", answer="A <p>cat</p> [SEG] sleeping."),  # phrases parsed from the caption
    ]
    p = [pred("i1", [seg(C), seg(B)], text="A <p>person</p> [SEG] with a <p>dog</p> [SEG]."), pred("i2", [], text="")]
    return g, p


def test_caption_cleaning_and_phrases_as_glamm():
    text = "A <p>man</p> [SEG] rides a <p> horse </p> [SEG].\n"
    assert clean_caption(text) == "A man rides a horse ."
    assert extract_phrases(text) == ["man", "horse"]
    assert seg_phrases("<p>a</p> [SEG] and [SEG] then <p>b</p> <p>c</p> [SEG] tail") == ["a", None, "c"]
    assert clean_caption("'quoted  caption'") == "quoted caption"


def test_greedy_pairing_ties_and_recall_break():
    assert greedy_pair_ious(np.array([[0.5, 0.5], [0.5, 0.2]])) == [0.5, 0.2]  # tie → lowest pred, then target
    assert greedy_pair_ious(np.zeros((2, 2))) == []
    # the highest IoU pair fails the text test → matching stops, even though (0, 1) would pass
    assert greedy_recall_matches(np.array([[0.9, 0.6]]), np.array([[0.1, 0.9]])) == []
    assert greedy_recall_matches(np.array([[0.9, 0.6], [0.7, 0.0]]), np.ones((2, 2))) == [(0, 0)]


def test_gcg_hand_computed(tmp_path):
    g, p = _records()
    r = score_gcg(eval_set(tmp_path, g, p), phrase_similarity=exact_match, caption_scores=False)
    assert r.per_sample[0]["paired_ious"] == pytest.approx([1.0, 0.75])
    assert r.metrics["miou"] == pytest.approx((0.875 + 0.0) / 2)  # an image without detections scores 0
    # 2 of 3 GT masks found at IoU ≥ 0.5, precision 1 → 101-point AP = 67/101
    assert r.metrics["ap50"] == pytest.approx(67 / 101)
    # dog/dog matches; then man/person has IoU 0.75 but similarity 0 → stop; "cat" is a missed positive
    assert r.per_sample[0]["recall_matches"] == [[1, 1]]
    assert r.metrics["recall"] == pytest.approx(1 / 3)
    assert "meteor" not in r.metrics and any("caption metrics switched off" in n for n in r.notes)


def test_gcg_no_target_seg_is_not_a_detection_and_keeps_phrases_aligned(tmp_path):
    g = [gt("i", [[A], [B]], task="gcg", answer="<p>x</p> [SEG] <p>dog</p> [SEG]", meta={"phrases": ["x", "dog"]})]
    p = [pred("i", [seg(A, exists=0.2), seg(B)], text="<p>x</p> [SEG] <p>dog</p> [SEG]")]
    r = score_gcg(eval_set(tmp_path, g, p), phrase_similarity=exact_match, caption_scores=False)
    assert r.per_sample[0]["n_det"] == 1 and r.per_sample[0]["recall_matches"] == [[1, 0]]
    assert r.metrics["recall"] == pytest.approx(1 / 2)


def test_ap50_extremes():
    assert coco_ap50([[{"size": [2, 2], "counts": b"04"}]], [[]], [(2, 2)]) == 0.0
    from fclm.masks import encode_mask

    m = encode_mask(np.eye(4, dtype=bool))
    m["counts"] = m["counts"].encode()
    assert coco_ap50([[m]], [[m]], [(4, 4)]) == pytest.approx(1.0)


def test_gcg_without_bert_or_java_leaves_keys_out(tmp_path, monkeypatch):
    g, p = _records()
    monkeypatch.setattr("fclm.metrics.gcg.shutil.which", lambda name: None)
    r = score_gcg(eval_set(tmp_path, g, p))
    assert "recall" not in r.metrics and "meteor" not in r.metrics and "cider" not in r.metrics
    assert any(n.startswith("recall not reported") and "--bert-model" in n for n in r.notes)
    assert any("need Java" in n for n in r.notes)


def test_gcg_caption_metrics_with_java_equal_pycocoevalcap(tmp_path):
    from pycocoevalcap.cider.cider import Cider

    g, p = _records()
    r = score_gcg(eval_set(tmp_path, g, p), phrase_similarity=exact_match)
    # What PTBTokenizer makes of the cleaned captions "A man next to a dog." / "A cat sleeping." and
    # "A person with a dog." / "": lowercased, punctuation dropped.
    gt_tok = {0: ["a man next to a dog"], 1: ["a cat sleeping"]}
    res_tok = {0: ["a person with a dog"], 1: [""]}
    want_cider, _ = Cider().compute_score(gt_tok, res_tok)
    assert r.metrics["cider"] == pytest.approx(want_cider)
    # pycocoevalcap 1.2 Meteor().compute_score(gt_tok, res_tok), run once by hand: METEOR's JVM takes
    # 7-17 s to start on this machine, too slow to start twice in the test suite.
    assert r.metrics["meteor"] == pytest.approx(0.18560878295724648, abs=1e-9)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "dog", "cat", "person", "the", "red", "car"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


def test_bert_mean_pool_similarity_matches_manual_computation(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    sim = BertMeanPoolSimilarity(tiny_bert)
    got = sim(["a man", "the red car"], ["a man", "a dog", "cat"])
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()

    def emb(t):
        with torch.no_grad():
            return model(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0).double().numpy()

    for i, a in enumerate(["a man", "the red car"]):
        for j, b in enumerate(["a man", "a dog", "cat"]):
            ea, eb = emb(a), emb(b)
            assert got[i, j] == pytest.approx(float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb)), abs=1e-9)
    assert got[0, 0] == pytest.approx(1.0)


def test_score_gcg_with_bert_model_option(tmp_path, tiny_bert):
    g, p = _records()
    gp, pp = write_jsonl(tmp_path / "gt.jsonl", g), write_jsonl(tmp_path / "pred.jsonl", p)
    s = score("gcg", gp, pp, tmp_path / "out", bert_model=str(tiny_bert), caption_metrics=False)
    assert 0.0 <= s["recall"] <= 1.0 and s["n_gt_phrases"] == 3
    assert not any(n.startswith("recall not reported") for n in s["notes"])


def test_ap50_does_not_depend_on_file_order(tmp_path):
    # All detections score 1.0, so COCOeval's tie order follows image ids; those follow sorted record ids.
    g = [gt("a", [[A]], task="gcg", meta={"phrases": ["x"]}), gt("b", [[B]], task="gcg", meta={"phrases": ["y"]})]
    p = [pred("a", [seg(rect(8, 0, 10, 2))]), pred("b", [seg(B)])]  # "a": a false positive, "b": a hit
    forward = score_gcg(eval_set(tmp_path, g, p, name="f"), caption_scores=False).metrics["ap50"]
    backward = score_gcg(eval_set(tmp_path, g[::-1], p[::-1], name="b"), caption_scores=False).metrics["ap50"]
    assert forward == backward == pytest.approx(0.5 * 51 / 101)  # FP ranked first: precision 0.5 up to recall 0.5
