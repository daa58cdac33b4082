"""scripts/demo_heads.py in its quick mode: both heads train as specialists through fclm-train and are scored."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "c3vg_det_acc", "c3vg_det_acc_random_object", "c3vg_mask_giou", "c3vg_mask_giou_random_object",
    "c3vg_box_mask_consistency", "igvg_f1score", "igvg_f1score_every_object", "igvg_f1score_nothing",
    "igvg_gres_giou", "igvg_gres_giou_every_object", "igvg_gres_giou_nothing",
}


def _module():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("fclm_demo_heads", ROOT / "scripts" / "demo_heads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_box_mask_consistency_and_baselines_against_hand_values():
    import numpy as np

    from fclm.masks import encode_mask

    m = _module()
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True
    pred = {"segs": [{"instances": [{"mask": encode_mask(mask), "box": [2, 2, 6, 6]},
                                    {"mask": encode_mask(mask), "box": [2, 2, 10, 6]}]}]}
    assert m.box_mask_consistency([pred]) == (1.0 + 0.5) / 2
    objects = {"a.png": [{"mask": "m1", "box": [0, 0, 1, 1]}, {"mask": "m2", "box": [1, 1, 2, 2]}]}
    records = [{"id": "r", "image": "a.png"}]
    assert len(m.baseline(records, objects, "every")[0]["segs"][0]["instances"]) == 2
    assert m.baseline(records, objects, "nothing")[0]["segs"][0]["instances"] == []
    assert len(m.baseline(records, objects, "random")[0]["segs"][0]["instances"]) == 1


def test_quick_heads_demo_trains_both_specialists_and_writes_the_summary(tmp_path):
    m = _module()
    assert m.main(["--quick", "--out", str(tmp_path / "demo"), "--c3vg-ablation"]) == 0
    summary = json.loads((tmp_path / "demo" / "heads_summary.json").read_text())
    for key in FIGURES | {"c3vg_box_mask_consistency_without_consistency_loss"}:
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["n_gres_no_target"] >= 1 and summary["threads"] == 1
    for head in ("c3vg", "c3vg_no_consistency", "igvg"):
        assert (tmp_path / "demo" / head / "export" / "fclm_config.json").is_file()
    # the no-consistency run really trained without those terms
    cfg = json.loads((tmp_path / "demo" / "c3vg_no_consistency" / "export" / "fclm_config.json").read_text())
    assert cfg["config"]["heads"]["c3vg"]["consistency"] is False and cfg["config"]["kind"] == "head_specialist"
