"""fclm.inference.predict_records: prompts cut from records, batched answers equal one-by-one, bad records skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fclm.inference import SamplingConfig, predict_records, prompt_record
from fclm.io import ErrorReport
from fclm.masks import decode_rle, encode_mask


def _record(rid: str, image: str, h: int, w: int, question: str = "Please segment: the box.") -> dict:
    m = np.zeros((h, w), bool)
    m[5:20, 10:30] = True
    rec = {
        "id": rid,
        "image": image,
        "task": "dlres",
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "[SEG]"}],
        "regions": [{"mask": encode_mask(m), "target_index": 0, "in_prompt": False}],
        "targets": [{"masks": [encode_mask(m)], "boxes": [[10, 5, 30, 20]]}],
    }
    if "<region>" in question:
        rec["regions"].append({"mask": encode_mask(m)})
    return rec


def test_prompt_record_drops_the_answer_targets_and_pair_only_regions():
    rec = _record("a", "x.png", 40, 50)
    prompt = prompt_record(rec)
    assert prompt["messages"] == [rec["messages"][0]]
    assert prompt["targets"] == [] and prompt["regions"] == []
    with pytest.raises(ValueError, match="no user turn"):
        prompt_record({"id": "b", "messages": [{"role": "assistant", "content": "hi"}]})


@pytest.fixture
def image_dir(tmp_path, image):
    image.save(tmp_path / "img.png")
    image.transpose(0).resize((60, 30)).save(tmp_path / "wide.png")
    return tmp_path


def _records() -> list[dict]:
    questions = ["Please segment: the box.", "What is <region>? Answer with a long and detailed sentence.",
                 "Segment it.", "Which object is <region> and where is it in the picture?", "Find the red one."]
    return [_record(f"r{i}", "img.png" if i % 2 else "wide.png", 40 if i % 2 else 30, 50 if i % 2 else 60, q)
            for i, q in enumerate(questions)]


@pytest.mark.parametrize("model_name", ["tiny_model", "seg_model"])
def test_batched_predictions_equal_one_by_one(model_name, image_dir, request):
    model = request.getfixturevalue(model_name)
    sampling = SamplingConfig(max_new_tokens=12)
    one = list(predict_records(model, _records(), image_dir, batch_size=1, sampling=sampling))
    batched = list(predict_records(model, _records(), image_dir, batch_size=3, sampling=sampling))
    assert [p["id"] for p in one] == [f"r{i}" for i in range(5)] == [p["id"] for p in batched]
    for a, b in zip(one, batched):
        assert a["text"] == b["text"] and len(a["segs"]) == len(b["segs"])
        for sa, sb in zip(a["segs"], b["segs"]):
            assert len(sa["instances"]) == len(sb["instances"])
            for ia, ib in zip(sa["instances"], sb["instances"]):
                ma, mb = decode_rle(ia["mask"]), decode_rle(ib["mask"])
                assert (ma != mb).mean() < 1e-3 and ia["score"] == pytest.approx(ib["score"], abs=1e-4)
    if model_name == "seg_model":
        assert all(p["text"] == "[SEG]" and p["segs"][0]["instances"] for p in one)
        assert decode_rle(one[0]["segs"][0]["instances"][0]["mask"]).shape == (30, 60)
    json.dumps(one)  # the eval format is plain JSON


def test_bad_records_are_reported_and_skipped(tiny_model, image_dir):
    good = _record("good", "img.png", 40, 50)
    missing = _record("missing-image", "nope.png", 40, 50)
    wrong_size = _record("wrong-size", "img.png", 30, 30, "Describe <region>.")
    bad_head = {**_record("bad-head", "img.png", 40, 50), "head": "c3vg"}
    report = ErrorReport()
    preds = list(predict_records(tiny_model, [missing, good, wrong_size, bad_head], image_dir,
                                 sampling=SamplingConfig(max_new_tokens=2), report=report, batch_size=2))
    assert [p["id"] for p in preds] == ["good"]
    assert report.count == 3
    text = report.summary()
    assert "missing-image" in text and "wrong-size" in text and "head 'c3vg'" in text
    with pytest.raises((OSError, ValueError), match="missing-image|nope.png"):
        list(predict_records(tiny_model, [missing], image_dir))
