"""Builders of tiny GT / prediction records for the metric tests (hand-checkable masks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from fclm.masks import encode_mask
from fclm.metrics.io import EvalSet, load_eval_set

H, W = 10, 10


def rect(x1: int, y1: int, x2: int, y2: int, h: int = H, w: int = W) -> np.ndarray:
    """Boolean h×w mask, True on columns x1..x2-1 and rows y1..y2-1."""
    m = np.zeros((h, w), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def rle(mask: np.ndarray) -> dict:
    return encode_mask(mask)


def gt(rid: str, targets: Sequence[Sequence[np.ndarray]] = (), *, boxes: Optional[Sequence[Sequence[Sequence[float]]]] = None, task: str = "res", image: str = "img.jpg", meta: Optional[dict] = None, answer: str = "[SEG]") -> dict:
    """A GT record; ``targets[k]`` = list of instance masks (empty list = no target)."""
    tg = []
    for k, masks in enumerate(targets):
        t: dict[str, Any] = {"masks": [rle(m) for m in masks], "boxes": [] if boxes is None else [list(map(float, b)) for b in boxes[k]]}
        tg.append(t)
    return {
        "id": rid,
        "image": image,
        "task": task,
        "head": "sam",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
        "regions": [],
        "targets": tg,
        "meta": meta or {},
    }


def seg(*masks: np.ndarray, exists: Optional[float] = None, scores: Optional[Sequence[float]] = None, boxes: Optional[Sequence[Sequence[float]]] = None) -> dict:
    """A predicted [SEG] with instance masks (and optional scores / boxes / exists)."""
    inst = []
    n = max(len(masks), len(boxes or []))
    for j in range(n):
        d: dict[str, Any] = {}
        if j < len(masks):
            d["mask"] = rle(masks[j])
        if boxes is not None:
            d["box"] = list(map(float, boxes[j]))
        if scores is not None:
            d["score"] = float(scores[j])
        inst.append(d)
    s: dict[str, Any] = {"instances": inst}
    if exists is not None:
        s["exists"] = exists
    return s


def pred(rid: str, segs: Sequence[dict] = (), text: str = "") -> dict:
    return {"id": rid, "text": text, "segs": list(segs)}


def write_jsonl(path: Path, recs: Iterable[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path


def eval_set(tmp_path: Path, gts: Sequence[dict], preds: Sequence[dict], *, need_masks: bool = True, name: str = "x") -> EvalSet:
    g = write_jsonl(tmp_path / f"{name}_gt.jsonl", gts)
    p = write_jsonl(tmp_path / f"{name}_pred.jsonl", preds)
    return load_eval_set(g, p, need_masks=need_masks)


class FakeJudge:
    """A tiny OpenAI-compatible ``/v1/chat/completions`` server on 127.0.0.1 (http.server, in a thread).

    It answers the DLC-Bench judge prompt deterministically: the recognition question "A. Yes" unless
    the description contains "zebra" ("B. No"); any other question the highest-scoring choice, written
    "<letter>. <choice>" — or, if the description contains "mumble", an unparsable "maybe".
    ``status`` forces an HTTP error code. Every request body is kept in ``requests``.
    """

    def __init__(self):
        import http.server
        import threading

        self.requests: list[dict] = []
        self.status = 200
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, **body})
                if judge.status != 200:
                    self.send_response(judge.status)
                    self.end_headers()
                    return
                answer = judge.answer(body["messages"][0]["content"])
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(prompt: str) -> str:
        description = prompt.split("The description is:\n", 1)[1].split("\n\nFrom the description above", 1)[0]
        choices = [line for line in prompt.splitlines() if len(line) > 3 and line[0] in "ABCDE" and line[1:3] == ". "]
        if "Is it likely that the object" in prompt:
            return "B. No" if "zebra" in description else "A. Yes"
        if "mumble" in description:
            return "maybe"
        # choices are written best-last in the test benchmark
        return choices[-1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
