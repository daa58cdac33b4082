"""dlres builder: rule rewriter, record layout, bad lines, and the LLM rewriter against a local fake endpoint."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from builder_fixtures import read_jsonl, rle_of, write_image

from data_builders import dlres
from data_builders.__main__ import main
from fclm.data.schema import make_record, region_entry, resolve_image_path, validate_record
from fclm.data.templates import DLRES_PROMPTS, REGION_CAPTION_PROMPT
from fclm.io import RecordError


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A large red circle in the top left of the image. It is partly hidden behind a blue square.",
         "the large red circle in the top left of the image, partly hidden behind a blue square"),
        ("A white ceramic mug with a blue pattern. The mug has a glossy finish. The background is blurry.",
         "the white ceramic mug with a blue pattern, with a glossy finish"),
        ("The dog is a golden retriever. Its tongue hangs out. It wears a red collar.",
         "the dog that is a golden retriever, whose tongue hangs out, that wears a red collar"),
        ("Red sports car parked on the street.", "the red sports car parked on the street"),
        ("A TV mounted on the wall", "the TV mounted on the wall"),
    ],
)
def test_rule_rewrite(caption, expected):
    assert dlres.rule_rewrite(caption) == expected


def test_rule_rewrite_caps_length_at_a_clause_boundary():
    caption = "A white ceramic mug with a blue floral pattern and a curved handle. It has a chipped rim."
    assert dlres.rule_rewrite(caption, max_words=12) == "the white ceramic mug with a blue floral pattern"
    assert len(dlres.rule_rewrite(caption * 5, max_words=20).split()) <= 20


def caption_file(tmp_path, captions):
    """A region_caption JSONL in tmp/src/ whose images live in tmp/imgs/ (relative paths)."""
    src = tmp_path / "src" / "caps.jsonl"
    write_image(tmp_path / "imgs" / "a.png", 20, 30)
    m = np.zeros((20, 30), bool)
    m[3:9, 4:20] = True
    lines = []
    for i, c in enumerate(captions):
        rec = make_record(id=f"cap-{i}", image="../imgs/a.png", task="region_caption",
                          messages=[{"role": "user", "content": REGION_CAPTION_PROMPT}, {"role": "assistant", "content": c}],
                          regions=[region_entry(rle_of(m), [4, 3, 20, 9])], meta={"source": "dam", "subset": "SA"})
        lines.append(json.dumps(rec))
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("\n".join(lines) + "\n")
    return src, m


def test_dlres_layout_and_bad_lines(tmp_path, capsys):
    src, m = caption_file(tmp_path, ["A red box on the left.", "A blue box. It is shiny."])
    with open(src, "a") as f:
        f.write('{"id": "cut", "image": "x.png", "task": "region_capt\n')  # truncated JSON line
        f.write(json.dumps(make_record(id="r", image="../imgs/a.png", task="res", messages=[{"role": "user", "content": "x"},
                                       {"role": "assistant", "content": "no seg"}])) + "\n")
    out = tmp_path / "out" / "dlres.jsonl"
    assert main(["dlres", "--src", str(src), "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert [r["meta"]["expression"] for r in recs] == ["the red box on the left", "the blue box, shiny"]
    for r in recs:
        assert r["task"] == "dlres" and r["messages"][1]["content"] == "[SEG]"
        assert r["messages"][0]["content"] in {t.format(expr=r["meta"]["expression"]) for t in DLRES_PROMPTS}
        (region,) = r["regions"]
        assert region["target_index"] == 0 and region["in_prompt"] is False
        assert r["targets"] == [{"masks": [region["mask"]], "boxes": [region["box"]]}]
        assert resolve_image_path(r["image"], out.parent).resolve() == (tmp_path / "imgs" / "a.png").resolve()
        assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
        assert r["meta"]["rewriter"] == "rule" and r["meta"]["src_id"].startswith("cap-")
    text = capsys.readouterr().out
    assert "2 problem(s)" in text and "caps.jsonl:3: malformed JSON" in text and "caps.jsonl:4" in text
    first = out.read_bytes()
    assert main(["dlres", "--src", str(src), "--out", str(out)]) == 0
    assert out.read_bytes() == first  # deterministic
    assert main(["dlres", "--src", str(src), "--out", str(tmp_path / "s.jsonl"), "--strict"]) == 2


class FakeLLM:
    """A local OpenAI-compatible endpoint: fails each caption's first request with 500, then answers."""

    def __init__(self, fail_first: bool = True, status: int = 200):
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                caption = body["messages"][-1]["content"]
                with outer.lock:
                    outer.requests += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    first = caption not in outer.seen
                    outer.seen.add(caption)
                time.sleep(0.02)
                with outer.lock:
                    outer.in_flight -= 1
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    return
                if fail_first and first:
                    self.send_response(500)
                    self.end_headers()
                    return
                answer = '"The ' + caption.split()[1] + ' thing."\nextra line'
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_llm_rewriter_retries_caches_and_resumes(tmp_path):
    captions = [f"A {w} box." for w in ("red", "blue", "green", "pink", "gray", "teal")] + ["A red box."]
    src, _ = caption_file(tmp_path, captions)
    out = tmp_path / "llm.jsonl"
    llm = FakeLLM()
    try:
        opts = dlres.LlmOptions(endpoint=llm.url, model="fake", concurrency=2, retries=2, backoff=0.01, timeout=5)
        res = dlres.build(dlres.DlresOptions(src=src, out=out, rewriter="llm", llm=opts))
        assert res.report.count == 0
        assert llm.requests == 12  # 6 distinct captions, each failing once then answered
        assert llm.max_in_flight <= 2
        recs = read_jsonl(out)
        assert [r["meta"]["expression"] for r in recs] == ["the red thing", "the blue thing", "the green thing", "the pink thing",
                                                          "the gray thing", "the teal thing", "the red thing"]
        assert all(r["meta"]["rewriter"] == "llm:fake" for r in recs)
        cache = out.with_name("llm.jsonl.llm_cache.jsonl")
        assert len(read_jsonl(cache)) == 6
        # a re-run (e.g. after a kill) asks nothing again
        again = dlres.build(dlres.DlresOptions(src=src, out=tmp_path / "again.jsonl", rewriter="llm", llm=opts, cache=cache))
        assert llm.requests == 12 and again.records == 7
        assert again.counts["answers in the cache before"] == 6 and res.counts["answers in the cache before"] == 0
    finally:
        llm.close()


def test_llm_client_errors_are_reported_not_fatal(tmp_path):
    src, _ = caption_file(tmp_path, ["A red box."])
    llm = FakeLLM(status=400)
    try:
        opts = dlres.LlmOptions(endpoint=llm.url, model="fake", retries=3, backoff=0.01, timeout=5)
        res = dlres.build(dlres.DlresOptions(src=src, out=tmp_path / "o.jsonl", rewriter="llm", llm=opts))
        assert res.records == 0 and res.report.count == 1
        assert llm.requests == 1  # a 400 is not retried
        assert "HTTP Error 400" in str(res.report.problems[0]) and "caps.jsonl:1" in str(res.report.problems[0])
        with pytest.raises(RecordError):
            dlres.build(dlres.DlresOptions(src=src, out=tmp_path / "o.jsonl", rewriter="llm", llm=opts, strict=True))
    finally:
        llm.close()
