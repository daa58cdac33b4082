"""validate and stats commands on a file seeded with every kind of bad record."""

from __future__ import annotations

import json
import re

import numpy as np
from builder_fixtures import rle_of, write_image

from data_builders.__main__ import main
from fclm.data.schema import chat, make_record, region_entry, target_entry


def good(i: int, **kw) -> dict:
    m = np.zeros((20, 30), bool)
    m[2:9, 3:12] = True
    rec = make_record(id=f"r{i}", image="img.png", task="res", messages=chat("Please segment: it.", "[SEG]"),
                      targets=[target_entry([rle_of(m)], [[3, 2, 12, 9]])], meta={"source": "t"})
    rec.update(kw)
    return rec


def fuzz_file(tmp_path):
    write_image(tmp_path / "img.png", 20, 30)
    lines = [json.dumps(good(0))]
    bad = {
        "unknown task": good(1, task="segment_everything"),
        "missing image": good(2, image="nope.png"),
        "bad RLE": good(3, targets=[target_entry([{"size": [20, 30], "counts": "0000zz"}], [[0, 0, 1, 1]])]),
        "polygon under 3 points": good(4, targets=[{"masks": [[[1, 1, 5, 5]]], "boxes": [[1, 1, 5, 5]]}]),
        "mask/image size mismatch": good(5, targets=[target_entry([rle_of(np.ones((10, 10), bool))], [[0, 0, 10, 10]])]),
        "seg count": good(6, messages=chat("Please segment: it.", "[SEG] and [SEG]")),
        "duplicate id": good(0),
    }
    for rec in bad.values():
        lines.append(json.dumps(rec))
    lines.append('{"id": "cut", "image": "img.png", "ta')  # truncated JSON line
    lines.append(json.dumps(good(9, task="region_caption", messages=chat("Describe <region> and <region>.", "x"),
                                 targets=[], regions=[region_entry(rle_of(np.ones((20, 30), bool)), [0, 0, 30, 20])])))
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validate_reports_every_problem_with_file_and_line(tmp_path, capsys):
    path = fuzz_file(tmp_path)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "9 record(s) in 1 file(s): 1 valid" in out
    assert "9 problem(s)" in out
    expected = {
        2: "unknown task 'segment_everything'",
        3: "image not found",
        4: "bad RLE",
        5: "polygon 0 has 2 points",
        6: "has size [10, 10] but the image is [20, 30]",
        7: "2 [SEG] token(s) in the assistant turns but 1 target(s)",
        8: "id 'r0' already used on line 1",
        9: "malformed JSON",
        10: "2 <region> placeholder(s) but 1 prompt region(s)",
    }
    for line, text in expected.items():
        assert re.search(rf"fuzz\.jsonl:{line}: .*{re.escape(text)}", out), (line, text)
    # --strict stops at the first problem with exit status 2
    assert main(["validate", str(path), "--strict"]) == 2
    assert "fuzz.jsonl:2" in capsys.readouterr().err
    # without opening images, the missing file and the image-size mismatch are not found
    assert main(["validate", str(path), "--no-images"]) == 1
    out = capsys.readouterr().out
    assert "fuzz.jsonl:3" not in out and "fuzz.jsonl:6" not in out


def test_stats_table(tmp_path, capsys):
    path = fuzz_file(tmp_path)
    extra = good(11, task="gres", targets=[target_entry()])
    with open(path, "a") as f:
        f.write(json.dumps(extra) + "\n")
    js = tmp_path / "stats.json"
    assert main(["stats", str(path), "--tokenizer", "words", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^gres\s+1\s", out, re.M) and "1 problem(s)" in out  # the truncated line
    table = json.loads(js.read_text())["tasks"]
    assert table["gres"]["empty_targets"] == 1 and table["gres"]["targets"] == 1
    assert table["res"]["records"] == 7 and table["res"]["image_sizes"] == {"20x30": 5, "10x10": 1}
    # "Please segment: it." = 3 words + [SEG] = 1 token
    assert table["res"]["tokens_max"] >= 4 and table["region_caption"]["regions"] == 1
    assert main(["stats", str(path), "--tokenizer", "qwen"]) == 0
    assert "(tokens: qwen" in capsys.readouterr().out
