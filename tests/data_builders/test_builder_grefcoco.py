"""gRefCOCO, R-RefCOCO and Ref-ZOM builders: several targets, no target, crowd, per-sentence existence."""

from __future__ import annotations

import numpy as np
import pytest
from builder_fixtures import coco_decode, poly_rect, read_jsonl, refer_fixture

from data_builders.__main__ import main
from fclm.data.schema import validate_record
from fclm.masks import decode_rle


@pytest.fixture
def refer_root(tmp_path):
    return tmp_path / "refer"

CROWD = {"id": 103, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 30, 10, 5], "segmentation": [poly_rect(0, 30, 10, 5)]}


def test_grefcoco_multi_and_no_target(refer_root, tmp_path):
    refs = [
        {"ref_id": 0, "ann_id": [101, 102, 103], "image_id": 1, "category_id": [1, 2], "split": "train",
         "sentences": [{"sent_id": 0, "sent": "everything"}]},
        {"ref_id": 1, "ann_id": [-1], "image_id": 1, "category_id": [-1], "split": "val",
         "sentences": [{"sent_id": 1, "sent": "the dog"}, {"sent_id": 2, "sent": "a cat"}]},
        {"ref_id": 2, "ann_id": 201, "image_id": 2, "category_id": 1, "split": "val", "sentences": [{"sent_id": 3, "sent": "person"}]},
    ]
    fx = refer_fixture(refer_root, dataset="grefcoco", refs_name="grefs(unc).json", refs=refs, extra_anns=[CROWD], as_json=True)
    out = tmp_path / "g.jsonl"
    assert main(["grefcoco", "--root", str(refer_root), "--out", str(out)]) == 0
    recs = {r["meta"]["sent_id"]: r for r in read_jsonl(out)}
    assert len(recs) == 4 and all(r["task"] == "gres" for r in recs.values())
    multi = recs[0]["targets"][0]
    assert len(multi["masks"]) == 2  # the crowd annotation is left out, as in ReLA
    for rle, ann_id in zip(multi["masks"], [101, 102]):
        ann = fx["anns"][ann_id]
        assert np.array_equal(decode_rle(rle), coco_decode(ann["segmentation"], 40, 60))
    for sid in (1, 2):
        assert recs[sid]["targets"] == [{"masks": [], "boxes": []}]
        assert recs[sid]["meta"]["no_target"] is True and recs[sid]["meta"]["ref_id"] == 1
    assert len(recs[3]["targets"][0]["masks"]) == 1  # a plain int ann_id works too
    for r in recs.values():
        assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
    out2 = tmp_path / "grec.jsonl"
    assert main(["grefcoco", "--root", str(refer_root), "--out", str(out2), "--task", "grec", "--split", "val"]) == 0
    assert [r["task"] for r in read_jsonl(out2)] == ["grec"] * 3


def test_rrefcoco_negative_sentences_get_empty_targets(refer_root, tmp_path):
    refs = [
        {"ref_id": 5, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "val",
         "sentences": [{"sent_id": 0, "sent": "left man", "exist": True}, {"sent_id": 1, "sent": "the purple giraffe", "exist": False},
                       {"sent_id": 2, "sent": "man"}]},
    ]
    fx = refer_fixture(refer_root, dataset="rrefcoco", refs=refs)
    out = tmp_path / "r.jsonl"
    assert main(["rrefcoco", "--root", str(refer_root), "--out", str(out)]) == 0
    recs = {r["meta"]["sent_id"]: r for r in read_jsonl(out)}
    assert {r["meta"]["ref_id"] for r in recs.values()} == {5}  # the official scoring unit
    assert recs[1]["targets"] == [{"masks": [], "boxes": []}] and recs[1]["meta"]["exist"] is False
    for sid in (0, 2):
        assert recs[sid]["meta"]["exist"] is True
        want = coco_decode(fx["anns"][101]["segmentation"], 40, 60)
        assert np.array_equal(decode_rle(recs[sid]["targets"][0]["masks"][0]), want)


def test_refzom_zero_one_many(refer_root, tmp_path, capsys):
    refs = [
        {"ref_id": 0, "ann_id": [101, 102], "image_id": 1, "category_id": 1, "split": "test", "source": "many", "sentences": [{"sent_id": 0, "sent": "two things"}]},
        {"ref_id": 1, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "test", "source": "one", "sentences": [{"sent_id": 1, "sent": "a man"}]},
        {"ref_id": 2, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "test", "source": "zero", "sentences": [{"sent_id": 2, "sent": "a unicorn"}]},
        {"ref_id": 3, "ann_id": [101], "image_id": 1, "category_id": 1, "split": "test", "source": "many", "sentences": [{"sent_id": 3, "sent": "x"}]},
    ]
    refer_fixture(refer_root, dataset="ref-zom", refs_name="refs(final).p", refs=refs)
    out = tmp_path / "z.jsonl"
    assert main(["refzom", "--root", str(refer_root), "--out", str(out)]) == 0
    recs = {r["meta"]["sent_id"]: r for r in read_jsonl(out)}
    assert sorted(recs) == [0, 1, 2]
    assert [len(recs[i]["targets"][0]["masks"]) for i in (0, 1, 2)] == [2, 1, 0]
    assert [recs[i]["meta"]["zom"] for i in (0, 1, 2)] == ["many", "one", "zero"]
    text = capsys.readouterr().out
    assert "1 problem(s)" in text and "ref_id=3" in text and "source 'many' but 1 annotation(s)" in text
