"""Serving benchmark: ``fclm-serve`` on loopback, against calling ``FCLMPredictor`` directly.

    python scripts/bench/serve.py [--presets tiny small] [--threads 1]
    python scripts/bench/serve.py --quick          # tiny preset, a few dozen requests: a smoke run in seconds

A random model per preset (``build_fclm(preset(name))``, seed 0, CPU float32), rigged to answer ``[SEG]``
so that every request takes the grounding path (image → one ``[SEG]`` → a SAM mask, RLE-encoded). The
request: one image (coloured rectangles on a gradient, the preset's largest size: 112² tiny, 224² small,
a PNG data URL), "Please segment the object.", ``max_tokens`` 8, ``fclm.mask_format`` ``rle``; the same
bytes every time, so the server's cached image is reused, as a client asking several questions about
one picture would.

Per preset, two fresh processes, each with ``--threads`` torch threads and denormals flushed:

* the server: ``serve.app.create_app`` + ``wrap`` under uvicorn (what ``fclm-serve`` runs), on a free
  127.0.0.1 port;
* the direct caller: the same model (same seed), ``set_image`` once, then ``ask`` with the same
  question and sampling: the server's work without HTTP, JSON, image decoding and mask encoding.

Measured from this process (the clients: one thread and one ``httpx.Client`` each):

1. 10 warm-up requests; then the server's overhead over the direct call, in alternating rounds (``--rounds``
   × ``--per-round`` direct asks, then as many requests from one client), so that load from other jobs
   falls on both alike: median latency of the requests ÷ median of the direct asks − 1;
2. requests/s and p50 / p95 latency at 1, 4 and 16 concurrent clients (``--requests`` for 1 client, twice
   that for 4, four times for 16);
3. the server process's RSS (``VmRSS`` in ``/proc/<pid>/status``) after its 10th request and after its
   1,000th (requests from 1 and 2 count; topped up to 1,000 with 4 clients if they fall short).

Prints Markdown tables, every goal beside its figure: overhead ≤ 10% at the small preset, RSS growth from
10 to 1,000 requests ≤ 5%; beside the overhead, the median ``GET /health`` round trip (HTTP alone). The full
run (2,560 requests per preset, ~2.7 minutes of it at the small preset) takes about 4 minutes on 2 cores;
``--quick`` checks the machinery only (its RSS figure is after its last request, not the 1,000th).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

QUESTION = "Please segment the object."
MAX_TOKENS = 8
GOAL_OVERHEAD = 0.10  # at the small preset
GOAL_RSS_GROWTH = 0.05
RSS_AT = (10, 1000)


# --------------------------------------------------------------------------------------------------
# the model (both child processes build the same one)
# --------------------------------------------------------------------------------------------------


def build_predictor(preset_name: str, threads: int):
    from fclm.config import preset
    from fclm.inference import FCLMPredictor
    from fclm.model import build_fclm
    from fclm.testing import rig_seg_answers

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    return FCLMPredictor(rig_seg_answers(build_fclm(preset(preset_name)).eval()))


def image_side(preset_name: str) -> int:
    from fclm.config import preset

    return int(preset(preset_name).backbone.max_pixels ** 0.5)


def make_png(side: int, seed: int = 0) -> bytes:
    """Coloured rectangles on a gradient (compresses like a simple photo, unlike noise)."""
    import io

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1).astype(np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, side // 2, 2)
        h, w = rng.integers(side // 8, side // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def request_body(png: bytes) -> bytes:
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return json.dumps({
        "model": "fclm", "max_tokens": MAX_TOKENS, "fclm": {"mask_format": "rle"},
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": QUESTION}]}],
    }).encode()


# --------------------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------------------


def run_server(preset_name: str, port: int, threads: int) -> None:
    import uvicorn

    from serve.app import ServeSettings, create_app, wrap

    predictor = build_predictor(preset_name, threads)
    settings = ServeSettings(model_name=preset_name)
    uvicorn.run(wrap(create_app(predictor, settings), settings), host="127.0.0.1", port=port, log_level="warning",
                timeout_keep_alive=30)


def run_direct(preset_name: str, threads: int) -> None:
    """Reads a count per line on stdin; answers with a JSON list of that many ``ask`` latencies (s)."""
    from fclm.inference.decoding import SamplingConfig

    predictor = build_predictor(preset_name, threads)
    predictor.set_image(Image.open(__import__("io").BytesIO(make_png(image_side(preset_name)))))
    sampling = SamplingConfig(max_new_tokens=MAX_TOKENS)  # what the server builds for this request
    for _ in range(3):
        predictor.ask(QUESTION, sampling=sampling)
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            answer = predictor.ask(QUESTION, sampling=sampling)
            times.append(time.perf_counter() - t0)
            assert answer.text == "[SEG]" and answer.segments[0].instances, answer.text
        print(json.dumps(times), flush=True)


# --------------------------------------------------------------------------------------------------
# the clients
# --------------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Served:
    """Counts the server's completed requests and reads its RSS when the count reaches a mark."""

    def __init__(self, pid: int, marks: tuple[int, ...]) -> None:
        self.pid, self.marks = pid, set(marks)
        self.count = 0
        self.rss: dict[int, float] = {}
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self.count += 1
            if self.count in self.marks:
                self.rss[self.count] = rss_mib(self.pid)


def load(url: str, body: bytes, clients: int, total: int, served: Served) -> dict:
    """``total`` requests from ``clients`` threads; requests/s and latency percentiles."""
    import httpx

    latencies: list[float] = []
    issued = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=300) as c:
            while True:
                with lock:
                    if issued[0] >= total or errors:
                        return
                    issued[0] += 1
                t0 = time.perf_counter()
                r = c.post(url, content=body, headers={"content-type": "application/json"})
                dt = time.perf_counter() - t0
                if r.status_code != 200 or b'"content":"[SEG]"' not in r.content or b'"counts"' not in r.content:
                    errors.append(f"{r.status_code}: {r.text[:300]}")
                    return
                served.done()
                with lock:
                    latencies.append(dt)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a benchmark request failed: {errors[0]}")
    q = np.percentile(latencies, [50, 95])
    return {"clients": clients, "requests": total, "rps": total / wall, "p50_ms": q[0] * 1e3, "p95_ms": q[1] * 1e3,
            "latencies": latencies}


def spawn(args: list[str], **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, __file__, *args], env=env, **kw)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_preset(name: str, args: argparse.Namespace) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = spawn(["--role", "server", "--preset", name, "--port", str(port), "--threads", str(args.threads)])
    direct = spawn(["--role", "direct", "--preset", name, "--threads", str(args.threads)],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the {name} server did not start")
            time.sleep(0.2)
        while (line := direct.stdout.readline()) and line.strip() != "ready":
            pass
        if not line:
            raise RuntimeError(f"the {name} direct caller did not start")
        url = base + "/v1/chat/completions"
        png = make_png(image_side(name))
        body = request_body(png)
        served = Served(server.pid, RSS_AT)

        first = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=300).json()
        from fclm.masks import decode_rle

        side = image_side(name)
        assert decode_rle(first["fclm"]["segments"][0]["instances"][0]["mask"]).shape == (side, side)
        served.done()
        load(url, body, 1, 9, served)  # warm-up: 10 requests in all
        rss_first = served.rss.get(10, rss_mib(server.pid))

        direct_s: list[float] = []
        server_s: list[float] = []
        for _ in range(args.rounds):
            direct.stdin.write(f"{args.per_round}\n")
            direct.stdin.flush()
            while not (line := direct.stdout.readline()).startswith("["):
                if not line:
                    raise RuntimeError(f"the {name} direct caller stopped")
            direct_s += json.loads(line)
            server_s += load(url, body, 1, args.per_round, served)["latencies"]

        health = []  # the HTTP floor: a round trip that does no work
        with httpx.Client(timeout=60) as c:
            for _ in range(args.rounds * args.per_round):
                t0 = time.perf_counter()
                c.get(base + "/health")
                health.append(time.perf_counter() - t0)

        sweeps = [load(url, body, c, args.requests * m, served) for c, m in ((1, 1), (4, 2), (16, 4))]
        if served.count < RSS_AT[-1] and not args.quick:
            load(url, body, 4, RSS_AT[-1] - served.count, served)
        rss_last_at = RSS_AT[-1] if RSS_AT[-1] in served.rss else served.count
        rss_last = served.rss.get(RSS_AT[-1], rss_mib(server.pid))
        return {
            "preset": name, "side": side, "png_bytes": len(png), "body_bytes": len(body), "sweeps": sweeps,
            "direct_p50_ms": statistics.median(direct_s) * 1e3, "server_p50_ms": statistics.median(server_s) * 1e3,
            "direct_mean_ms": statistics.fmean(direct_s) * 1e3, "server_mean_ms": statistics.fmean(server_s) * 1e3,
            "pairs": len(direct_s), "rss_first": rss_first, "rss_last": rss_last, "rss_last_at": rss_last_at,
            "served": served.count, "rss_end": rss_mib(server.pid), "health_p50_ms": statistics.median(health) * 1e3,
        }
    finally:
        for p in (server, direct):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def print_tables(results: list[dict]) -> None:
    print("| preset | clients | requests | requests/s | p50 latency (ms) | p95 latency (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        for s in r["sweeps"]:
            print(f"| {r['preset']} | {s['clients']} | {s['requests']} | {s['rps']:.1f} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} |")
    print()
    print("| preset | direct `ask` p50 (ms) | server, 1 client, p50 (ms) | overhead | `GET /health` p50 (ms) | goal ≤ 10% (small) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        over = r["server_p50_ms"] / r["direct_p50_ms"] - 1
        goal = verdict(over <= GOAL_OVERHEAD) if r["preset"] == "small" else "(no goal at this preset)"
        print(f"| {r['preset']} | {r['direct_p50_ms']:.1f} | {r['server_p50_ms']:.1f} | {over * 100:+.1f}% "
              f"(+{r['server_p50_ms'] - r['direct_p50_ms']:.1f} ms; {r['pairs']} of each) | {r['health_p50_ms']:.2f} | {goal} |")
    print()
    print("| preset | server RSS after 10 requests (MiB) | after N requests (MiB) | N | growth | goal ≤ 5% |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        growth = r["rss_last"] / r["rss_first"] - 1
        print(f"| {r['preset']} | {r['rss_first']:.0f} | {r['rss_last']:.0f} | {r['rss_last_at']:,} | {growth * 100:+.1f}% | "
              f"{verdict(growth <= GOAL_RSS_GROWTH)} |")
    print()
    for r in results:
        print(f"{r['preset']}: image {r['side']}×{r['side']} PNG, {r['png_bytes']:,} bytes; request body {r['body_bytes']:,} bytes; "
              f"{r['served']:,} requests served, RSS {r['rss_end']:.0f} MiB after the last")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server and the direct caller")
    ap.add_argument("--requests", type=int, default=300, help="requests at 1 client (×2 at 4 clients, ×4 at 16)")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds for the overhead")
    ap.add_argument("--per-round", type=int, default=30, help="direct asks and requests per round")
    ap.add_argument("--quick", action="store_true", help="tiny preset, few requests: a smoke run")
    ap.add_argument("--role", choices=["server", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "server":
        run_server(args.preset, args.port, args.threads)
        return
    if args.role == "direct":
        run_direct(args.preset, args.threads)
        return
    if args.quick:
        args.presets, args.requests, args.rounds, args.per_round = ["tiny"], 8, 2, 5
    t0 = time.time()
    results = [bench_preset(name, args) for name in args.presets]
    print_tables(results)
    print(f"\n({time.time() - t0:.0f} s; {args.threads} torch thread(s) in the server and the direct caller)")


if __name__ == "__main__":
    main()
