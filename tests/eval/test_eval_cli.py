"""``fclm-eval`` (python -m eval): outputs of ``score`` and ``dlc-bench``, and clean errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "metrics"))
from metrics_testkit import FakeJudge, gt, pred, rect, seg, write_jsonl  # noqa: E402

from eval.__main__ import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
A = rect(0, 0, 4, 5)
B = rect(2, 0, 6, 5)


def _files(tmp_path, gts=None, preds=None):
    gts = gts if gts is not None else [gt("a", [[A]]), gt("b", [[A]]), gt("c", [[]])]
    preds = preds if preds is not None else [pred("a", [seg(B)]), pred("c")]
    return write_jsonl(tmp_path / "gt.jsonl", gts), write_jsonl(tmp_path / "pred.jsonl", preds)


def _fail(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("fclm-eval: error: ") and err.count("\n") == 1
    return err


def test_score_writes_outputs_and_plot(tmp_path, capsys):
    g, p = _files(tmp_path)
    out = tmp_path / "out"
    assert main(["score", "--task", "res", "--gt", str(g), "--pred", str(p), "--out", str(out), "--plot"]) == 0
    printed = capsys.readouterr().out
    assert "| giou |" in printed and "1 without prediction" in printed
    s = json.loads((out / "summary.json").read_text())
    eps = 1e-5
    assert s["giou"] == pytest.approx((10 / (30 + eps) + 0 + 1) / 3) and s["ciou"] == pytest.approx(10 / 50, abs=1e-9)
    assert s["n_samples"] == 3 and s["n_missing_pred"] == 1 and s["missing_pred_ids"] == ["b"]
    assert any("1 GT record(s) have no prediction" in n for n in s["notes"])
    rows = [json.loads(line) for line in (out / "per_sample.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[1]["missing_seg"] is True
    assert (out / "summary.md").read_text().startswith("# res")
    assert (out / "hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_task_runs_from_the_cli(tmp_path, capsys):
    meta = {"ref_id": 1, "phrases": ["thing"]}
    g = [gt("a", [[A]], meta=meta, answer="<p>thing</p> [SEG]"), gt("b", [[]], meta=meta, answer="<p>thing</p> [SEG]")]
    p = [pred("a", [seg(B, scores=[0.9])], text="<p>thing</p> [SEG]"), pred("b")]
    gp, pp = _files(tmp_path, g, p)
    want = {"dlres": "giou", "rec": "acc_05", "gres": "n_acc", "grec": "f1score_giou", "rrefcoco": "mrr", "refzom": "acc", "muse": "ciou", "gcg": "ap50"}
    for task, key in want.items():
        extra = ["--no-caption-metrics"] if task == "gcg" else []
        # REC refers to one object and MUSE targets are objects: neither has an empty target
        gp, pp = _files(tmp_path, g[:1], p[:1]) if task in ("rec", "muse") else _files(tmp_path, g, p)
        assert main(["score", "--task", task, "--gt", str(gp), "--pred", str(pp), "--out", str(tmp_path / task), *extra]) == 0, task
        s = json.loads((tmp_path / task / "summary.json").read_text())
        assert s["task"] == task and 0.0 <= s[key] <= 1.0, (task, s)
    capsys.readouterr()


def test_unknown_prediction_ids_are_listed(tmp_path, capsys):
    g, p = _files(tmp_path, preds=[pred("a"), pred("x9"), pred("x10")])
    err = _fail(capsys, ["score", "--task", "res", "--gt", str(g), "--pred", str(p), "--out", str(tmp_path / "o")])
    assert "2 prediction id(s) not in" in err and "'x9', 'x10'" in err


def test_duplicate_id(tmp_path, capsys):
    g, p = _files(tmp_path, preds=[pred("a"), pred("a")])
    err = _fail(capsys, ["score", "--task", "gres", "--gt", str(g), "--pred", str(p), "--out", str(tmp_path / "o")])
    assert f"{p}:2: duplicate id 'a' (first at line 1)" in err


def test_malformed_line(tmp_path, capsys):
    g, p = _files(tmp_path)
    with open(g, "a") as f:
        f.write("not json\n")
    err = _fail(capsys, ["score", "--task", "res", "--gt", str(g), "--pred", str(p), "--out", str(tmp_path / "o")])
    assert f"{g}:4: malformed JSON" in err


def test_mask_size_mismatch_names_the_id(tmp_path, capsys):
    g, p = _files(tmp_path, preds=[pred("a", [seg(np.ones((4, 4), dtype=bool))])])
    err = _fail(capsys, ["score", "--task", "refzom", "--gt", str(g), "--pred", str(p), "--out", str(tmp_path / "o")])
    assert "(id 'a'): segs[0].instances[0].mask has size [4, 4], but the image size is [10, 10]" in err


def test_missing_file_and_bad_arguments(tmp_path, capsys):
    err = _fail(capsys, ["score", "--task", "res", "--gt", str(tmp_path / "none.jsonl"), "--pred", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")])
    assert "none.jsonl: no such file" in err
    with pytest.raises(SystemExit) as e:
        main(["score", "--task", "nope", "--gt", "a", "--pred", "b", "--out", "c"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["dlc-bench", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "give --captions, --bench, --endpoint and --model" in capsys.readouterr().err


def test_no_traceback_across_the_process_boundary(tmp_path):
    g, p = _files(tmp_path, preds=[pred("zz")])
    proc = subprocess.run(
        [sys.executable, "-m", "eval", "score", "--task", "res", "--gt", str(g), "--pred", str(p), "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "prediction id(s) not in" in proc.stderr


def test_dlc_bench_live_and_replay(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    qa = {"k": [{"question": "Q", "choices": [["Absent.", 0], ["Present.", 1]], "type": "positive"}, {"question": "N", "choices": [["Wrong.", -1], ["Fine.", 1]], "type": "negative"}]}
    (bench / "qa.json").write_text(json.dumps(qa))
    (bench / "class_names.json").write_text(json.dumps({"k": "cat"}))
    (tmp_path / "caps.json").write_text(json.dumps({"k": "A grey cat."}))
    server = FakeJudge()
    try:
        argv = ["dlc-bench", "--captions", str(tmp_path / "caps.json"), "--bench", str(bench), "--endpoint", server.endpoint, "--model", "m", "--out", str(tmp_path / "live")]
        assert main(argv) == 0
    finally:
        server.close()
    s = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert (s["pos"], s["neg"], s["avg"]) == (1.0, 1.0, 1.0) and len(server.requests) == 3
    assert main(["dlc-bench", "--replay", str(tmp_path / "live" / "eval_cache.json"), "--out", str(tmp_path / "replay")]) == 0
    r = json.loads((tmp_path / "replay" / "summary.json").read_text())
    assert (r["pos"], r["neg"], r["avg"]) == (1.0, 1.0, 1.0)
    assert "| avg |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{oops")
    err = _fail(capsys, ["dlc-bench", "--replay", str(tmp_path / "bad.json"), "--out", str(tmp_path / "r2")])
    assert "bad.json:1: malformed JSON" in err
