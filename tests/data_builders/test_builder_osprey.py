"""osprey builder: conversations with numbered regions, and detailed descriptions."""

from __future__ import annotations

import json

from builder_fixtures import poly_rect, read_jsonl, write_image

from data_builders.__main__ import main
from fclm.data.schema import placeholder_region_indices, validate_record


def test_osprey_conversation_and_description(tmp_path, capsys):
    write_image(tmp_path / "coco" / "000000000009.jpg", 30, 40)
    regions = [{"segmentation": [poly_rect(1, 1, 10, 10)]}, {"segmentation": [poly_rect(20, 5, 10, 20)]}]
    data = [
        {"file_name": "COCO_train2014_000000000009.jpg", "height": 30, "width": 40, "annotation": regions,
         "conversations": [{"from": "human", "value": "<image>\nWhat is <region2> doing next to <region1>?"},
                           {"from": "gpt", "value": "It holds <region1>."},
                           {"from": "human", "value": "Colour of <region1>?"}, {"from": "gpt", "value": "Red."},
                           {"from": "human", "value": "dangling"}]},
        {"file_name": "000000000009.jpg", "height": 30, "width": 40, "annotation": regions,
         "description": ["<region1>: A small red box.", "<region2>: A tall blue bar."]},
        {"file_name": "000000000009.jpg", "height": 30, "width": 40, "annotation": regions[:1],
         "conversations": [{"from": "human", "value": "and <region3>?"}, {"from": "gpt", "value": "?"}]},
    ]
    ann = tmp_path / "osprey_conversation.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "o.jsonl"
    assert main(["osprey", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out), "--suffix", "Be brief."]) == 0
    conv, cap1, cap2 = read_jsonl(out)
    assert conv["task"] == "conversation" and len(conv["messages"]) == 4
    assert conv["messages"][0]["content"] == (
        "There are 2 regions in the picture: region1 <region1>, region2 <region2>.\nWhat is region2 doing next to region1? Be brief."
    )
    assert conv["messages"][1]["content"] == "It holds region1."
    assert placeholder_region_indices(conv) == [0, 1]
    assert conv["image"] == "coco/000000000009.jpg"  # COCO_train2014_ prefix dropped, as Osprey reads it
    assert (cap1["task"], cap1["messages"][1]["content"]) == ("region_caption", "A small red box.")
    assert cap2["messages"][0]["content"] == "Describe <region> in detail." and cap2["regions"] == [conv["regions"][1]]
    for r in (conv, cap1, cap2):
        assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
    text = capsys.readouterr().out
    assert "1 problem(s)" in text and "osprey_conversation.json[2].conversations[0]" in text and "<region3> but 1 region(s)" in text
