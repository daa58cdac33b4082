"""fclm-infer and fclm-eval run through their real entry points: format, batching, resume after a kill,
bad records, several processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eval.__main__ import main as eval_main
from fclm.masks import decode_rle, encode_mask
from fclm.metrics import score
from infer.__main__ import main as infer_main

ROOT = Path(__file__).resolve().parents[2]


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        m = np.zeros((40, 50), bool)
        m[5 + i % 10 : 20, 10:30] = True
        q = ["Please segment: the box.", "Segment <region> please, the thing that is there.", "Find it."][i % 3]
        out.append({
            "id": f"r{i}", "image": "img.png", "task": "res",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "[SEG]"}],
            "regions": [{"mask": encode_mask(m)}] if "<region>" in q else [],
            "targets": [{"masks": [encode_mask(m)], "boxes": [[10, 5 + i % 10, 30, 20]]}],
        })
    return out


@pytest.fixture
def data(tmp_path, image) -> Path:
    image.save(tmp_path / "img.png")
    path = tmp_path / "gt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(7)))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_predictions_are_in_the_eval_format_and_batching_changes_nothing(seg_model_dir, data, tmp_path):
    one, eight = tmp_path / "b1.jsonl", tmp_path / "b8.jsonl"
    assert infer_main(["--model", str(seg_model_dir), "--data", str(data), "--out", str(one), "--batch-size", "1", "--no-progress"]) == 0
    assert infer_main(["--model", str(seg_model_dir), "--data", str(data), "--out", str(eight), "--batch-size", "8", "--no-progress"]) == 0
    a, b = _read(one), _read(eight)
    assert [p["id"] for p in a] == [f"r{i}" for i in range(7)] == [p["id"] for p in b]
    for pa, pb in zip(a, b):
        assert pa["text"] == pb["text"] == "[SEG]"
        ma, mb = decode_rle(pa["segs"][0]["instances"][0]["mask"]), decode_rle(pb["segs"][0]["instances"][0]["mask"])
        assert ma.shape == (40, 50) and (ma != mb).mean() < 1e-3
    summary = score("res", data, one, tmp_path / "scored")
    assert summary["n_samples"] == 7 and summary["n_missing_pred"] == 0


def test_a_killed_run_resumes_and_writes_each_id_once(tiny_model_dir, tmp_path, image):
    image.save(tmp_path / "img.png")
    data = tmp_path / "gt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(40)))
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "infer", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
           "--batch-size", "1", "--max-new-tokens", "24", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < 40, "the run should have been killed part-way"
    with out.open("a") as f:  # what a kill in the middle of a write would leave: half a line
        f.write('{"id": "r39", "text": "tru')
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "already in the output" in done.stderr and "incomplete last line" in done.stderr
    ids = [p["id"] for p in _read(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40)) and len(ids) == len(set(ids))
    # the same predictions as an uninterrupted run
    fresh = tmp_path / "fresh.jsonl"
    assert infer_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(fresh), "--batch-size", "1",
                       "--max-new-tokens", "24", "--no-progress"]) == 0
    by_id = {p["id"]: p["text"] for p in _read(fresh)}
    assert {p["id"]: p["text"] for p in _read(out)} == by_id


def test_bad_records_are_reported_and_skipped_with_a_count(tiny_model_dir, data, tmp_path, capsys):
    lines = data.read_text().splitlines()
    bad_region = json.loads(lines[1])
    bad_region["id"] = "bad-region"
    bad_region["regions"] = []
    missing = {**json.loads(lines[0]), "id": "missing-image", "image": "nope.png"}
    data.write_text("\n".join([lines[0], "{not json", json.dumps(bad_region), json.dumps(missing), lines[0], lines[2]]) + "\n")
    out = tmp_path / "pred.jsonl"
    assert infer_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "4 skipped" in err and "malformed JSON" in err and "bad-region" in err and "nope.png" in err and "repeats line 1" in err
    assert [p["id"] for p in _read(out)] == ["r0", "r2"]
    assert infer_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "s.jsonl"), "--strict", "--no-progress"]) == 2
    assert "fclm-infer: error:" in capsys.readouterr().err


def test_argument_errors_are_one_line(tiny_model_dir, data, tmp_path, capsys):
    assert infer_main(["--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert infer_main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert infer_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "p.jsonl"), "--head", "igvg", "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fclm-infer: error:") for line in err)
    assert "not an FCLM model directory" in err[0] and "no such file" in err[1] and "'igvg'" in err[2]


def test_eval_run_equals_infer_then_score(seg_model_dir, data, tmp_path, capsys):
    assert eval_main(["run", "--model", str(seg_model_dir), "--task", "res", "--gt", str(data), "--out", str(tmp_path / "run"),
                      "--batch-size", "4", "--no-progress"]) == 0
    ran = json.loads((tmp_path / "run" / "summary.json").read_text())
    pred = tmp_path / "pred.jsonl"
    assert infer_main(["--model", str(seg_model_dir), "--data", str(data), "--out", str(pred), "--no-progress"]) == 0
    scored = score("res", data, pred, tmp_path / "scored")
    assert ran["giou"] == pytest.approx(scored["giou"]) and ran["ciou"] == pytest.approx(scored["ciou"])
    assert ran["n_samples"] == 7 and "giou" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_under_torchrun_merge_in_input_order(tiny_model_dir, data, tmp_path):
    out = tmp_path / "pred.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "infer",
           "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "8", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged 2 shards" in done.stderr
    assert not list(tmp_path.glob("pred.jsonl.rank*"))
    single = tmp_path / "single.jsonl"
    assert infer_main(["--model", str(tiny_model_dir), "--data", str(data), "--out", str(single), "--max-new-tokens", "8", "--no-progress"]) == 0
    assert [(p["id"], p["text"]) for p in _read(out)] == [(p["id"], p["text"]) for p in _read(single)]
