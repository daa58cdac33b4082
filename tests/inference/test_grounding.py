"""Teacher-forced grounding (fclm.inference.grounding) and the contract's reading of head outputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fclm.inference.grounding import ground_records
from fclm.io import ErrorReport
from fclm.masks import decode_mask
from fclm.model.heads.base import Detections, default_detections


def test_default_detections_thresholds_candidates_and_obeys_no_target() -> None:
    preds = {
        "pred_masks": torch.randn(2, 3, 8, 8),
        "pred_scores": torch.tensor([[0.9, 0.2, 0.75], [0.95, 0.9, 0.1]]),
        "pred_boxes": torch.rand(2, 3, 4),
        "pred_exists": torch.tensor([2.0, -2.0]),
    }
    d0 = default_detections(preds, 0, 0.7)
    assert d0.masks.shape == (2, 8, 8) and d0.scores.tolist() == pytest.approx([0.9, 0.75])
    torch.testing.assert_close(d0.boxes, preds["pred_boxes"][0, [0, 2]])
    assert d0.exists == pytest.approx(float(torch.sigmoid(torch.tensor(2.0))))
    d1 = default_detections(preds, 1, 0.7)  # exists < 0.5: nothing, whatever the scores
    assert d1.masks.shape[0] == 0 and d1.exists < 0.5
    one = default_detections({"pred_masks": torch.randn(2, 8, 8)}, 1, 0.7)  # the sam head's one mask per query
    assert one.masks.shape == (1, 8, 8) and one.boxes is None and one.exists is None


def test_head_boxes_are_mapped_from_the_frame_to_image_pixels(tiny_model) -> None:
    """A head's frame box (normalised to the S × S frame) lands on the image's pixels (valid area rescaled)."""
    from fclm.inference.predictor import _head_instances

    s = tiny_model.config.sam.img_size
    mask = torch.full((1, 1, s // 2, s // 2), -10.0)
    mask[0, 0, 2:6, 4:10] = 10.0

    class BoxHead(torch.nn.Module):
        def detections(self, preds, j, score_threshold):
            return Detections(masks=preds["pred_masks"][j], scores=torch.tensor([0.8]),
                              boxes=torch.tensor([[0.25, 0.125, 0.5, 0.25]]), exists=0.9)

    fake = SimpleNamespace(heads={"box": BoxHead()}, sam=tiny_model.sam, config=tiny_model.config)
    # an image of 200 × 100 (H × W) fills 112 × 56 of the 112 frame
    instances, exists = _head_instances(fake, "box", {"pred_masks": mask}, 0, torch.tensor([112, 56]), torch.tensor([200, 100]), 0.5)
    assert exists == 0.9 and len(instances) == 1
    x1, y1, x2, y2 = instances[0].box
    assert (x1, y1, x2, y2) == pytest.approx((0.25 * s / 56 * 100, 0.125 * s / 112 * 200, 0.5 * s / 56 * 100, 0.25 * s / 112 * 200))
    assert instances[0].mask.shape == (200, 100) and instances[0].score == pytest.approx(0.8)


def test_ground_records_equals_the_models_own_forward(seg_model, shapes_dir: Path) -> None:
    records = [json.loads(line) for line in open(shapes_dir / "val_res.jsonl")][:3]
    preds = list(ground_records(seg_model, records, shapes_dir, batch_size=2))
    assert [p["id"] for p in preds] == [r["id"] for r in records]
    from fclm.processor import load_image

    for record, pred in zip(records, preds):
        enc = seg_model.processor.encode_record(record, load_image(shapes_dir / record["image"]))
        batch = seg_model.processor.collate([enc])
        with torch.no_grad():
            out = seg_model(batch)
        low = out["heads"]["sam"]["pred_masks"]
        full = seg_model.sam.postprocess_masks(low, batch["sam_valid_hw"][0], batch["original_hw"][0])[0] > 0
        assert len(pred["segs"]) == 1 and pred["segs"][0]["head"] == "sam"
        inst = pred["segs"][0]["instances"]
        if full.any():
            got = decode_mask(inst[0]["mask"])
            assert (got != full.numpy()).mean() < 1e-3  # batch of 2 vs 1: float noise at the 0 threshold only
        else:
            assert inst == []


def test_ground_records_reports_and_skips_a_bad_record(seg_model, shapes_dir: Path) -> None:
    records = [json.loads(line) for line in open(shapes_dir / "val_res.jsonl")][:2]
    bad = {**records[0], "id": "bad", "image": "images/missing.png"}
    report = ErrorReport()
    preds = list(ground_records(seg_model, [bad, records[1]], shapes_dir, report=report))
    assert [p["id"] for p in preds] == [records[1]["id"]] and report.count == 1
    with pytest.raises(Exception, match="missing.png"):
        list(ground_records(seg_model, [bad], shapes_dir))


def test_eval_run_teacher_forced_scores_a_specialist_and_infer_refuses_to_generate(shapes_dir: Path, tmp_path: Path, capsys) -> None:
    from eval.__main__ import main as eval_main
    from fclm.config import model_config_from_dict
    from fclm.model.specialist import build_head_specialist
    from infer.__main__ import main as infer_main

    torch.manual_seed(0)
    build_head_specialist(model_config_from_dict({"preset": "tiny", "kind": "head_specialist"})).save_pretrained(tmp_path / "m")
    gt = shapes_dir / "val_res.jsonl"
    rc = eval_main(["run", "--model", str(tmp_path / "m"), "--task", "res", "--gt", str(gt), "--out", str(tmp_path / "ev"),
                    "--teacher-forced", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    n = sum(1 for line in open(gt) if line.strip())
    assert summary["n_samples"] == n and summary["n_missing_pred"] == 0 and 0.0 <= summary["giou"] <= 1.0
    rc = infer_main(["--model", str(tmp_path / "m"), "--data", str(gt), "--out", str(tmp_path / "p.jsonl")])
    assert rc != 0 and "add --teacher-forced" in capsys.readouterr().err
