"""Loading GT + predictions: pairing, missing predictions, and every bad-input error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metrics_testkit import gt, pred, rect, rle, seg, write_jsonl
from PIL import Image

from fclm.metrics import rle as R
from fclm.metrics.io import EvalInputError, load_eval_set


def _files(tmp_path, gts, preds):
    return write_jsonl(tmp_path / "gt.jsonl", gts), write_jsonl(tmp_path / "pred.jsonl", preds)


def test_pairs_in_gt_order_and_missing_predictions_are_empty(tmp_path):
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]]), gt("b", [[rect(0, 0, 2, 2)]]), gt("c", [[]])], [pred("c"), pred("a", [seg(rect(0, 0, 1, 1))])])
    es = load_eval_set(g, p)
    assert [gt_.id for gt_, _ in es.pairs] == ["a", "b", "c"]
    assert es.missing_ids == ["b"] and es.n_missing_pred == 1
    b_pred = es.pairs[1][1]
    assert b_pred.missing and b_pred.segs == [] and b_pred.text == ""
    # unions computed once at load: one instance → its own area
    assert R.area(es.pairs[0][1].segs[0].mask) == 1
    assert R.area(es.pairs[0][0].targets[0].mask) == 4


def test_integer_ids_match_string_ids(tmp_path):
    rec = gt("7", [[rect(0, 0, 2, 2)]])
    rec["id"] = 7
    g, p = _files(tmp_path, [rec], [pred("7")])
    es = load_eval_set(g, p)
    assert es.n_missing_pred == 0


def test_prediction_ids_absent_from_gt_are_listed(tmp_path):
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]])], [pred("a"), pred("zz1"), pred("zz2")])
    with pytest.raises(EvalInputError, match=r"2 prediction id\(s\) not in .*'zz1', 'zz2'"):
        load_eval_set(g, p)


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_duplicate_ids_are_an_error_naming_both_lines(tmp_path, which):
    gts = [gt("a", [[rect(0, 0, 2, 2)]]), gt("b", [[]])]
    preds = [pred("a"), pred("b")]
    if which == "gt":
        gts.append(gt("a", [[]]))
    else:
        preds.append(pred("b"))
    g, p = _files(tmp_path, gts, preds)
    path = g if which == "gt" else p
    with pytest.raises(EvalInputError, match=rf"{path}:3: duplicate id '{'a' if which == 'gt' else 'b'}' \(first at line"):
        load_eval_set(g, p)


def test_malformed_line_names_file_and_line(tmp_path):
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]])], [pred("a")])
    with open(p, "a") as f:
        f.write('{"id": "b", "segs": [\n')
    with pytest.raises(EvalInputError, match=rf"{p}:2: malformed JSON"):
        load_eval_set(g, p)


def test_predicted_mask_size_differs_from_image_size(tmp_path):
    big = np.zeros((12, 10), dtype=bool)
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]]), gt("img-7", [[rect(0, 0, 2, 2)]])], [pred("a"), pred("img-7", [seg(big)])])
    with pytest.raises(EvalInputError, match=r"pred.jsonl:2 \(id 'img-7'\): segs\[0\].instances\[0\].mask has size \[12, 10\], but the image size is \[10, 10\]"):
        load_eval_set(g, p)


def test_no_target_gt_takes_size_from_image_header_when_present(tmp_path):
    Image.new("RGB", (10, 8)).save(tmp_path / "img.png")  # W=10, H=8
    g, p = _files(tmp_path, [gt("a", [[]], image="img.png")], [pred("a", [seg(rect(0, 0, 2, 2))])])  # 10×10 mask
    with pytest.raises(EvalInputError, match=r"id 'a'.*size \[10, 10\], but the image size is \[8, 10\]"):
        load_eval_set(g, p)


def test_no_target_gt_without_image_needs_consistent_prediction_sizes(tmp_path):
    other = np.zeros((6, 6), dtype=bool)
    g, p = _files(tmp_path, [gt("a", [[]], image="absent.jpg")], [pred("a", [seg(rect(0, 0, 2, 2)), seg(other)])])
    with pytest.raises(EvalInputError, match=r"segs\[1\].instances\[0\].mask has size \[6, 6\], but the size of segs\[0\].instances\[0\].mask is \[10, 10\]"):
        load_eval_set(g, p)
    g, p = _files(tmp_path, [gt("a", [[]], image="absent.jpg")], [pred("a", [seg(rect(0, 0, 2, 2)), seg(rect(0, 0, 3, 3))])])
    es = load_eval_set(g, p)
    assert es.pairs[0][0].size == (10, 10) and R.area(es.pairs[0][1].segs[1].mask) == 9


def test_gt_masks_of_different_sizes(tmp_path):
    rec = gt("a", [[rect(0, 0, 2, 2)]])
    rec["targets"][0]["masks"].append(rle(np.ones((5, 5), dtype=bool)))
    g, p = _files(tmp_path, [rec], [pred("a")])
    with pytest.raises(EvalInputError, match=r"id 'a'.*GT masks have different sizes"):
        load_eval_set(g, p)


def test_gt_polygons_are_rasterised_at_the_image_size(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "img.png")
    rec = gt("a", [[]], image="img.png")
    rec["targets"][0]["masks"] = [[[0, 0, 4, 0, 4, 4, 0, 4]]]  # one COCO polygon list
    g, p = _files(tmp_path, [rec], [pred("a")])
    es = load_eval_set(g, p)
    assert R.area(es.pairs[0][0].targets[0].mask) == 16


def test_uncompressed_rle_is_accepted_and_corrupt_rle_rejected(tmp_path):
    inst = {"mask": {"size": [10, 10], "counts": [0, 4, 96]}}
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 1, 4)]])], [{"id": "a", "segs": [{"instances": [inst]}]}])
    es = load_eval_set(g, p)
    assert R.intersection(es.pairs[0][1].segs[0].mask, es.pairs[0][0].targets[0].mask) == 4
    bad = {"mask": {"size": [10, 10], "counts": [0, 4, 90]}}
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 1, 4)]])], [{"id": "a", "segs": [{"instances": [bad]}]}])
    with pytest.raises(EvalInputError, match=r"pred.jsonl:1 \(id 'a'\): segs\[0\].instances\[0\].mask: bad RLE mask"):
        load_eval_set(g, p)


def test_corrupt_compressed_rle_is_rejected(tmp_path):
    too_long = rle(np.ones((20, 20), dtype=bool))["counts"]  # 400 foreground pixels
    bad = {"mask": {"size": [10, 10], "counts": too_long}}
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 1, 4)]]), gt("b", [[]])], [pred("a"), {"id": "b", "segs": [{"instances": [bad]}]}])
    with pytest.raises(EvalInputError, match=r"pred.jsonl:2 \(id 'b'\): segs\[0\].instances\[0\].mask: corrupt RLE counts"):
        load_eval_set(g, p)


def test_mask_tasks_need_masks_box_tasks_do_not(tmp_path):
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]])], [{"id": "a", "segs": [{"instances": [{"box": [0, 0, 2, 2]}]}]}])
    with pytest.raises(EvalInputError, match=r"instances\[0\]: no 'mask'; this task scores masks"):
        load_eval_set(g, p, need_masks=True)
    es = load_eval_set(g, p, need_masks=False)
    assert es.pairs[0][1].segs[0].instances[0].box == [0.0, 0.0, 2.0, 2.0]


def test_bad_fields_are_named(tmp_path):
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]])], [{"id": "a", "segs": [{"instances": [{"mask": rle(rect(0, 0, 1, 1)), "box": [1, 2, 3]}]}]}])
    with pytest.raises(EvalInputError, match=r"segs\[0\].instances\[0\].box: a box must be"):
        load_eval_set(g, p)
    g, p = _files(tmp_path, [gt("a", [[rect(0, 0, 2, 2)]])], [{"segs": []}])
    with pytest.raises(EvalInputError, match=r"pred.jsonl:1: record has no 'id'"):
        load_eval_set(g, p)


def test_missing_file_and_empty_gt(tmp_path):
    with pytest.raises(EvalInputError, match="no such file"):
        load_eval_set(tmp_path / "nope.jsonl", tmp_path / "nope2.jsonl")
    (tmp_path / "gt.jsonl").write_text("\n")
    (tmp_path / "pred.jsonl").write_text(json.dumps({"id": "a"}) + "\n")
    with pytest.raises(EvalInputError, match="no records"):
        load_eval_set(tmp_path / "gt.jsonl", tmp_path / "pred.jsonl")


def test_no_target_flag(tmp_path):
    g, p = _files(
        tmp_path,
        [gt("a", [[rect(0, 0, 2, 2)]] * 3)],
        [pred("a", [seg(rect(0, 0, 2, 2), exists=0.4), seg(rect(0, 0, 2, 2), exists=0.5), {"instances": [], "exists": 0.99}])],
    )
    s = load_eval_set(g, p).pairs[0][1].segs
    assert [x.no_target for x in s] == [True, False, True]
    assert s[0].target_mask is None and s[0].mask is not None and s[1].target_mask is not None
