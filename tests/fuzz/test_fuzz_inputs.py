"""Fuzzing the data builders (``python -m data_builders``) and ``fclm-eval score`` with mutated real-format inputs.

Each family (one per builder: refcoco, refcocog, grefcoco, rrefcoco, refzom, dam, dlres, lvis-roc,
gcg, muse, osprey, validate; one per ``fclm-eval score --task``: res, dlres, rec, gres, grec,
rrefcoco, refzom, muse, gcg, roc) writes a small valid fixture in its source format — refer
pickles + ``instances.json``, Describe Anything tar shards + ``annotations.json``, LVIS/PACO,
GranD-f, MUSE and Osprey JSON, JSON Lines records, GT/prediction JSONL — and case ``i`` mutates a
copy of it with a generator seeded by ``(FCLM_FUZZ_SEED, family, i)``: flipped, cut, inserted bytes;
JSON values replaced by NaN/±Infinity/huge/negative numbers, 5,000-digit integers, wrong types,
100,000-deep nesting; keys dropped or repeated; non-object entries; missing ids; invalid UTF-8 and
lone surrogates; cut or corrupt RLE strings, huge RLE sizes, polygons with NaN or far-out
coordinates; tar members named ``../…`` or absolute, links, devices, oversize headers; pickles that
call code, allocate without bound, nest deeply or refer to themselves.

Every case must end with exit status 0, or 2 and one ``error:`` line naming the input file (and its
line, for a broken JSON Lines line) — never a traceback, a signal, a hang or a huge allocation. On
exit 0: the output is strict JSON and valid records (``validate_record``), every record whose input
the mutation did not touch is written, ids are unique, every reported problem names its file,
nothing is written outside the output (no path traversal), and no pickle ran code.

Budget: ``FCLM_FUZZ_CASES`` cases per family (default 25: about 30 s in all). A long run (1,000 per family)::

    FCLM_FUZZ_CASES=1000 FCLM_FUZZ_JOBS=2 python -m pytest tests/fuzz -q
    python tests/fuzz/fuzz_harness.py run --cases 1000 --jobs 2 --json fuzz.json   # same, with a summary table

Other knobs: ``FCLM_FUZZ_SEED`` (default 0), ``FCLM_FUZZ_JOBS`` (worker processes at once, default
1), ``FCLM_FUZZ_TIMEOUT`` (seconds per case, default 15), ``FCLM_FUZZ_MEM_MB`` (address-space limit
per worker, default none). A failing case is rebuilt and run through the real command line with
``python tests/fuzz/fuzz_harness.py repro FAMILY INDEX``. See ``docs/security.md``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_families import FAMILY_NAMES, SELFTEST_PLAN  # noqa: E402
from fuzz_harness import format_failures, run_families  # noqa: E402

CASES = int(os.environ.get("FCLM_FUZZ_CASES", "25"))
SEED = int(os.environ.get("FCLM_FUZZ_SEED", "0"))
JOBS = int(os.environ.get("FCLM_FUZZ_JOBS", "1"))
TIMEOUT = float(os.environ.get("FCLM_FUZZ_TIMEOUT", "15"))


@pytest.mark.timeout(0)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fuzz_family(family, tmp_path):
    reports = run_families([family], CASES, workdir=tmp_path, seed=SEED, jobs=JOBS, timeout=TIMEOUT, grace=5.0)
    rep = reports[family]
    assert rep.cases + len(rep.harness_errors) >= CASES, f"{family}: only {rep.cases} of {CASES} cases ran\n" + format_failures(rep)
    assert rep.ok, "\n" + format_failures(rep)


@pytest.mark.timeout(120)
def test_harness_survives_crashes_and_hangs(tmp_path):
    """A traceback, a segfault, a hang the alarm stops, one it cannot stop and a bad exit status are each
    recorded against their case, and the cases after them still run."""
    reports = run_families(["selftest"], len(SELFTEST_PLAN), workdir=tmp_path, timeout=1.5, grace=1.5)
    rep = reports["selftest"]
    assert not rep.harness_errors, rep.harness_errors
    got = {f["case"]: " ".join(f["failures"]) for f in rep.failures}
    want = {i for i, what in enumerate(SELFTEST_PLAN) if what != "ok"}
    assert set(got) == want, got
    assert "traceback: RuntimeError: boom" in got[SELFTEST_PLAN.index("raise")]
    assert "SIGSEGV" in got[SELFTEST_PLAN.index("segv")]
    assert got[SELFTEST_PLAN.index("hang")].startswith("hang: no answer after")
    assert "worker killed" in got[SELFTEST_PLAN.index("block")]
    assert "exit status 3" in got[SELFTEST_PLAN.index("exit3")]
    assert rep.cases == len(SELFTEST_PLAN)  # the last case ran after all of that
