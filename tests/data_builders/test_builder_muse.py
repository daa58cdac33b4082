"""muse builder: one reason_seg record per question, a target per object, text answers with {seg}."""

from __future__ import annotations

import json

import numpy as np
from builder_fixtures import coco_decode, poly_rect, read_jsonl, write_image

from data_builders.__main__ import main
from fclm.data.schema import count_seg_tokens, validate_record
from fclm.masks import decode_rle


def test_muse(tmp_path, capsys):
    root = tmp_path / "mscoco"
    write_image(root / "train2014" / "COCO_train2014_000000000001.jpg", 30, 40)
    write_image(root / "val2017" / "000000000002.jpg", 30, 40)
    o1 = {"segmentation": [poly_rect(1, 1, 10, 10)], "bbox": [1, 1, 10, 10], "category_name": "cup", "rephrased_name": "the mug"}
    o2 = {"segmentation": [poly_rect(20, 5, 10, 20)], "bbox": [20, 5, 10, 20], "category_name": "spoon"}
    data = [
        {"file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40,
         "questions": ["What would I use for tea?", "Where is nothing?", "Stir with?"],
         "answers": [[o1, o2], [], [o2]],
         "text_answers": ["You would use {seg} and {seg}.", None, "A {seg} and a {seg}."]},
        {"coco_url": "http://images.cocodataset.org/val2017/000000000002.jpg", "height": 30, "width": 40,
         "questions": ["Which?"], "answers": [[{"segmentation": [[1, 1, 2, 2]], "bbox": [1, 1, 1, 1]}]]},
    ]
    ann = tmp_path / "muse_val.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "muse.jsonl"
    assert main(["muse", "--ann", str(ann), "--image-root", str(root), "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["muse-val-0-0", "muse-val-0-1", "muse-val-0-2"]
    assert recs[0]["messages"][0]["content"] == "What would I use for tea? Please answer and segment each object you mention."
    assert recs[0]["messages"][1]["content"] == "You would use [SEG] and [SEG]."
    assert recs[1]["messages"][1]["content"] == "There is no such object in the image." and recs[1]["targets"] == []
    # the text answer has 2 {seg} for 1 object: the template answer is used instead
    assert recs[2]["messages"][1]["content"] == "spoon [SEG]."
    assert np.array_equal(decode_rle(recs[0]["targets"][0]["masks"][0]), coco_decode(o1["segmentation"], 30, 40))
    assert recs[0]["targets"][1]["boxes"] == [[20.0, 5.0, 30.0, 25.0]]
    assert recs[0]["meta"]["names"] == ["the mug", "spoon"]
    for r in recs:
        assert count_seg_tokens(r["messages"]) == len(r["targets"])
        assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
    text = capsys.readouterr().out
    assert "1 problem(s)" in text and "muse_val.json[1].questions[0].answers[0]" in text
