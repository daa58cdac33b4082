"""Fuzz worker: runs cases ``START..STOP-1`` of one family in this one process, one after the other.

    python tests/fuzz/fuzz_worker.py --family refcoco --seed 0 --start 0 --stop 50 --workdir DIR

For each case it copies the family's fixture to ``DIR/case-<i>``, mutates it, prints
``{"start": i, …}``, calls the program's ``main(argv)`` (``data_builders.__main__.main`` or
``eval.__main__.main``) with stdout/stderr captured and a per-case alarm, checks the outcome and
prints ``{"case": i, "ok": …, "failures": […]}`` — one JSON line each, flushed. A case that fails
keeps its folder under ``DIR/failed/``. If this process dies (a signal) or stops answering, the
parent (``fuzz_harness.py``) records the case it had started and starts a new worker after it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
# An editable install's import hook maps fclm/data_builders/eval to the folder it was installed from;
# the worker tests the checkout it lives in (the same folder, unless the suite was copied elsewhere).
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]


class CaseTimeout(BaseException):
    """Raised by the per-case alarm (a BaseException, so that ``except Exception`` in a program does not swallow it)."""


@dataclass
class RunResult:
    rc: int | None
    stdout: str
    stderr: str
    exc: str | None
    timed_out: bool
    secs: float
    rss_growth_mb: float


def _emit(obj: dict) -> None:
    sys.__stdout__.write(json.dumps(obj, ensure_ascii=True) + "\n")
    sys.__stdout__.flush()


def program_main(program: str):
    if program == "data":
        from data_builders.__main__ import main
    elif program == "eval":
        from eval.__main__ import main
    elif program == "selftest":
        from fuzz_families import selftest_main as main
    else:
        raise ValueError(program)
    return main


def run_case(main, argv: list[str], timeout: float) -> RunResult:
    """Call ``main(argv)`` as the command line would, capturing its output; an alarm stops it after ``timeout`` s."""
    out, err = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()  # logging.basicConfig in main() then writes to this case's stderr
    rc, exc, timed_out = None, None, False

    def on_alarm(signum, frame):
        raise CaseTimeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")  # each case shows its warnings, as its own process would
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse, sys.exit
                if isinstance(e.code, int) or e.code is None:
                    rc = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    rc = 1
            if rc is None:
                rc = 0
    except CaseTimeout:
        timed_out = True
    except BaseException:  # noqa: BLE001 - any escape is what a user would see as a traceback
        exc = traceback.format_exc()
        rc = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    secs = time.monotonic() - t0
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024.0
    return RunResult(rc, out.getvalue(), err.getvalue(), exc, timed_out, secs, growth)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple]:
    """``{relative path: (size, mtime_ns, is_link)}`` of everything under ``root`` outside ``skip``."""
    skip_s = [str(s) for s in skip]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if any(dirpath == s or dirpath.startswith(s + os.sep) for s in skip_s):
            dirnames[:] = []
            continue
        for name in filenames + [dn for dn in dirnames if os.path.islink(os.path.join(dirpath, dn))]:
            p = os.path.join(dirpath, name)
            if any(p == s for s in skip_s):
                continue
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, os.path.islink(p))
    return out


def _strict_json(line: str):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(line, parse_constant=bad)


def _innermost_frame(tb: str) -> str:
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
    for f, line, fn in reversed(frames):
        if str(ROOT) in f and "/tests/" not in f and ".venv" not in f:
            return f"{os.path.relpath(f, ROOT)}:{line} ({fn})"
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"


def _names_input(msg: str, case) -> bool:
    return any(str(p) in msg for p in case.inputs) or any(p.name and p.name in msg for p in case.inputs)


def check(case, res: RunResult, before: dict, timeout: float, rss_limit_mb: float) -> list[str]:
    """Everything a case must satisfy; returns the failures (empty = ok)."""
    from fclm.data.schema import validate_record

    fails: list[str] = []
    if res.timed_out:
        return [f"hang: no answer after {timeout:g} s"]
    if res.exc:
        last = res.exc.strip().splitlines()[-1]
        fails.append(f"traceback: {last[:300]} at {_innermost_frame(res.exc)}")
    text = res.stdout + res.stderr
    if "Traceback (most recent call last)" in text:
        fails.append("a traceback was printed")
    if "MemoryError" in text:
        fails.append("MemoryError: the input made the program try a huge allocation")
    if res.rss_growth_mb > rss_limit_mb:
        fails.append(f"memory: peak RSS grew by {res.rss_growth_mb:.0f} MB")
    allowed = {0, 1, 2} if case.kind == "validate" else {0, 2}
    if not res.exc and res.rc not in allowed:
        fails.append(f"exit status {res.rc} (expected {' or '.join(map(str, sorted(allowed)))})")
    err_lines = [x for x in res.stderr.splitlines() if x.strip()]
    if res.rc == 2 and not res.exc:
        msg = err_lines[-1] if err_lines else ""
        if len(err_lines) != 1:
            fails.append(f"exit 2 with {len(err_lines)} stderr lines, want one: {res.stderr.strip()[:300]!r}")
        if not re.match(r"([\w.-]+: )?error: ", msg):
            fails.append(f"exit 2 but the stderr line is not 'PROGRAM: error: …': {msg[:300]!r}")
        if not _names_input(msg, case):
            fails.append(f"exit 2 but the error names no input file: {msg[:300]!r}")
        elif case.needs_line and not any(re.search(re.escape(str(p)) + r":\d+", msg) for p in case.line_files):
            fails.append(f"exit 2 for a broken line but the error names no line: {msg[:300]!r}")
    noisy = [x for x in err_lines if re.search(r"Warning|Error|error|Traceback|exception", x)]
    if res.rc in (0, 1) and not res.exc and noisy:
        fails.append(f"warning/error on stderr of a successful run: {noisy[0][:300]!r}")
    if res.rc == 0 and not res.exc and case.kind == "build":
        fails += _check_build(case, res, validate_record)
    if res.rc in (0, 1) and not res.exc and case.kind == "validate":
        fails += _check_validate(case, res)
    if res.rc == 0 and not res.exc and case.kind == "score":
        fails += _check_score(case)
    # nothing written outside the output
    skip = [case.out.parent if case.kind == "build" else case.out]
    after = snapshot(case.dir, skip)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        fails.append(f"files changed outside the output ({os.path.relpath(skip[0], case.dir)}): {changed[:5]}")
    if case.kind == "build" and case.out.parent.exists():
        links = [str(p) for p in case.out.parent.rglob("*") if p.is_symlink()]
        if links:
            fails.append(f"symlinks written into the output: {links[:3]}")
        escaped = []
        for p in case.out.parent.rglob("*"):
            try:
                p.resolve().relative_to(case.out.parent.resolve())
            except ValueError:
                escaped.append(str(p))
        if escaped:
            fails.append(f"output paths resolving outside the output folder: {escaped[:3]}")
    return fails


def _check_build(case, res: RunResult, validate_record) -> list[str]:
    fails = []
    m = re.search(r"wrote (\d+) record\(s\) to ", res.stdout)
    if not m:
        return [f"exit 0 without 'wrote N record(s)': {res.stdout[:200]!r}"]
    n = int(m.group(1))
    if not case.out.is_file():
        return [f"exit 0 but no output file {case.out}"]
    raw = case.out.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        return [f"output is not UTF-8 ({e})"]
    if len(lines) != n:
        fails.append(f"summary says {n} record(s), the file has {len(lines)} line(s)")
    ids: list[str] = []
    for k, line in enumerate(lines, start=1):
        try:
            rec = _strict_json(line)
        except (ValueError, RecursionError) as e:
            fails.append(f"output line {k} is not strict JSON ({str(e)[:120]})")
            continue
        probs = validate_record(rec, f"out:{k}", image_root=case.out.parent, check_images="--no-check-images" not in case.argv)
        if probs:
            fails.append(f"invalid output record {rec.get('id')!r}: {probs[0][:300]}")
        ids.append(str(rec.get("id")))
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups and not case.allow_duplicate_ids:
        fails.append(f"duplicate ids written: {dups[:5]}")
    if case.expected is not None:
        lost = sorted(case.expected - set(ids))
        if lost:
            fails.append(f"valid records lost (their input was not mutated): {lost[:8]}{' …' if len(lost) > 8 else ''}")
    # every reported problem says where it is
    if "problem(s), each skipped:" in res.stdout:
        for line in res.stdout.split("problem(s), each skipped:", 1)[1].splitlines():
            if line.startswith("  ") and not line.startswith("  … and"):
                if not _names_input(line.strip().split(": ", 1)[0] + ":", case):
                    fails.append(f"a reported problem does not name its input file: {line.strip()[:200]!r}")
                    break
    return fails


def _check_validate(case, res: RunResult) -> list[str]:
    fails = []
    m = re.search(r"(\d+) record\(s\) in 1 file\(s\): (\d+) valid", res.stdout)
    if not m:
        return [f"no validate summary line: {res.stdout[:200]!r}"]
    valid = int(m.group(2))
    good = set(case.info["good_lines"])
    flagged = {int(x) for x in re.findall(re.escape(str(case.inputs[0])) + r":(\d+):", res.stdout)}
    wrong = sorted(good & flagged)
    if wrong:
        fails.append(f"unmutated valid line(s) {wrong} reported as problems")
    if valid < len(good):
        fails.append(f"{valid} valid record(s) counted, but {len(good)} line(s) were not mutated")
    if res.rc == 0 and "0 problems" not in res.stdout:
        fails.append("exit 0 although problems were reported")
    return fails


def _check_score(case) -> list[str]:
    fails = []
    try:
        summary = _strict_json((case.out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"exit 0 but summary.json is unreadable or not strict JSON ({str(e)[:150]})"]
    if summary.get("n_samples") != case.info["n_gt"]:
        fails.append(f"scored {summary.get('n_samples')} of the {case.info['n_gt']} GT record(s)")
    try:
        for line in (case.out / "per_sample.jsonl").read_text(encoding="utf-8").splitlines():
            _strict_json(line)
    except (OSError, ValueError) as e:
        fails.append(f"per_sample.jsonl is unreadable or not strict JSON ({str(e)[:150]})")
    return fails


# --------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--stop", type=int, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--mem-mb", type=int, default=0, help="address-space limit of this process (0: none)")
    ap.add_argument("--rss-limit-mb", type=float, default=1024.0)
    ap.add_argument("--keep-all", action="store_true")
    args = ap.parse_args()
    if args.mem_mb:
        resource.setrlimit(resource.RLIMIT_AS, (args.mem_mb << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    from fuzz_families import all_families

    family = all_families()[args.family]
    base = args.workdir / f"base-{args.family}-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.monotonic()
    family.build(base)
    main_fn = program_main(family.program)
    # the unmutated fixture first: it must pass every check (and it warms caches, e.g. a model the program loads once)
    d = args.workdir / f"case-{args.family}-baseline-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d, symlinks=True)
    case = family.baseline(d)
    before = snapshot(d, [case.out.parent if case.kind == "build" else case.out])
    res = run_case(main_fn, case.argv, max(args.timeout, 120.0))
    fails = check(case, res, before, args.timeout, args.rss_limit_mb)
    if res.rc != 0:
        fails.append(f"exit status {res.rc} on the unmutated fixture")
    if fails:
        _emit({"baseline_failed": fails, "command": case.command(), "stdout": res.stdout[-1500:], "stderr": res.stderr[-1500:], "exc": (res.exc or "")[-3000:]})
    else:
        shutil.rmtree(d, ignore_errors=True)
    _emit({"ready": True, "family": args.family, "pid": os.getpid(), "setup_secs": round(time.monotonic() - t0, 2)})
    for i in range(args.start, args.stop):
        d = args.workdir / f"case-{args.family}-{i}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d, symlinks=True)
        rng = random.Random(f"{args.seed}:{args.family}:{i}")
        try:
            case = family.case(rng, d, i)
        except Exception:  # a bug of the harness, not of the program
            _emit({"case": i, "ok": False, "harness_error": traceback.format_exc()[-2000:]})
            continue
        _emit({"start": i, "mutation": case.description[:2000], "command": case.command()[:2000]})
        skip = [case.out.parent if case.kind == "build" else case.out]
        before = snapshot(d, skip)
        res = run_case(main_fn, case.argv, args.timeout)
        try:
            fails = check(case, res, before, args.timeout, args.rss_limit_mb)
        except Exception:
            fails = ["harness error in check: " + traceback.format_exc()[-1500:]]
        result = {"case": i, "ok": not fails, "failures": fails, "rc": res.rc, "secs": round(res.secs, 3), "mutation": case.description[:2000],
                  "expected": len(case.expected) if (case.expected and res.rc == 0) else 0}
        if fails:
            result.update(command=case.command()[:3000], stdout=res.stdout[-1500:], stderr=res.stderr[-1500:], exc=(res.exc or "")[-3000:], kept=str(d))
        elif not args.keep_all:
            shutil.rmtree(d, ignore_errors=True)
        _emit(result)
    shutil.rmtree(base, ignore_errors=True)
    _emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
