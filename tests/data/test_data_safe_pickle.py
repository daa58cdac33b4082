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
