"""fclm.io on hostile input: bad UTF-8, lone surrogates and deep nesting cost one line, never the run."""

from __future__ import annotations

import json

import pytest

from fclm.io import ErrorReport, RecordError, iter_jsonl, read_json, write_jsonl


def lines_file(tmp_path, lines: list[bytes]):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_invalid_utf8_line_is_reported_and_the_others_kept(tmp_path):
    path = lines_file(tmp_path, [b'{"id": "a"}', b'{"id": "b\xff\xfe"}', b'{"id": "c", "t": "caf\xc3\xa9"}'])
    report = ErrorReport()
    got = [(n, r["id"]) for n, r in iter_jsonl(path, report)]
    assert got == [(1, "a"), (3, "c")]
    assert report.count == 1
    err = report.problems[0]
    assert err.where == f"{path}:2" and "UTF-8" in err.problem and "byte 9" in err.problem
    with pytest.raises(RecordError, match=r"in\.jsonl:2: .*UTF-8"):
        list(iter_jsonl(path))  # strict: the first bad line raises, naming file and line


def test_lone_surrogate_line_is_reported_and_the_others_kept(tmp_path):
    path = lines_file(tmp_path, [
        b'{"id": "a", "t": "\\ud83d\\ude00"}',  # a valid surrogate pair (an emoji) is kept
        b'{"id": "b", "t": "x\\ud800y"}',
        b'{"id": "c", "meta": {"k": ["\\uDC00"]}}',
        b'{"id": "d"}',
    ])
    report = ErrorReport()
    got = [r["id"] for _, r in iter_jsonl(path, report)]
    assert got == ["a", "d"]
    assert [e.where for e in report.problems] == [f"{path}:2", f"{path}:3"]
    assert all("surrogate" in e.problem for e in report.problems)


def test_deeply_nested_line_is_reported_not_a_recursion_error(tmp_path):
    deep = b'{"id": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    middle = b'{"id": "m", "meta": ' + b"[" * 500 + b"]" * 500 + b"}"
    path = lines_file(tmp_path, [b'{"id": "a"}', deep, middle, b'{"id": "b", "c": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}'])
    report = ErrorReport()
    got = [r["id"] for _, r in iter_jsonl(path, report)]
    assert got == ["a", "b"]  # brackets inside a string are not nesting
    assert [e.where for e in report.problems] == [f"{path}:2", f"{path}:3"]
    assert all("nested deeper than" in e.problem for e in report.problems)


def test_utf8_bom_on_the_first_line_is_accepted(tmp_path):
    path = lines_file(tmp_path, [b'\xef\xbb\xbf{"id": "a"}', b'{"id": "b"}'])
    assert [r["id"] for _, r in iter_jsonl(path)] == ["a", "b"]


def test_read_json_names_the_file_and_the_byte_of_bad_utf8(tmp_path):
    path = tmp_path / "instances.json"
    path.write_bytes(b'{"images": [\n  {"file_name": "a\xffb.jpg"}\n]}')
    with pytest.raises(RecordError) as e:
        read_json(path)
    msg = str(e.value)
    assert str(path) in msg and "UTF-8" in msg and "byte 31" in msg and "line 2" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "content, words",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"a": 1,}', "line 1"),
        (b"", "malformed JSON"),
    ],
)
def test_read_json_errors_are_one_line_naming_the_file(tmp_path, content, words):
    path = tmp_path / "annotations.json"
    path.write_bytes(content)
    with pytest.raises(RecordError) as e:
        read_json(path)
    assert str(path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_read_json_of_a_missing_file(tmp_path):
    with pytest.raises(RecordError, match="cannot read"):
        read_json(tmp_path / "nope.json")


def test_write_jsonl_skips_a_record_that_cannot_be_written(tmp_path):
    out = tmp_path / "o.jsonl"
    report = ErrorReport()
    recs = [{"id": "a"}, {"id": "b", "t": "x\ud800"}, {"id": "c", "n": float("nan")}, {"id": "d"}]
    assert write_jsonl(out, recs, report=report) == 3  # NaN is written by default (Python's JSON) …
    assert [json.loads(x)["id"] for x in out.read_text(encoding="utf-8").splitlines()] == ["a", "c", "d"]
    assert report.count == 1 and report.problems[0].where == "record 'b'" and "surrogate" in report.problems[0].problem
    report = ErrorReport()
    assert write_jsonl(out, recs, report=report, allow_nan=False) == 2  # … and refused in strict JSON
    assert [e.where for e in report.problems] == ["record 'b'", "record 'c'"] and "NaN" in report.problems[1].problem
    with pytest.raises(RecordError, match="record 'b'"):
        write_jsonl(tmp_path / "strict.jsonl", recs)
    assert not (tmp_path / "strict.jsonl").exists()
