"""Fuzz harness (parent side): runs worker processes, survives their crashes and hangs, collects results.

Library use (the tests)::

    report = run_families(["refcoco", "score-res"], cases=20, workdir=tmp_path)

Command line (a long run, or one case again)::

    python tests/fuzz/fuzz_harness.py run --cases 1000 --jobs 2 --json fuzz_report.json [--families refcoco,dam]
    python tests/fuzz/fuzz_harness.py repro refcoco 17 [--seed 0] [--dir /tmp/case]

Each family's cases ``0..N-1`` are split into chunks; a worker process (``fuzz_worker.py``) runs
one chunk in-process, printing a line when it starts a case and one with the case's result. When a
worker dies (a signal, ``os._exit``) or prints nothing for longer than the per-case timeout plus a
grace period, the parent kills it, records the case it had started as a failure (``signal …`` or
``hang``) and starts a new worker at the next case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "fuzz_worker.py"

DEFAULT_TIMEOUT = float(os.environ.get("FCLM_FUZZ_TIMEOUT", "15"))
"""Seconds one case may run before the worker's alarm stops it (then it is a ``hang``)."""
GRACE = 5.0
"""Extra seconds the parent waits for a worker's next line before killing it."""
SETUP_TIMEOUT = 240.0
"""Seconds a new worker may take to import and write its fixture."""
DEFAULT_MEM_MB = int(os.environ.get("FCLM_FUZZ_MEM_MB", "0"))
"""Address-space limit of each worker (MiB, 0 = none). The default is none: a huge allocation then shows as RSS growth."""


@dataclass
class FamilyReport:
    family: str
    cases: int = 0  # cases with a result
    failures: list[dict] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    secs: float = 0.0
    slowest: list[tuple[float, int]] = field(default_factory=list)
    workers: int = 0
    exits: dict = field(default_factory=dict)  # exit status -> number of cases
    lost_checked: int = 0  # exit-0 cases whose surviving records were checked

    @property
    def ok(self) -> bool:
        return not self.failures and not self.harness_errors


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(HERE), str(ROOT / "tests" / "data_builders"), str(ROOT / "tests" / "metrics")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONFAULTHANDLER"] = "1"  # a crashing worker leaves its C-level stack in its stderr log
    return env


def _reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def run_chunk(family: str, start: int, stop: int, *, seed: int, workdir: Path, timeout: float = DEFAULT_TIMEOUT,
              mem_mb: int = DEFAULT_MEM_MB, grace: float = GRACE, report: FamilyReport, lock: threading.Lock) -> None:
    """Run cases ``start..stop-1`` of ``family``, restarting the worker after each crash or hang."""
    nxt = start
    restarts = 0
    while nxt < stop:
        log = workdir / f"worker-{family}-{nxt}.stderr.log"
        cmd = [sys.executable, "-u", str(WORKER), "--family", family, "--seed", str(seed), "--start", str(nxt), "--stop", str(stop),
               "--workdir", str(workdir), "--timeout", str(timeout), "--mem-mb", str(mem_mb)]
        with open(log, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, cwd=ROOT, env=worker_env(), text=True, start_new_session=True)
        with lock:
            report.workers += 1
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        ready = False
        current: dict | None = None  # the case started and not finished
        last_done = nxt - 1
        why = None
        while True:
            wait = (SETUP_TIMEOUT if not ready else timeout + grace)
            try:
                line = q.get(timeout=wait)
            except queue.Empty:
                why = "hang"
                _kill(proc)
                break
            if line is None:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # stray output of a program that wrote to the real stdout
            if msg.get("baseline_failed"):
                with lock:
                    if not any(e.startswith("baseline") for e in report.harness_errors):
                        report.harness_errors.append(f"baseline (the unmutated fixture) fails: {msg['baseline_failed']} — {msg.get('command')}\n{msg.get('stdout')}\n{msg.get('stderr')}\n{msg.get('exc')}")
            elif msg.get("ready"):
                ready = True
            elif "start" in msg:
                current = msg
            elif "case" in msg:
                current = None
                last_done = msg["case"]
                with lock:
                    if msg.get("harness_error"):
                        report.harness_errors.append(f"case {msg['case']}: {msg['harness_error']}")
                        continue
                    report.cases += 1
                    report.exits[str(msg.get("rc"))] = report.exits.get(str(msg.get("rc")), 0) + 1
                    report.lost_checked += bool(msg.get("expected"))
                    report.slowest = sorted(report.slowest + [(msg.get("secs", 0.0), msg["case"])], reverse=True)[:5]
                    if not msg["ok"]:
                        report.failures.append(msg)
            elif msg.get("done"):
                break
        rc = proc.wait()
        shutil.rmtree(workdir / f"base-{family}-{proc.pid}", ignore_errors=True)  # left by a worker that died
        if current is None and last_done + 1 >= stop:
            return
        if not ready:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            with lock:
                report.harness_errors.append(f"worker for cases {nxt}..{stop - 1} did not start ({why or f'exit {rc}'}): {tail}")
            return
        if current is not None:
            i = current["start"]
            if why == "hang":
                kind = f"hang: no result after {timeout + grace:g} s (the alarm did not stop it), worker killed"
            elif rc < 0:
                kind = f"signal: the worker died of {signal.Signals(-rc).name}"
            else:
                kind = f"the worker exited with status {rc} during the case (os._exit or similar)"
            tail = log.read_text(errors="replace")[-2500:] if log.exists() else ""
            with lock:
                report.cases += 1
                report.failures.append({"case": i, "ok": False, "failures": [kind], "mutation": current.get("mutation"), "command": current.get("command"),
                                        "stderr": tail, "kept": str(workdir / f"case-{family}-{i}")})
            nxt = i + 1
        else:
            # died between cases (while making a case): skip the next one
            with lock:
                report.harness_errors.append(f"worker died outside a case after case {last_done} ({why or f'exit {rc}'})")
            nxt = last_done + 2
        restarts += 1
        if restarts > stop - start + 5:
            with lock:
                report.harness_errors.append("too many worker restarts")
            return


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_families(families: list[str], cases: int, *, workdir: Path, seed: int = 0, jobs: int = 1, chunk: int = 250,
                 timeout: float = DEFAULT_TIMEOUT, mem_mb: int = DEFAULT_MEM_MB, first: int = 0, grace: float = GRACE) -> dict[str, FamilyReport]:
    """Run ``cases`` cases (indices ``first..first+cases-1``) of each family on ``jobs`` worker processes at a time."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reports = {f: FamilyReport(f) for f in families}
    lock = threading.Lock()
    tasks = []
    for f in families:
        n_chunks = max(1, math.ceil(cases / chunk))
        size = math.ceil(cases / n_chunks)
        for a in range(first, first + cases, size):
            tasks.append((f, a, min(a + size, first + cases)))
    t0 = {f: None for f in families}
    t1 = {}

    def go(task):
        f, a, b = task
        if t0[f] is None:
            t0[f] = time.monotonic()
        run_chunk(f, a, b, seed=seed, workdir=workdir, timeout=timeout, mem_mb=mem_mb, grace=grace, report=reports[f], lock=lock)
        t1[f] = time.monotonic()

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(go, tasks))
    for f in families:
        if t0[f] is not None:
            reports[f].secs = round(t1.get(f, t0[f]) - t0[f], 1)
    return reports


def format_failures(rep: FamilyReport, limit: int = 30) -> str:
    lines = [f"{rep.family}: {len(rep.failures)} failing case(s) of {rep.cases}"]
    for e in rep.harness_errors[:5]:
        lines.append(f"  HARNESS ERROR: {e[:1500]}")
    for f in sorted(rep.failures, key=lambda x: x["case"])[:limit]:
        lines.append(f"  case {f['case']}: {' | '.join(f['failures'])[:600]}")
        lines.append(f"    mutation: {str(f.get('mutation'))[:400]}")
        lines.append(f"    rerun:    python tests/fuzz/fuzz_harness.py repro {rep.family} {f['case']}   (kept in {f.get('kept')})")
    if len(rep.failures) > limit:
        lines.append(f"  … and {len(rep.failures) - limit} more")
    return "\n".join(lines)


def signature(fail: str) -> str:
    """A failure message without its case-specific details, for grouping."""
    import re

    s = re.sub(r"/[^\s'\":,)\]]+", "<path>", fail)
    s = re.sub(r"\d+", "N", s)
    return s[:160]


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def _cmd_run(args) -> int:
    from fuzz_families import FAMILY_NAMES

    fams = [f for f in args.families.split(",") if f] if args.families else list(FAMILY_NAMES)
    workdir = Path(args.workdir) if args.workdir else Path(os.environ.get("TMPDIR", "/tmp")) / f"fclm-fuzz-{os.getpid()}"
    t = time.monotonic()
    reports = run_families(fams, args.cases, workdir=workdir, seed=args.seed, jobs=args.jobs, chunk=args.chunk, timeout=args.timeout, mem_mb=args.mem_mb, first=args.first)
    total = time.monotonic() - t
    print(f"{'family':<16} {'cases':>6} {'failing':>8} {'secs':>7}  exit statuses; exit-0 cases with a lost-record check")
    for f, r in reports.items():
        ex = ", ".join(f"{k}: {v}" for k, v in sorted(r.exits.items()))
        print(f"{f:<16} {r.cases:>6} {len(r.failures):>8} {r.secs:>7}  {ex}; {r.lost_checked}")
    print(f"total {sum(r.cases for r in reports.values())} cases in {total:.0f} s; work dir {workdir}")
    groups: dict[tuple[str, str], list[int]] = {}
    for f, r in reports.items():
        for x in r.failures:
            for msg in x["failures"]:
                groups.setdefault((f, signature(msg)), []).append(x["case"])
        for e in r.harness_errors:
            print(f"HARNESS ERROR {f}: {e[:2000]}")
    if groups:
        print("\nfailure kinds (family: signature — count, first cases):")
        for (f, sig), idx in sorted(groups.items()):
            print(f"  {f}: {sig} — {len(idx)}, e.g. {sorted(set(idx))[:5]}")
    if args.json:
        Path(args.json).write_text(json.dumps({f: {"cases": r.cases, "secs": r.secs, "failures": r.failures, "harness_errors": r.harness_errors,
                                                   "slowest": r.slowest, "workers": r.workers, "exits": r.exits, "lost_checked": r.lost_checked} for f, r in reports.items()}, indent=1))
    return 0 if all(r.ok for r in reports.values()) else 1


def _cmd_repro(args) -> int:
    import random
    import shutil

    sys.path[:0] = [str(ROOT), str(HERE)]
    from fuzz_families import all_families

    fam = all_families()[args.family]
    d = Path(args.dir) if args.dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"fclm-fuzz-repro-{args.family}-{args.case}"
    base = d.parent / (d.name + ".base")
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    fam.build(base)
    shutil.copytree(base, d, symlinks=True)
    shutil.rmtree(base, ignore_errors=True)
    case = fam.case(random.Random(f"{args.seed}:{args.family}:{args.case}"), d, args.case)
    print(f"mutation: {case.description}")
    print(f"inputs in: {d}")
    print(f"command:  {case.command()}")
    if args.no_run:
        return 0
    module = "data_builders" if case.program == "data" else "eval"
    proc = subprocess.run([sys.executable, "-m", module, *case.argv], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=600)
    print(f"exit status: {proc.returncode}")
    print("--- stdout (tail) ---\n" + proc.stdout[-3000:])
    print("--- stderr (tail) ---\n" + proc.stderr[-5000:])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fuzz_harness.py", description="FCLM input fuzzing: data builders and fclm-eval score")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run N cases of each family")
    r.add_argument("--families", default="", help="comma-separated (default: all)")
    r.add_argument("--cases", type=int, default=int(os.environ.get("FCLM_FUZZ_CASES", "1000")))
    r.add_argument("--first", type=int, default=0, help="index of the first case")
    r.add_argument("--seed", type=int, default=int(os.environ.get("FCLM_FUZZ_SEED", "0")))
    r.add_argument("--jobs", type=int, default=int(os.environ.get("FCLM_FUZZ_JOBS", "2")))
    r.add_argument("--chunk", type=int, default=250, help="cases per worker process")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    r.add_argument("--mem-mb", type=int, default=DEFAULT_MEM_MB)
    r.add_argument("--workdir", default="")
    r.add_argument("--json", default="", help="write every result here")
    p = sub.add_parser("repro", help="rebuild one case and run it through the real command line")
    p.add_argument("family")
    p.add_argument("case", type=int)
    p.add_argument("--seed", type=int, default=int(os.environ.get("FCLM_FUZZ_SEED", "0")))
    p.add_argument("--dir", default="")
    p.add_argument("--no-run", action="store_true")
    args = ap.parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return _cmd_run(args) if args.cmd == "run" else _cmd_repro(args)


if __name__ == "__main__":
    sys.exit(main())
