"""gcg builder: GranD-f training layout (character spans) and evaluation layout (COCO caption + masks)."""

from __future__ import annotations

import json

import numpy as np
from builder_fixtures import read_jsonl, rle_of, write_image

from data_builders.__main__ import main
from data_builders.gcg import tag_caption
from fclm.data.schema import validate_record
from fclm.data.templates import gcg_phrases
from fclm.masks import decode_rle


def masks():
    a, b, c = (np.zeros((20, 30), bool) for _ in range(3))
    a[2:8, 2:10] = True
    b[10:18, 12:20] = True
    c[10:18, 22:28] = True
    return a, b, c


def test_tag_caption():
    text, phrases = tag_caption("A man walks a dog.", [(0, 5), (12, 17)])
    assert text == "<p>A man</p> [SEG] walks <p>a dog</p> [SEG]."
    assert phrases == ["A man", "a dog"] == gcg_phrases(text)


def test_train_layout(tmp_path, capsys):
    write_image(tmp_path / "imgs" / "x.jpg", 20, 30)
    a, b, c = masks()
    caption = "A man walks two dogs in a park."
    data = [
        {"file_name": "x.jpg", "caption": caption,
         "groundings": {"two dogs": {"token_positives": [12, 20], "rle_masks": [rle_of(b), rle_of(c)]},
                        "A man": {"token_positives": [0, 5], "rle_masks": [rle_of(a)]}}},
        {"file_name": "x.jpg", "caption": caption,
         "groundings": {"man": {"token_positives": [2, 5], "rle_masks": [rle_of(a)]}, "A man walks": {"token_positives": [0, 11], "rle_masks": [rle_of(b)]}}},
        {"file_name": "missing.jpg", "caption": caption, "groundings": {}},
    ]
    ann = tmp_path / "GranDf_HA_GCG_train.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "gcg.jsonl"
    assert main(["gcg", "--ann", str(ann), "--image-root", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    (r,) = read_jsonl(out)
    assert r["task"] == "gcg"
    assert r["messages"][1]["content"] == "<p>A man</p> [SEG] walks <p>two dogs</p> [SEG] in a park."
    assert r["meta"]["phrases"] == ["A man", "two dogs"]
    assert np.array_equal(decode_rle(r["targets"][0]["masks"][0]), a)
    assert np.array_equal(decode_rle(r["targets"][1]["masks"][0]), b | c)  # a phrase's masks are merged, as GLaMM trains
    assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
    text = capsys.readouterr().out
    assert "2 problem(s)" in text and "GranDf_HA_GCG_train.json[1]" in text and "overlaps" in text and "image not found" in text


def test_eval_layout(tmp_path):
    write_image(tmp_path / "imgs" / "y.jpg", 20, 30)
    a, b, _ = masks()
    cap = {"images": [{"id": 5, "file_name": "y.jpg", "height": 20, "width": 30}],
           "annotations": [{"id": 1, "image_id": 5, "caption": "A cat sits next to a box.", "labels": ["a cat", "a box"]}]}
    msk = {"images": cap["images"], "annotations": [{"id": 11, "image_id": 5, "segmentation": rle_of(a), "category_id": 1},
                                                   {"id": 12, "image_id": 5, "segmentation": rle_of(b), "category_id": 1}]}
    (tmp_path / "cap.json").write_text(json.dumps(cap))
    (tmp_path / "msk.json").write_text(json.dumps(msk))
    out = tmp_path / "val.jsonl"
    assert main(["gcg", "--caption-gt", str(tmp_path / "cap.json"), "--mask-gt", str(tmp_path / "msk.json"),
                 "--image-root", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    (r,) = read_jsonl(out)
    assert r["messages"][1]["content"] == "<p>A cat</p> [SEG] sits next to <p>a box</p> [SEG]."
    assert np.array_equal(decode_rle(r["targets"][1]["masks"][0]), b)
