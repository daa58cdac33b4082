"""Hostile or broken inputs to ``fclm-eval score``: never a hang, a crash or a traceback — one line
``fclm-eval: error: FILE:LINE (id …): …`` and exit code 2.

The truncated-RLE cases run in a child process with a timeout: pycocotools' ``merge`` never returns
on run lengths that do not cover H×W, and reads past the end of a string whose last run is cut off.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metrics_testkit import gt, pred, rect, rle, seg, write_jsonl  # noqa: E402

from eval.__main__ import main  # noqa: E402
from fclm.masks import encode_mask  # noqa: E402
from fclm.metrics import rle as R  # noqa: E402
from fclm.metrics.io import EvalInputError, load_eval_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
A = rect(0, 0, 4, 5)


def _blob(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) < 0.05
    m[5:15, 7:30] = True
    return m


def _score_child(tmp_path: Path, gts: list, preds: list, task: str = "res", timeout: float = 30) -> subprocess.CompletedProcess:
    g = write_jsonl(tmp_path / "gt.jsonl", gts)
    p = write_jsonl(tmp_path / "pred.jsonl", preds)
    try:
        return subprocess.run(
            [sys.executable, "-m", "eval", "score", "--task", task, "--gt", str(g), "--pred", str(p), "--out", str(tmp_path / "out")],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"fclm-eval score did not finish within {timeout} s (hang)")


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr
    assert "Traceback" not in err and err.startswith("fclm-eval: error: ") and err.count("\n") == 1, err
    return err


def _fail_in_process(tmp_path: Path, gt_text: bytes, pred_text: bytes, task: str = "res") -> str:
    (tmp_path / "gt.jsonl").write_bytes(gt_text)
    (tmp_path / "pred.jsonl").write_bytes(pred_text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["score", "--task", task, "--gt", str(tmp_path / "gt.jsonl"), "--pred", str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "o")])
    text = err.getvalue()
    assert rc == 2, text
    assert "Traceback" not in text and text.startswith("fclm-eval: error: ") and text.count("\n") == 1, text
    return text


def _lines(*recs: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in recs).encode("utf-8")


# --------------------------------------------------------------------------------------------------
# 1. RLE strings that pycocotools would loop on or read past
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_truncated_predicted_rle_is_one_error_line_not_a_hang(tmp_path, cut):
    m = _blob(cut)
    r = encode_mask(m)
    r["counts"] = r["counts"][:-cut]
    proc = _score_child(tmp_path, [gt("a", [[m]]), gt("b", [[m]])], [pred("a", [seg(m)]), {"id": "b", "segs": [{"instances": [{"mask": r}]}]}])
    err = _one_line(proc)
    assert "pred.jsonl:2 (id 'b'): segs[0].instances[0].mask: corrupt RLE counts" in err


def test_a_truncated_gt_rle_is_one_error_line_not_a_hang(tmp_path):
    m = _blob(7)
    bad = gt("a", [[m]])
    bad["targets"][0]["masks"][0]["counts"] = bad["targets"][0]["masks"][0]["counts"][:-1]
    err = _one_line(_score_child(tmp_path, [bad], [pred("a", [seg(m)])], task="gres"))
    assert "gt.jsonl:1 (id 'a'): targets[0].masks[0]: corrupt RLE counts" in err


@pytest.mark.parametrize(
    "counts, why",
    [
        ("", "runs cover 0 pixels"),  # no runs at all: merge reads cnts[0] of an empty array
        ("c", "cut off"),  # last character continues the number: pycocotools reads past the string
        ("0" * 200, "runs cover 0 pixels"),  # only zero-length runs
        ("1 2", "outside the RLE alphabet"),
        ("2" + "\x7f", "outside the RLE alphabet"),
        ("o" * 14 + "0", "longer than 8 characters"),  # one number of 15 characters (75 bits)
        ("5O", "negative"),  # a negative run
        ("T31", "runs cover 101 pixels, expected H\\*W = 100"),  # runs 100 and 1 in a 10×10 mask
        ("oooooo0", "larger than H\\*W"),  # a 7-character number: 2^30 - 1 pixels in a 10×10 mask
    ],
)
def test_check_rles_names_each_kind_of_corruption(counts, why):
    rles = [{"size": [10, 10], "counts": counts.encode("latin-1")}]
    with pytest.raises(R.RleError, match=why) as e:
        R.check_rles(rles)
    assert e.value.index == 0


def test_check_rles_areas_equal_pycocotools_and_reports_the_first_bad_index():
    from pycocotools import mask as mask_utils

    masks = [_blob(s, 30 + s, 17 + 3 * s) for s in range(40)] + [np.zeros((5, 6), bool), np.ones((5, 6), bool)]
    rles = [{"size": list(m.shape), "counts": encode_mask(m)["counts"].encode()} for m in masks]
    areas = R.check_rles(rles)
    assert areas.tolist() == [int(mask_utils.area(r)) for r in rles] == [int(m.sum()) for m in masks]
    bad = [dict(r) for r in rles]
    bad[17]["counts"] = bad[17]["counts"][:-1]
    bad[30]["counts"] = b""
    with pytest.raises(R.RleError) as e:
        R.check_rles(bad)
    assert e.value.index == 17


def test_interior_zero_runs_are_merged_not_passed_to_pycocotools(tmp_path):
    """Uncompressed counts with zero-length runs inside are valid (they cover H×W) but make pycocotools'
    merge write past its buffer; they are rewritten to the same mask without them."""
    counts = [0, 1, 0, 0, 2, 0, 0, 1]  # 2×2, column-major: fg, bg, bg, fg (with empty runs between)
    want = np.array([[1, 0], [0, 1]], dtype=bool)
    g = {**gt("a", [[want]]), "targets": [{"masks": [{"size": [2, 2], "counts": counts}], "boxes": []}]}
    es = load_eval_set(write_jsonl(tmp_path / "g.jsonl", [g]), write_jsonl(tmp_path / "p.jsonl", [pred("a", [seg(want)])]))
    t = es.pairs[0][0].targets[0]
    assert R.area(t.mask) == 2 and R.intersection(t.mask, es.pairs[0][1].segs[0].mask) == 2
    assert R.rle_runs(t.masks[0]["counts"]).tolist() == [0, 1, 2, 1]


def test_a_corrupt_mask_in_a_big_file_is_found_with_its_line(tmp_path):
    """The exact check runs over all masks of a file at once (hundreds of masks, one bad)."""
    masks = [_blob(s) for s in range(300)]
    gts = [gt(str(i), [[m]]) for i, m in enumerate(masks)]
    preds = [pred(str(i), [seg(m)]) for i, m in enumerate(masks)]
    preds[211]["segs"][0]["instances"][0]["mask"]["counts"] = preds[211]["segs"][0]["instances"][0]["mask"]["counts"][:-2]
    with pytest.raises(EvalInputError, match=r"p\.jsonl:212 \(id '211'\): segs\[0\]\.instances\[0\]\.mask: corrupt RLE counts"):
        load_eval_set(write_jsonl(tmp_path / "g.jsonl", gts), write_jsonl(tmp_path / "p.jsonl", preds))


# --------------------------------------------------------------------------------------------------
# 2. Other hostile input: one line naming file:line, never a traceback
# --------------------------------------------------------------------------------------------------


def _gt_with_polygon(poly_json: str) -> bytes:
    r = gt("a", [[A]])
    r["targets"][0]["masks"].append("POLY")
    return json.dumps(r).replace('"POLY"', poly_json).encode() + b"\n"


@pytest.mark.parametrize("poly", ["[[0, 0, 5, NaN, 5, 5]]", "[[0, 0, 5, Infinity, 5, 5]]", "[[0, 0, 5, 1e300, 5, 5]]", "[[0, 0, 5, 1" + "0" * 400 + ", 5, 5]]"])
def test_gt_polygon_with_non_finite_or_huge_coordinates(tmp_path, poly):
    err = _fail_in_process(tmp_path, _gt_with_polygon(poly), _lines(pred("a", [seg(A)])))
    assert "gt.jsonl:1 (id 'a'): targets[0].masks[1]: bad polygon" in err


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_deeply_nested_json(tmp_path, which):
    deep = b'{"id": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n"
    g, p = _lines(gt("a", [[A]])), _lines(pred("a", [seg(A)]))
    err = _fail_in_process(tmp_path, deep if which == "gt" else g, deep if which == "pred" else p)
    assert f"{which}.jsonl:1: JSON nested deeper than" in err


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_a_number_too_long_for_python_is_one_line(tmp_path, which):
    """``json`` raises a plain ValueError (not JSONDecodeError) for an integer of more than 4,300 digits."""
    g = _lines(gt("a", [[A]]), gt("b", [[A]]))
    p = _lines(pred("a", [seg(A)]), pred("b", [seg(A)]))
    huge = ("1" * 5000).encode()
    if which == "gt":
        g = g.replace(b'"id": "b"', b'"id": ' + huge)
    else:
        p = p.replace(b'"id": "b"', b'"id": ' + huge)
    err = _fail_in_process(tmp_path, g, p)
    assert f"{which}.jsonl:2: " in err and "digits" in err


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_invalid_utf8_is_fatal_and_says_so(tmp_path, which):
    g, p = _lines(gt("a", [[A]])), _lines(pred("a", [seg(A)]))
    bad = b'{"id": "b", "text": "caf\xe9"}\n'
    if which == "gt":
        g += bad
    else:
        p += bad
    err = _fail_in_process(tmp_path, g, p)
    assert f"{which}.jsonl:2: invalid UTF-8" in err
    assert "skipped" not in err  # scoring stops: it does not skip a line


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_lone_surrogates_are_one_line(tmp_path, which):
    g, p = _lines(gt("a", [[A]])), _lines(pred("a", [seg(A)], text="x"))
    if which == "gt":
        g = g.replace(b'"content": "q"', b'"content": "\\ud800"')
    else:
        p = p.replace(b'"text": "x"', b'"text": "\\udfff"')
    err = _fail_in_process(tmp_path, g, p)
    assert f"{which}.jsonl:1: a lone UTF-16 surrogate" in err


@pytest.mark.parametrize("size", ["[-10, 10]", "[10, -10]", "[0, 10]", "[Infinity, 10]", "[NaN, 10]", "[1e400, 10]", "[10.0, 10]", "[1099511627776, 1099511627776]", "[true, 10]"])
@pytest.mark.parametrize("which", ["gt", "pred"])
def test_bad_mask_sizes(tmp_path, which, size):
    g, p = _lines(gt("a", [[A]])), _lines(pred("a", [seg(A)]))
    if which == "gt":
        g = g.replace(b'"size": [10, 10]', b'"size": ' + size.encode())
    else:
        p = p.replace(b'"size": [10, 10]', b'"size": ' + size.encode())
    err = _fail_in_process(tmp_path, g, p)
    assert f"{which}.jsonl:1 (id 'a'): " in err


@pytest.mark.parametrize(
    "task, field, value",
    [
        ("grec", "score", "NaN"), ("grec", "score", "Infinity"), ("rec", "score", "-Infinity"), ("grec", "score", "1e400"),
        ("gres", "exists", "NaN"), ("res", "exists", "Infinity"),
        ("rec", "box", "[0, 0, NaN, 1]"), ("grec", "box", "[0, 0, Infinity, 1]"),
    ],
)  # fmt: skip
def test_non_finite_prediction_numbers_are_rejected(tmp_path, task, field, value):
    inst = {"mask": rle(A), "box": [0.0, 0.0, 4.0, 5.0], "score": 0.9}
    s = {"instances": [inst], "exists": 0.9}
    text = json.dumps({"id": "a", "text": "", "segs": [s]})
    target = {"score": '"score": 0.9', "exists": '"exists": 0.9', "box": '"box": [0.0, 0.0, 4.0, 5.0]'}[field]
    text = text.replace(target, f'"{field}": {value}')
    err = _fail_in_process(tmp_path, _lines(gt("a", [[A]])), text.encode() + b"\n", task=task)
    assert "pred.jsonl:1 (id 'a'): segs[0]" in err and "finite" in err


def test_non_finite_gt_box_is_rejected(tmp_path):
    g = _lines(gt("a", [[A]], boxes=[[[0, 0, 4, 5]]])).replace(b"4.0", b"NaN")
    err = _fail_in_process(tmp_path, g, _lines(pred("a", [seg(A, scores=[0.9])])), task="grec")
    assert "gt.jsonl:1 (id 'a'): targets[0].boxes[0]" in err and "finite" in err


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    (tmp_path / "gt.jsonl").write_bytes(_lines(gt("a", [[A]])))
    (tmp_path / "pred.jsonl").write_bytes(_lines(pred("a", [seg(A)])))
    (tmp_path / "file").write_text("x")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["score", "--task", "res", "--gt", str(tmp_path / "gt.jsonl"), "--pred", str(tmp_path / "pred.jsonl"), "--out", str(tmp_path / "file" / "sub")])
    assert rc == 2 and err.getvalue().startswith("fclm-eval: error: ") and err.getvalue().count("\n") == 1, err.getvalue()


def test_check_rles_agrees_with_the_per_mask_reference_on_random_corruptions():
    """``check_rles`` (vectorised over many masks) accepts exactly the strings whose runs, read one
    mask at a time by ``fclm.masks.rle_run_lengths``, are non-negative and cover H×W, and gives
    their areas; checked on 600 mutated strings, one at a time and all in one batch."""
    from fclm.masks import rle_run_lengths

    rng = np.random.default_rng(0)
    alphabet = bytes(range(48, 112))
    cases = []
    for s in range(600):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        m = rng.random((h, w)) < rng.random()
        counts = bytearray(encode_mask(m)["counts"].encode())
        kind = s % 4
        if kind == 1 and counts:  # cut
            del counts[-int(rng.integers(1, len(counts) + 1)) :]
        elif kind == 2 and counts:  # replace one character by another of the alphabet
            counts[int(rng.integers(len(counts)))] = alphabet[int(rng.integers(len(alphabet)))]
        elif kind == 3:  # insert one character
            counts.insert(int(rng.integers(len(counts) + 1)), alphabet[int(rng.integers(len(alphabet)))])
        cases.append({"size": [h, w], "counts": bytes(counts)})

    def reference(r: dict) -> int | None:
        runs = rle_run_lengths(r["counts"])
        if (runs < 0).any() or int(runs.sum()) != r["size"][0] * r["size"][1]:
            return None
        return int(runs[1::2].sum())

    n_valid = 0
    for r in cases:
        want = reference(r)
        try:
            got = int(R.check_rles([dict(r)])[0])
        except R.RleError:
            got = None
        assert got == want, (r, got, want)
        n_valid += want is not None
    assert 150 < n_valid < 600  # both outcomes are exercised
    good = [dict(r) for r in cases if reference(r) is not None]
    assert R.check_rles(good).tolist() == [reference(r) for r in good]
    for bad_at in (0, 7, len(cases) - 1):
        batch = [dict(r) for r in good]
        bad = next(dict(r) for r in cases if reference(r) is None)
        batch.insert(min(bad_at, len(batch)), bad)
        with pytest.raises(R.RleError) as e:
            R.check_rles(batch)
        assert e.value.index == min(bad_at, len(batch) - 1)
