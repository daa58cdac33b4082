"""``fclm-chat`` (infer/chat.py): a scripted conversation through ``python -m infer.chat``, one-shot
questions with every region option, and one-line errors (``error: …`` in the conversation, which goes
on; ``fclm-chat: error: …`` with exit code 2 on the command line)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fclm.masks import decode_rle
from infer.chat import main, parse_box, parse_point, parse_scribble

ROOT = Path(__file__).resolve().parents[2]
H, W = 40, 50


def _png(path: Path, h: int = H, w: int = W, seed: int = 0) -> Path:
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)).save(path)
    return path


def _assert_masks_fit(payload: dict, h: int, w: int) -> None:
    masks = [i["mask"] for s in payload["segs"] for i in s["instances"]] + [r["mask"] for r in payload.get("regions", [])]
    assert masks
    for rle in masks:
        assert decode_rle(rle).shape == (h, w)


def _assert_png(path: Path, h: int, w: int) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= w and im.height > h


def _fail(capsys: pytest.CaptureFixture, argv: list[str], match: str | tuple[str, ...], *, before_load: bool = True) -> None:
    """Exit 2 with one ``fclm-chat: error:`` line; mistakes found ``before_load`` leave nothing else on stderr
    (later ones follow transformers' "Loading weights" progress bar)."""
    assert main(argv, stdout=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("fclm-chat: error: ")]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert all(m in errors[0] for m in ((match,) if isinstance(match, str) else match)), err
    if before_load:
        assert err == errors[0] + "\n"


def test_a_scripted_conversation_through_python_m(seg_model_dir, tmp_path):
    first, second = _png(tmp_path / "first.png"), _png(tmp_path / "second.png", 30, 60, seed=1)
    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 5:25] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    script = [
        "/help",
        "/head sam",
        "/box 5,5,30,30",
        "What is <region>?",
        "/point 10,10",
        "/point 20,20,neg",
        "Describe <region>.",
        "/scribble 2,2;20,20;40,10",
        "Segment <region>.",
        f"/mask {tmp_path / 'mask.png'}",
        "Where is <region>?",
        f"/save {tmp_path / 'saved' / 'turn.png'}",
        "/foo",                                     # error 1
        "/head",
        "/box 1,2,x",                               # error 2
        "/box 0,0,100,100",                         # error 3
        "/box 1,1,10,10",
        "/reset",
        "What is <region>?",                        # error 4: no region pending after /reset
        f"/image {tmp_path / 'missing.png'}",       # error 5
        "Still there?",
        f"/image {second}",
        "What is this?",
        "/quit",
        "Never asked.",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "infer.chat", "--model", str(seg_model_dir), "--image", str(first)],
                         input="\n".join(script) + "\n", capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr

    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    expected = ["unknown command '/foo'", "/box: expected x1,y1,x2,y2", "lies outside the 50×40 image",
                "(pending regions: 0)", "image file not found"]
    assert len(errors) == len(expected), run.stderr
    for line, words in zip(errors, expected):
        assert words in line, line
    assert "placeholder" in errors[3]  # the predictor's own words on the mismatch

    # every command answered in order, including those after each error; /quit ends before "Never asked."
    at = 0
    for marker in ["/image PATH", "head: sam", "region 1: box [5, 5, 30, 30]", "region 1 (box): mask by SAM",
                   "region 1: points, 2 click(s) (1 negative)", "region 1 (points)", "region 1: scribble of 3 point(s)",
                   "region 1 (scribble)", "region 1: mask from", "region 1 (mask): mask as given", "saved ",
                   "head: sam (this model has sam)", "region 1: box [1, 1, 10, 10]", "new conversation; no pending regions",
                   "[SEG] 1 (sam)", f"image {second}: 60×30", "[SEG] 1 (sam)"]:
        found = run.stdout.find(marker, at)
        assert found >= 0, f"{marker!r} missing after position {at}:\n{run.stdout}"
        at = found + len(marker)
    answers = [line for line in run.stdout.splitlines() if line == "[SEG]"]  # the rigged model's answer text
    assert len(answers) == 6

    png, saved = tmp_path / "saved" / "turn.png", tmp_path / "saved" / "turn.json"
    _assert_png(png, H, W)
    payload = json.loads(saved.read_text())
    assert payload["image"] == str(first) and payload["prompt"] == "Where is <region>?"
    assert payload["text"] == "[SEG]" and payload["regions"][0]["kind"] == "mask"
    _assert_masks_fit(payload, H, W)


def test_one_shot_with_a_box_writes_the_overlay_and_json(seg_model_dir, tmp_path):
    image = _png(tmp_path / "img.png")
    out = io.StringIO()
    argv = ["--model", str(seg_model_dir), "--image", str(image), "--prompt", "What is <region>?",
            "--box", "5,5,30,30", "--out", str(tmp_path / "o.png"), "--json", str(tmp_path / "o.json")]
    assert main(argv, stdout=out) == 0
    assert out.getvalue().startswith("[SEG]\n")
    _assert_png(tmp_path / "o.png", H, W)
    payload = json.loads((tmp_path / "o.json").read_text())
    assert payload["image"] == str(image) and payload["prompt"] == "What is <region>?"
    assert payload["regions"][0]["kind"] == "box" and payload["regions"][0]["box"] == [5, 5, 30, 30]
    _assert_masks_fit(payload, H, W)


def test_one_shot_regions_follow_the_command_line_and_consecutive_points_join(seg_model_dir, tmp_path):
    image = _png(tmp_path / "img.png")
    mask = np.zeros((H, W), np.uint8)
    mask[2:9, 3:7] = 1  # any nonzero value is inside
    Image.fromarray(mask).save(tmp_path / "m.png")
    argv = ["--model", str(seg_model_dir), "--image", str(image), "--prompt", "<region>, <region> and <region>?",
            "--point", "10,10", "--point", "30,20,neg", "--scribble", "1,1;20,30", "--mask", str(tmp_path / "m.png"),
            "--json", str(tmp_path / "o.json"), "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]
    assert main(argv, stdout=io.StringIO()) == 0
    regions = json.loads((tmp_path / "o.json").read_text())["regions"]
    assert [r["kind"] for r in regions] == ["points", "scribble", "mask"]
    assert regions[0]["points"] == [[10, 10], [30, 20]] and regions[0]["labels"] == [1, 0]
    assert int(decode_rle(regions[2]["mask"]).sum()) == 7 * 4


def test_a_missing_image_is_one_error_line_and_exit_2(seg_model_dir, tmp_path, capsys):
    _fail(capsys, ["--model", str(seg_model_dir), "--image", str(tmp_path / "nope.png"), "--prompt", "Hi?"],
          "image file not found")


def test_command_line_mistakes_are_one_error_line_and_exit_2(seg_model_dir, tmp_path, capsys):
    image = str(_png(tmp_path / "img.png"))
    model = ["--model", str(seg_model_dir)]
    _fail(capsys, [*model, "--image", image, "--prompt", "<region>?", "--box", "1,2,3"], "--box 1,2,3: expected x1,y1,x2,y2")
    _fail(capsys, [*model, "--image", image, "--prompt", "<region>?", "--point", "80,5"], "outside the 50×40 image")
    _fail(capsys, [*model, "--image", image, "--prompt", "What is it?", "--box", "1,2,30,30"],
          ("placeholder", "(region options: 1)"), before_load=False)
    _fail(capsys, [*model, "--image", image, "--box", "1,2,30,30"], "--box only apply to one question")
    _fail(capsys, [*model, "--image", image, "--top-p", "0.5"], "give --temperature too")
    _fail(capsys, [*model, "--prompt", "Hi?"], "--prompt needs --image")
    _fail(capsys, ["--model", str(tmp_path / "no-model")], "no such folder")


def test_the_conversation_in_process_without_an_image_first(seg_model_dir, tmp_path, capsys):
    image = _png(tmp_path / "img.png")
    stdin = io.StringIO(f"Hello?\n/box 1,1,5,5\n/save x.png\n/image {image}\n/save x.txt\nHello?\n")
    out = io.StringIO()
    assert main(["--model", str(seg_model_dir), "--max-new-tokens", "4"], stdin=stdin, stdout=out) == 0  # EOF ends
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    expected = ["no image is set: use /image PATH first", "no image is set: use /image PATH first",
                "nothing to save: ask a question", "/save needs a path ending in .png"]
    assert len(err) == len(expected) and all(line.startswith("error: " + e) for line, e in zip(err, expected)), err
    text = out.getvalue()
    assert "> " not in text  # the prompt is only for a terminal
    assert text.count("[SEG] 1 (sam): 1 instance") == 1  # the question after /image is answered


def test_typed_regions_parse():
    assert parse_box(" 1, 2.5,3,4 ") == {"box": [1, 2.5, 3, 4]}
    assert parse_point("3,4") == ([3, 4], 1) and parse_point("3,4,neg") == ([3, 4], 0) and parse_point("3,4,POS") == ([3, 4], 1)
    assert parse_scribble("1,2;3,4;") == {"scribble": [[1, 2], [3, 4]]}
    for bad in ("1,2,3", "1,2,3,x", "nan,1,2,3"):
        with pytest.raises(ValueError, match="x1,y1,x2,y2"):
            parse_box(bad)
    with pytest.raises(ValueError, match="'neg' or 'pos'"):
        parse_point("3,4,5")
    with pytest.raises(ValueError, match="scribble point"):
        parse_scribble("1,2;3")
