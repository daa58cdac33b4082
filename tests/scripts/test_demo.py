"""scripts/demo.py end to end in its quick mode: every stage runs and the summary holds every figure."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "res_giou", "res_ciou", "res_giou_untrained", "res_giou_multi", "res_giou_all_objects_multi",
    "pos_recon_iou", "pos_recon_iou_pooled", "caption_token_f1", "caption_token_f1_constant", "roc_siou",
    "dlres_giou_stage1", "dlres_giou_stage2", "latent_cos_start", "latent_cos_end", "wall_seconds",
    "caption_size_right_frac", "caption_position_right_frac",
}
DIFFICULTY_KEYS = {"res_giou_colour_only", "res_giou_needs_shape", "res_giou_needs_size_or_position"}


def _demo_module():
    spec = importlib.util.spec_from_file_location("fclm_demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_f1_against_hand_values():
    demo = _demo_module()
    assert demo.token_f1("A red circle.", "a red circle") == 1.0
    # pred {a, blue, circle}, gt {a, red, circle, left}: 2 common → P 2/3, R 2/4 → F1 4/7
    assert math.isclose(demo.token_f1("a blue circle", "A red circle, left"), 4 / 7)
    assert demo.token_f1("", "a red circle") == 0.0


def test_caption_attributes_read_size_and_position_of_the_first_sentence():
    demo = _demo_module()
    assert demo.caption_attributes("A large red circle in the top left of the image. It is partly hidden.") == ("large", "in the top left")
    assert demo.caption_attributes("A small blue square on the right of the image.") == ("small", "on the right")
    assert demo.caption_attributes("A small blue square at the bottom of the image.") == ("small", "at the bottom")
    assert demo.caption_attributes("A red circle. It is large, in the center.") == (None, None)  # first sentence only


def test_quick_demo_writes_summary_overlays_and_exports(tmp_path):
    demo = _demo_module()
    summary = demo.main(["--quick", "--out", str(tmp_path / "demo"), "--heads"])
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    # --heads (scripts/demo.sh): the heads demo ran beside it, with the shared options, into the same folder
    heads = json.loads((tmp_path / "demo" / "heads_summary.json").read_text())
    assert heads["n_gres"] > 0 and (tmp_path / "demo" / "igvg" / "export" / "fclm_config.json").is_file()
    assert heads["c3vg_box_mask_consistency_without_consistency_loss"] is not None  # the ablation ran too
    assert "heads on held-out ShapesRef" in (tmp_path / "demo" / "heads_demo.log").read_text()
    assert on_disk["demo_and_heads_wall_seconds"] >= on_disk["wall_seconds"]
    assert KEYS | DIFFICULTY_KEYS <= set(on_disk) and on_disk["quick"] is True
    assert on_disk["threads"] == demo.DEFAULT_THREADS == 1 and on_disk["seg_query_norm"] == "none"
    for key in KEYS - {"wall_seconds", "latent_cos_start", "latent_cos_end"}:
        assert 0.0 <= on_disk[key] <= 1.0, key
    for key in DIFFICULTY_KEYS:  # None when the quick split holds no record of that difficulty
        assert on_disk[key] is None or 0.0 <= on_disk[key] <= 1.0, key
    n = on_disk["n_eval"]
    assert n["res_colour_only"] + n["res_needs_shape"] + n["res_needs_size_or_position"] == n["res"]
    assert 0 <= on_disk["caption_size_right"] <= n["region_caption"]
    assert -1.0 <= on_disk["latent_cos_start"] <= 1.0 and -1.0 <= on_disk["latent_cos_end"] <= 1.0
    assert summary["res_giou"] == on_disk["res_giou"]
    # the pooled-mask baseline is a real measurement: upsampling a 16×16 pooling of the mask
    assert on_disk["pos_recon_iou_pooled"] > 0.5
    assert on_disk["overlays"] and all(Path(p).is_file() for p in on_disk["overlays"])
    for stage in ("stage1_ground", "stage1", "stage2"):
        assert (tmp_path / "demo" / stage / "export" / "fclm_config.json").is_file()
    # stage 1 ran in two phases: RES only, then the mixture from that phase's export
    ground = yaml.safe_load((tmp_path / "demo" / "stage1_ground" / "config.yaml").read_text())
    assert [Path(src["path"]).name for src in ground["data"]["train"]] == ["train_res.jsonl"]
    mixture = yaml.safe_load((tmp_path / "demo" / "stage1" / "config.yaml").read_text())
    assert mixture["init_from"] == str(tmp_path / "demo" / "stage1_ground" / "export")
    # the reconstruction warm-up runs before the mixture, after the RES-only phase that would undo it
    assert ground["recon_warmup"]["steps"] == 0
    assert len(mixture["data"]["train"]) > 1 and mixture["recon_warmup"]["steps"] == 4
    assert ground["max_steps"] + mixture["max_steps"] == 4
    assert (tmp_path / "demo" / "eval" / "run_final_res" / "summary.json").is_file()
    # the one-shot chat example a user would get
    chat = json.loads((tmp_path / "demo" / "chat_example.json").read_text())
    assert Path(on_disk["chat_example"]["png"]).is_file() and "text" in chat and "segs" in chat
    # the printed command reproduces the reported RES figure
    from eval.__main__ import main as eval_main

    argv = on_disk["res_command"].split()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "rerun")
    assert eval_main(argv) == 0
    assert json.loads((tmp_path / "rerun" / "summary.json").read_text())["giou"] == on_disk["res_giou"]
