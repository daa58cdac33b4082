"""fclm.predict: prompts cut from records, generated [SEG]s decoded to RLE masks at the original size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fclm.config import preset
from fclm.io import ErrorReport
from fclm.masks import decode_rle, encode_mask
from fclm.model import build_fclm
from fclm.predict import prompt_record, predict_records


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_fclm(preset("tiny")).eval()


def _record(rid: str, image: str, h: int, w: int) -> dict:
    m = np.zeros((h, w), bool)
    m[5:20, 10:30] = True
    return {
        "id": rid,
        "image": image,
        "task": "dlres",
        "messages": [{"role": "user", "content": "Please segment: the box."}, {"role": "assistant", "content": "[SEG]"}],
        "regions": [{"mask": encode_mask(m), "target_index": 0, "in_prompt": False}],
        "targets": [{"masks": [encode_mask(m)], "boxes": [[10, 5, 30, 20]]}],
    }


def test_prompt_record_drops_the_answer_targets_and_pair_only_regions():
    rec = _record("a", "x.png", 40, 50)
    prompt = prompt_record(rec)
    assert prompt["messages"] == [rec["messages"][0]]
    assert prompt["targets"] == [] and prompt["regions"] == []
    with pytest.raises(ValueError, match="no user turn"):
        prompt_record({"id": "b", "messages": [{"role": "assistant", "content": "hi"}]})


def test_generated_seg_tokens_become_masks_at_the_original_size(model, tmp_path, monkeypatch):
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "img.png")
    ids = model.token_ids
    answers = iter([[ids["seg"], ids["seg"], ids["im_end"]], [ids["im_end"]]])
    monkeypatch.setattr(model, "generate", lambda batch, **kw: torch.tensor([next(answers)]))
    records = [_record("two-segs", "img.png", 40, 50), _record("no-seg", "img.png", 40, 50)]
    preds = list(predict_records(model, records, tmp_path))
    assert [p["id"] for p in preds] == ["two-segs", "no-seg"]
    assert preds[0]["text"] == "[SEG][SEG]" and len(preds[0]["segs"]) == 2
    assert preds[1]["segs"] == [] and preds[1]["text"] == ""
    # each [SEG] is decoded by the sam head exactly as a teacher-forced forward gives it
    for seg in preds[0]["segs"]:
        for inst in seg["instances"]:
            mask = decode_rle(inst["mask"])
            assert mask.shape == (40, 50) and mask.any()
            ys, xs = np.nonzero(mask)
            assert inst["box"] == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    json.dumps(preds)  # the eval format is plain JSON


def test_bad_records_are_reported_and_skipped(model, tmp_path):
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / "img.png")
    good = _record("good", "img.png", 40, 50)
    missing = _record("missing-image", "nope.png", 40, 50)
    wrong_size = _record("wrong-size", "img.png", 30, 30)
    wrong_size["regions"] = []
    wrong_size["messages"][0]["content"] = "Describe <region>."
    wrong_size["regions"] = [{"mask": encode_mask(np.ones((30, 30), bool))}]
    report = ErrorReport()
    preds = list(predict_records(model, [missing, good, wrong_size], tmp_path, max_new_tokens=2, report=report))
    assert [p["id"] for p in preds] == ["good"]
    assert report.count == 2
    text = report.summary()
    assert "missing-image" in text and "wrong-size" in text
    with pytest.raises((OSError, ValueError), match="missing-image|nope.png"):
        list(predict_records(model, [missing], tmp_path))
