"""lvis-roc builder: Osprey's evaluation layout and the LVIS instances layout."""

from __future__ import annotations

import json

import numpy as np
from builder_fixtures import coco_decode, poly_rect, read_jsonl, rle_of, write_image

from data_builders.__main__ import main
from fclm.data.schema import validate_record
from fclm.masks import decode_rle


def test_osprey_layout(tmp_path, capsys):
    write_image(tmp_path / "coco" / "val2017" / "000000000001.jpg", 30, 40)
    m = np.zeros((30, 40), bool)
    m[5:15, 5:25] = True
    data = [
        {"file_name": "val2017/000000000001.jpg", "height": 30, "width": 40, "categories": ["car_(automobile):wheel", "dog"],
         "annotations": [{"segmentation": [poly_rect(2, 2, 10, 8)]}, {"segmentation": rle_of(m)}]},
        {"file_name": "val2017/000000000001.jpg", "height": 30, "width": 40, "categories": ["cat"],
         "annotations": [{"segmentation": [[1, 1, 3, 3]]}]},  # polygon under 3 points
        {"file_name": "val2017/000000000001.jpg", "height": 30, "width": 40, "categories": ["a", "b"], "annotations": []},
    ]
    ann = tmp_path / "paco_val_1k_category.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "roc.jsonl"
    assert main(["lvis-roc", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["messages"][1]["content"] for r in recs] == ["car_(automobile):wheel", "dog"]
    assert recs[0]["messages"][0]["content"] == "What is the category of <region>? Answer with its name."
    assert recs[0]["meta"]["category"] == "car_(automobile):wheel" and recs[0]["meta"]["source"] == "paco"
    assert np.array_equal(decode_rle(recs[0]["regions"][0]["mask"]), coco_decode([poly_rect(2, 2, 10, 8)], 30, 40))
    assert np.array_equal(decode_rle(recs[1]["regions"][0]["mask"]), m)
    assert all(validate_record(r, "x", image_root=out.parent, check_images=True) == [] for r in recs)
    text = capsys.readouterr().out
    assert "2 problem(s)" in text and "paco_val_1k_category.json[1].annotations[0]" in text and "[2]: 2 categories but 0 annotations" in text


def test_lvis_instances_layout(tmp_path):
    write_image(tmp_path / "coco" / "train2017" / "000000000007.jpg", 30, 40)
    data = {
        "images": [{"id": 7, "height": 30, "width": 40, "coco_url": "http://images.cocodataset.org/train2017/000000000007.jpg"}],
        "annotations": [{"id": 70, "image_id": 7, "category_id": 3, "segmentation": [poly_rect(1, 1, 9, 9)], "bbox": [1, 1, 9, 9]}],
        "categories": [{"id": 3, "name": "teddy_bear"}],
    }
    ann = tmp_path / "lvis_v1_val.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "o" / "roc.jsonl"
    assert main(["lvis-roc", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out)]) == 0
    (r,) = read_jsonl(out)
    assert r["id"] == "lvis-roc-7-70" and r["messages"][1]["content"] == "teddy_bear"
    assert r["image"] == "../coco/train2017/000000000007.jpg"
