"""The restricted unpickler admits plain data (Python 2 and 3 pickles) and nothing that runs code."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fclm.data.safe_pickle import UnsafePickleError, safe_load_path, safe_loads

PLAIN = {
    "refs": [{"ref_id": 1, "ann_id": [1, -1], "sentences": [{"sent": "the man", "tokens": ["the", "man"]}]}],
    "floats": (1.5, -2.0, float("inf")),
    "set": {1, 2, 3},
    "frozen": frozenset({"a"}),
    "bytes": b"\x00\xffraw",
    "nested": [[], {}, ()],
    "big": 2**70,
    "none": None,
    "unicode": "café ☕",
    "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
}


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips(protocol):
    assert safe_loads(pickle.dumps(PLAIN, protocol=protocol)) == PLAIN


def test_python2_style_pickle():
    # protocol 2 with fix_imports names Python 2's module "__builtin__" for sets, as RefCOCO's refs(unc).p does
    data = pickle.dumps({"s": {1, 2}}, protocol=2, fix_imports=True)
    assert b"__builtin__" in data
    assert safe_loads(data) == {"s": {1, 2}}
    # a Python 2 str (SHORT_BINSTRING) decodes as UTF-8
    py2 = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."
    assert safe_loads(py2) == ["café"]


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize(
    "obj, name",
    [
        (lambda p: Evil(p), "system"),
        (lambda p: [1, {"x": Path(p)}], "pathlib"),
        (lambda p: np.zeros(3), "numpy"),
        (lambda p: collections.Counter("ab"), "collections.Counter"),
    ],
)
def test_anything_else_is_refused_without_running(tmp_path, obj, name):
    marker = tmp_path / "pwned"
    data = pickle.dumps(obj(str(marker)))
    with pytest.raises(UnsafePickleError, match=name):
        safe_loads(data)
    assert not marker.exists()
    path = tmp_path / "x.p"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError):
        safe_load_path(path)


def test_corrupt_pickle_raises_an_unpickling_error():
    with pytest.raises((pickle.UnpicklingError, EOFError, ValueError)):
        safe_loads(pickle.dumps([1, 2, 3])[:-3])


# --------------------------------------------------------------------------------------------------
# Resource limits: tiny hostile pickles must not allocate gigabytes, run without end or nest without
# bound. The bombs that would hang or eat memory before the limits existed run in a child process
# (with a memory cap and a timeout), so that a regression fails the test instead of the machine.
# --------------------------------------------------------------------------------------------------

import struct
import subprocess
import sys
import textwrap

from fclm.data.safe_pickle import PickleLimitError, PickleLimits

_ISOLATE = textwrap.dedent(
    """
    import re, resource
    def _limit(extra_mb):
        vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (extra_mb << 20), resource.RLIM_INFINITY))
    from fclm.data.safe_pickle import safe_loads, UnsafePickleError
    """
)


def run_isolated(code: str, *, timeout: float = 20, extra_mb: int = 400) -> str:
    """Run ``code`` in a child Python with at most ``extra_mb`` MB more address space; return its stdout."""
    script = _ISOLATE + f"_limit({extra_mb})\n" + textwrap.dedent(code)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s")
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def refused(data: bytes) -> str:
    """Unpickle ``data`` in a child; return ``'refused: <message>'`` or ``'loaded'`` / the error type."""
    return run_isolated(
        f"""
        try:
            safe_loads({data!r})
            print("loaded")
        except UnsafePickleError as e:
            print("refused:", e)
        except BaseException as e:
            print("other:", type(e).__name__, e)
        """
    ).strip()


def shared_lists(depth: int) -> bytes:
    """``l_i = [l_{i-1}, l_{i-1}]``: ~10 bytes a level, 2**depth elements when walked as a tree."""
    out = bytearray(b"\x80\x02]q\x00")
    for i in range(1, depth + 1):
        out += b"0]q" + bytes([i]) + b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"e"
    return bytes(out + b".")


def shared_tuples_as_dict_key(depth: int) -> bytes:
    """``t_i = (t_{i-1}, t_{i-1})`` used as a dict key: hashing it visits 2**depth tuples."""
    out = bytearray(b"\x80\x02)q\x00")
    for i in range(1, depth + 1):
        out += b"0h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    return bytes(out + b"0}h" + bytes([depth]) + b"Ns.")


def test_bytearray_of_a_huge_int_is_refused_without_allocating():
    bomb = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R."  # bytearray(1 << 30): 1 GB from 33 bytes
    out = refused(bomb)
    assert out.startswith("refused:") and "bytearray" in out


def test_bytearray8_with_a_huge_length_is_refused_without_allocating():
    bomb = b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"."
    out = refused(bomb)
    assert out.startswith("refused:") and "bytes" in out


def test_huge_memo_index_does_not_allocate():
    out = refused(b"\x80\x02]r\xff\xff\xff\x7f.")  # LONG_BINPUT 2**31 - 1
    assert out == "loaded" or out.startswith("refused:")


def test_shared_nested_lists_are_refused():
    data = shared_lists(40)
    assert len(data) < 450
    with pytest.raises(PickleLimitError, match="objects"):
        safe_loads(data)
    assert len(safe_loads(shared_lists(4))) == 2  # a little sharing is fine


def test_shared_tuples_hashed_as_a_dict_key_are_refused_quickly():
    out = refused(shared_tuples_as_dict_key(60))
    assert out.startswith("refused:"), out


def test_cyclic_list_is_refused():
    a: list = []
    a.append(a)
    with pytest.raises(PickleLimitError):
        safe_loads(pickle.dumps(a, protocol=2))


def test_deep_nesting_is_refused():
    n = 5000
    deep = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    with pytest.raises(PickleLimitError, match="deeper than"):
        safe_loads(deep)
    ok = b"\x80\x02" + b"]" * 50 + b"a" * 49 + b"."
    x, d = safe_loads(ok), 0
    while x:
        x, d = x[0], d + 1
    assert d == 49


def test_file_size_limit_names_the_file_and_the_limit(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(list(range(1000)), protocol=2))
    with pytest.raises(PickleLimitError, match=r"refs\(unc\)\.p.*over the 100-byte limit"):
        safe_load_path(path, limits=PickleLimits(max_bytes=100))
    assert safe_load_path(path) == list(range(1000))


def test_wall_clock_budget():
    data = pickle.dumps([str(i) for i in range(50_000)], protocol=0)
    with pytest.raises(PickleLimitError, match="seconds"):
        safe_loads(data, limits=PickleLimits(max_seconds=0.0))
    assert len(safe_loads(data)) == 50_000


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_bytearray_and_bytes_still_round_trip(protocol):
    obj = {"ba": bytearray(b"\x00\xffxy"), "b": b"\x00\xff", "s": {(1, "a"), (2, "b")}, "f": frozenset({(1, (2, 3))})}
    assert safe_loads(pickle.dumps(obj, protocol=protocol)) == obj


@pytest.mark.parametrize(
    "data, name",
    [
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.", "encode"),
        (b"\x80\x02c__builtin__\nbytearray\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.", "bytearray"),
        (b"\x80\x02ccollections\nOrderedDict\n)Rq\x00}b.", "BUILD"),
    ],
)
def test_allowed_globals_only_take_plain_arguments(data, name):
    with pytest.raises(UnsafePickleError, match=name):
        safe_loads(data)
