"""Seeded mutations of structured inputs: JSON trees, JSON Lines, pickles, tar shards and raw bytes.

Every function takes a ``random.Random`` and is deterministic given its state, so a case is
reproduced from ``(family, seed, index)`` alone. A mutation returns a description (for the report)
and the places it touched (:class:`Touch`), from which a family computes which records the
unmutated part of the input must still yield.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import random
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

# --------------------------------------------------------------------------------------------------
# Values that JSON or pickle cannot express directly
# --------------------------------------------------------------------------------------------------


class Special:
    """A value written specially by :func:`json_bytes` / :func:`pickle_bytes`.

    ``bigint`` (``arg`` = number of digits, beyond Python's int/str conversion limit), ``deep``
    (``arg`` = nesting depth of lists), ``badutf8`` (``arg`` = raw bytes inside a string), ``raw``
    (``arg`` = literal JSON text), ``laughs`` (pickle only: ``arg`` levels of a list holding the
    previous level twice — tiny on disk, 2**arg elements when walked; in JSON a short list).
    """

    def __init__(self, kind: str, arg: Any = None):
        self.kind, self.arg = kind, arg

    def __repr__(self) -> str:
        if self.kind == "badutf8":
            return f"<string with invalid UTF-8 {self.arg!r}>"
        if self.kind == "raw":
            return f"<raw JSON {self.arg[:40]!r}>"
        return f"<{self.kind} {self.arg}>"

    def __deepcopy__(self, memo):
        return self


class DupDict:
    """A JSON object with repeated keys (``pairs`` in order); pickled as a dict (last value wins)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        self.pairs = pairs

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in self.pairs) + "}"


class SelfRef:
    """Pickle only: a list that contains itself (``[…, <itself>]``)."""

    def __repr__(self) -> str:
        return "<self-referencing list>"


@dataclass
class Touch:
    """Where a mutation changed a tree: ``path`` (keys/indices from the root) and the operation.

    ``op`` is ``set`` (the value at ``path`` changed), ``insert``/``drop``/``dup`` (an element was
    inserted, removed or duplicated at index ``path[-1]`` of the list ``path[:-1]``), ``list`` (the
    list at ``path`` was reordered or emptied) or ``all`` (not localisable).
    """

    path: tuple
    op: str = "set"


def fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------


def json_bytes(obj: Any) -> bytes:
    """JSON text of ``obj`` (UTF-8), with :class:`Special`, :class:`DupDict`, NaN/Infinity and tuples."""
    out: list[bytes] = []
    _json(obj, out)
    return b"".join(out)


def _json(obj: Any, out: list[bytes]) -> None:
    if isinstance(obj, Special):
        if obj.kind == "bigint":
            out.append(b"9" * obj.arg)
        elif obj.kind == "deep":
            out.append(b"[" * obj.arg + b"]" * obj.arg)
        elif obj.kind == "badutf8":
            out.append(b'"ab' + obj.arg + b'cd"')
        elif obj.kind == "raw":
            out.append(obj.arg.encode("utf-8", "surrogatepass") if isinstance(obj.arg, str) else obj.arg)
        elif obj.kind == "laughs":
            out.append(b"[[], []]")
        else:
            raise ValueError(obj.kind)
    elif isinstance(obj, DupDict):
        out.append(b"{")
        for n, (k, v) in enumerate(obj.pairs):
            if n:
                out.append(b", ")
            out.append(json.dumps(str(k)).encode() + b": ")
            _json(v, out)
        out.append(b"}")
    elif isinstance(obj, (dict, OrderedDict)):
        out.append(b"{")
        for n, (k, v) in enumerate(obj.items()):
            if n:
                out.append(b", ")
            out.append(json.dumps(k if isinstance(k, str) else str(k)).encode() + b": ")
            _json(v, out)
        out.append(b"}")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        out.append(b"[")
        for n, v in enumerate(obj):
            if n:
                out.append(b", ")
            _json(v, out)
        out.append(b"]")
    elif isinstance(obj, SelfRef):
        out.append(b"[]")
    elif isinstance(obj, float):
        if math.isnan(obj):
            out.append(b"NaN")
        elif math.isinf(obj):
            out.append(b"Infinity" if obj > 0 else b"-Infinity")
        else:
            out.append(repr(obj).encode())
    elif isinstance(obj, bool) or obj is None:
        out.append(json.dumps(obj).encode())
    elif isinstance(obj, int):
        out.append(str(obj).encode())  # within the conversion limit: big ones are Special("bigint")
    elif isinstance(obj, str):
        out.append(json.dumps(obj).encode())  # ensure_ascii: a lone surrogate becomes \udXXX
    elif isinstance(obj, (bytes, bytearray)):
        out.append(json.dumps(obj.decode("latin-1")).encode())
    elif isinstance(obj, complex):
        out.append(json.dumps(str(obj)).encode())
    else:
        out.append(json.dumps(str(obj)).encode())


_MARK = "\x00fuzz-marker-{}\x00"


def pickle_bytes(obj: Any, protocol: int = 2) -> bytes:
    """Pickle ``obj`` (protocol 2, as the official refer files); :class:`Special` values become hand-written opcodes.

    ``protocol`` other than 2 is used only when no hand-written opcodes are needed."""
    patches: dict[str, bytes] = {}

    def conv(x: Any) -> Any:
        if isinstance(x, Special):
            if x.kind == "bigint":
                return 10 ** x.arg - 1  # no str conversion needed: pickled as a binary LONG
            if x.kind == "raw":
                try:
                    return json.loads(x.arg)
                except (ValueError, RecursionError):
                    return str(x.arg)
            marker = _MARK.format(len(patches))
            if x.kind == "deep":
                patches[marker] = b"]" * x.arg + b"a" * (x.arg - 1)  # EMPTY_LIST ×d, APPEND ×(d-1)
            elif x.kind == "badutf8":
                raw = b"ab" + x.arg + b"cd"
                patches[marker] = b"U" + bytes([len(raw)]) + raw  # a Python 2 str, decoded as UTF-8 on load
            elif x.kind == "laughs":
                memo = struct.pack("<I", 4_000_000 + len(patches))
                put, get = b"r" + memo, b"j" + memo  # LONG_BINPUT / LONG_BINGET at an index pickle.dumps never uses
                patches[marker] = b"]" + put + b"0" + (b"(" + get + get + b"l" + put + b"0") * x.arg + get
            else:
                raise ValueError(x.kind)
            return marker
        if isinstance(x, DupDict):
            return {k: conv(v) for k, v in x.pairs}
        if isinstance(x, SelfRef):
            lst: list = [1]
            lst.append(lst)
            return lst
        if isinstance(x, OrderedDict):
            return OrderedDict((k, conv(v)) for k, v in x.items())
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, tuple):
            return tuple(conv(v) for v in x)
        return x

    value = conv(obj)
    try:
        data = pickle.dumps(value, protocol=2 if patches else protocol)
    except ValueError:  # protocols 0 and 1 write ints as text: a 5,000-digit one cannot be
        data = pickle.dumps(value, protocol=2)
    for marker, opcodes in patches.items():
        enc = marker.encode("utf-8")
        old = b"X" + struct.pack("<I", len(enc)) + enc  # BINUNICODE
        data = data.replace(old, opcodes, 1)  # (absent when a repeated key dropped the value)
    return data


# --------------------------------------------------------------------------------------------------
# Odd values
# --------------------------------------------------------------------------------------------------

NUMBERS = [
    float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 1e18, -1.0, -1, 0, 0.5, 2**31, -(2**31), 2**63, 2**64, 10**30,
]


def odd_value(rng: random.Random, pickle_ok: bool = False) -> Any:
    """A value of a surprising type or size."""
    choices = [
        lambda: rng.choice(NUMBERS),
        lambda: Special("bigint", rng.choice([400, 5000])),
        lambda: Special("raw", rng.choice(["1e999", "-1e999", "-0", "1E400", "0.0000000000000000000000000001", "123456789012345678901234567890"])),
        lambda: rng.choice([True, False, None]),
        lambda: rng.choice(["", " ", "a string", "-1", "NaN", "1e999", "[]", "{}", "<region>", "[SEG]", "../../etc/passwd", "\x00", "é\u202e"]),
        lambda: "x" * rng.choice([1000, 100_000]),
        lambda: "\ud800" + rng.choice(["", "x", "\udfff"]),  # lone surrogate(s)
        lambda: Special("badutf8", rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"])),
        lambda: rng.choice([[], {}, [1, 2], {"x": 1}, [None], [[]], {"": None}]),
        lambda: Special("deep", rng.choice([64, 2000, 100_000])),
    ]
    if pickle_ok:
        choices += [
            lambda: Special("laughs", rng.choice([20, 40, 64])),
            lambda: rng.choice([(1, 2), (), {1, 2}, frozenset(), b"bytes", bytearray(b"ba"), complex(1, 2), OrderedDict(a=1)]),
            lambda: SelfRef(),
            lambda: {(1, 2): "tuple key", 3: "int key", None: "none key"},
        ]
    return rng.choice(choices)()


def wrong_type(v: Any, rng: random.Random) -> Any:
    """The same content in another JSON type."""
    if isinstance(v, bool):
        return rng.choice([str(v).lower(), int(v), [v]])
    if isinstance(v, (int, float)):
        return rng.choice([str(v), [v], {"value": v}, bool(v)])
    if isinstance(v, str):
        return rng.choice([len(v), [v], {"text": v}, None])
    if isinstance(v, list):
        return rng.choice([{str(i): x for i, x in enumerate(v)}, tuple(v), json.dumps(v, default=str), len(v)])
    if isinstance(v, dict):
        return rng.choice([list(v.values()), list(v.items()), json.dumps(v, default=str), len(v)])
    return rng.choice([0, "", [], {}])


# --------------------------------------------------------------------------------------------------
# Trees: paths, getting and setting
# --------------------------------------------------------------------------------------------------


def nodes(tree: Any, path: tuple = (), rng: random.Random | None = None) -> Iterator[tuple[tuple, Any]]:
    """``(path, node)`` of every node; long lists of numbers contribute only a few elements."""
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from nodes(v, path + (k,), rng)
    elif isinstance(tree, list):
        idx = range(len(tree))
        if len(tree) > 8 and all(isinstance(x, (int, float)) for x in tree):
            idx = sorted({0, len(tree) - 1, len(tree) // 2})
        for i in idx:
            yield from nodes(tree[i], path + (i,), rng)


def get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def put(tree: Any, path: tuple, value: Any) -> Any:
    """Set ``path`` to ``value`` (in place; returns the new root when ``path`` is empty)."""
    if not path:
        return value
    get(tree, path[:-1])[path[-1]] = value
    return tree


def is_rle(x: Any) -> bool:
    return isinstance(x, dict) and "counts" in x and "size" in x


def is_polygons(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(p, list) and p and all(isinstance(v, (int, float)) for v in p) for p in x)


def is_box(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)


ID_KEYS = ("id", "ref_id", "ann_id", "image_id", "sent_id", "category_id", "file_name", "split")


# --------------------------------------------------------------------------------------------------
# RLE / polygon / box mutations
# --------------------------------------------------------------------------------------------------


def rle_string(runs: list[int]) -> str:
    """COCO compressed RLE string of ``runs`` (``rleToString`` of the COCO API)."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def mutate_rle(rle: dict, rng: random.Random) -> tuple[Any, str]:
    rle = copy.deepcopy(rle)
    counts, size = rle.get("counts"), rle.get("size")
    op = rng.randrange(9)
    if op == 0 and isinstance(counts, str) and len(counts) > 1:
        cut = rng.randrange(1, len(counts))
        rle["counts"] = counts[:cut]
        return rle, f"RLE counts truncated to {cut} of {len(counts)} characters"
    if op == 1 and isinstance(counts, str) and counts:
        i = rng.randrange(len(counts))
        ch = rng.choice(["!", "~", "\x7f", " ", "é", "\ud800", "\x00"])
        rle["counts"] = counts[:i] + ch + counts[i + 1 :]
        return rle, f"RLE counts character {i} replaced by {ch!r}"
    if op == 2:
        extra = rng.choice(["0", "P", "oooooooo", rle_string([5, 5]), "1" * 2000])
        rle["counts"] = (counts if isinstance(counts, str) else "") + extra
        return rle, f"RLE counts with extra runs {short(extra, 20)}"
    if op == 3:
        if isinstance(counts, list) and counts:
            i = rng.randrange(len(counts))
            v = rng.choice([-1, -(10**9), 10**20, 1.5, float("nan"), True, "3", None])
            rle["counts"] = counts[:i] + [v] + counts[i + 1 :]
            return rle, f"uncompressed RLE counts[{i}] = {v!r}"
        v = rng.choice([[-5, 10], [10**20], [1.5, 2.5], [float("nan")], [True, False], ["1"], []])
        rle["counts"] = v
        return rle, f"RLE counts = {v!r}"
    if op == 4:
        v = rng.choice([None, 7, 3.5, {"a": 1}, b"", "", Special("badutf8", b"\xff\xfe")])
        rle["counts"] = v
        return rle, f"RLE counts = {v!r}"
    if op == 5:
        v = rng.choice([[100000, 100000], [2**31, 2**31], [2**16, 2**16], [16384, 16385], [0, 10], [-10, 10], [10], [10, 10, 3],
                        ["10", "10"], [10.0, 10.0], [True, 10], [float("nan"), 10], None, 10, [2**64, 1], [1, 2**62], [Special("bigint", 5000), 1]])
        rle["size"] = v
        return rle, f"RLE size = {v!r}"
    if op == 6:
        # a consistent but huge mask: size and runs agree, a few foreground pixels at the end
        h, w = rng.choice([(16384, 16384), (16384, 16385), (2**15, 2**15), (1, 2**28), (65536, 65536)])
        rle["size"], rle["counts"] = [h, w], rle_string([h * w - 10, 10])
        return rle, f"consistent huge RLE of size {h}x{w}"
    if op == 7:
        k = rng.choice(["counts", "size"])
        rle.pop(k, None)
        return rle, f"RLE without {k!r}"
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
        h, w = size
        rle["size"] = [w, h] if h != w else [h + 1, w]
        return rle, f"RLE size swapped/changed to {rle['size']}"
    rle["size"] = [7, 7]
    return rle, "RLE size [7, 7]"


def mutate_polygons(polys: list, rng: random.Random) -> tuple[Any, str]:
    polys = copy.deepcopy(polys)
    op = rng.randrange(7)
    k = rng.randrange(len(polys))
    if op <= 2:
        i = rng.randrange(len(polys[k]))
        v = rng.choice([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 1e10, -1e10, 2**31, 2**63, 10**30,
                        Special("bigint", 400), Special("raw", "1e999"), "12", None, True, [1, 2]])
        polys[k][i] = v
        return polys, f"polygon {k} coordinate {i} = {short(v)}"
    if op == 3:
        polys[k] = polys[k][: rng.choice([0, 1, 2, 3, 4, 5])]
        return polys, f"polygon {k} cut to {len(polys[k])} numbers"
    if op == 4:
        n = rng.choice([10**5, 3 * 10**5])
        polys[k] = [float(rng.randrange(0, 40)) for _ in range(2 * n)]
        return polys, f"polygon {k} with {n} random points"
    if op == 5:
        v = rng.choice([[], [[]], [[[1, 2, 3, 4, 5, 6]]], [polys[k], "x"], [{"x": 1}], [polys[k] * 1000]])
        return v, f"polygon list replaced by {short(v)}"
    polys[k] = [v * rng.choice([1000.0, -1.0, 1e6]) for v in polys[k]]
    return polys, f"polygon {k} scaled far outside the image"


def mutate_box(box: list, rng: random.Random) -> tuple[Any, str]:
    box = list(box)
    op = rng.randrange(4)
    if op == 0:
        i = rng.randrange(4)
        box[i] = rng.choice([float("nan"), float("inf"), -1e308, 1e308, -5, "3", None, Special("bigint", 400)])
        return box, f"box[{i}] = {short(box[i])}"
    if op == 1:
        return box[: rng.choice([0, 2, 3])] or [], "box too short"
    if op == 2:
        return box + [1, 2], "box with 6 numbers"
    return [box[2], box[3], box[0] - 50, box[1] - 50], "box with negative size"


# --------------------------------------------------------------------------------------------------
# Tree mutations
# --------------------------------------------------------------------------------------------------


def mutate_tree(tree: Any, rng: random.Random, *, pickle_ok: bool = False, protect_root: bool = False, n: int | None = None) -> tuple[Any, list[str], list[Touch]]:
    """Apply 1–3 random mutations to a deep copy of ``tree``; return ``(tree, descriptions, touches)``."""
    tree = copy.deepcopy(tree)
    n = n if n is not None else rng.choice([1, 1, 1, 2, 3])
    descs, touches = [], []
    for _ in range(n):
        tree, d, t = _mutate_once(tree, rng, pickle_ok, protect_root)
        descs.append(d)
        touches.append(t)
    return tree, descs, touches


def _mutate_once(tree: Any, rng: random.Random, pickle_ok: bool, protect_root: bool) -> tuple[Any, str, Touch]:
    allnodes = [(p, x) for p, x in nodes(tree) if not (protect_root and not p)]
    if not allnodes:
        return tree, "nothing to mutate", Touch((), "all")
    domain = [(p, x) for p, x in allnodes if is_rle(x) or is_polygons(x) or is_box(x)]
    idlike = [(p, x) for p, x in allnodes if p and p[-1] in ID_KEYS]
    containers = [(p, x) for p, x in allnodes if isinstance(x, (dict, list)) and not (isinstance(x, list) and x and all(isinstance(v, (int, float)) for v in x))]
    r = rng.random()
    if domain and r < 0.3:
        path, x = rng.choice(domain)
        if is_rle(x):
            new, d = mutate_rle(x, rng)
        elif is_box(x):
            new, d = mutate_box(x, rng)
        elif path and path[-1] in ("bbox", "box", "boxes") and all(is_box(b) for b in x):
            j = rng.randrange(len(x))
            new = copy.deepcopy(x)
            new[j], d = mutate_box(x[j], rng)
            d = f"[{j}] {d}"
        else:
            new, d = mutate_polygons(x, rng)
        return put(tree, path, new), f"{fmt_path(path)}: {d}", Touch(path)
    if idlike and r < 0.42:
        path, x = rng.choice(idlike)
        parent = get(tree, path[:-1])
        op = rng.randrange(3)
        if op == 0 and isinstance(parent, dict):
            del parent[path[-1]]
            return tree, f"{fmt_path(path)}: key dropped", Touch(path)
        v = odd_value(rng, pickle_ok) if op == 1 else wrong_type(x, rng)
        return put(tree, path, v), f"{fmt_path(path)} = {short(v)}", Touch(path)
    if containers and r < 0.72:
        path, x = rng.choice(containers)
        if isinstance(x, dict):
            return _mutate_dict(tree, path, x, rng, pickle_ok)
        return _mutate_list(tree, path, x, rng, pickle_ok)
    numeric = [(p, x) for p, x in allnodes if p and isinstance(x, (int, float)) and not isinstance(x, bool)]
    if numeric and r < 0.8:  # a plausible but wrong number (a size, an id, an offset off by a little)
        path, x = rng.choice(numeric)
        v = rng.choice([x + 1, x - 1, x * 2, x // 2 if isinstance(x, int) else x / 2, -x, 0, x + 40])
        return put(tree, path, v), f"{fmt_path(path)} = {short(v)} (was {short(x)})", Touch(path)
    path, x = rng.choice(allnodes)
    op = rng.randrange(4)
    if op == 0:
        v = wrong_type(x, rng)
    elif op == 1 and path:
        v = [x] if rng.random() < 0.5 else {"value": x}
    else:
        v = odd_value(rng, pickle_ok)
    return put(tree, path, v), f"{fmt_path(path)} = {short(v)}", Touch(path)


def _mutate_dict(tree: Any, path: tuple, d: dict, rng: random.Random, pickle_ok: bool) -> tuple[Any, str, Touch]:
    keys = list(d)
    op = rng.randrange(4)
    if op == 0 and keys:
        k = rng.choice(keys)
        del d[k]
        return tree, f"{fmt_path(path + (k,))}: key dropped", Touch(path + (k,))
    if op == 1 and keys:
        k = rng.choice(keys)
        other = odd_value(rng, pickle_ok)
        pairs = [(kk, d[kk]) for kk in keys]
        at = keys.index(k)
        if rng.random() < 0.5:
            pairs.insert(at + 1, (k, other))
            d_desc = f"{fmt_path(path + (k,))}: key repeated, second value {short(other)}"
        else:
            pairs.insert(at, (k, other))
            d_desc = f"{fmt_path(path + (k,))}: key repeated, first value {short(other)}"
        return put(tree, path, DupDict(pairs)), d_desc, Touch(path + (k,))
    if op == 2:
        k = rng.choice(["extra", "", "__class__", "\ud800", "id", "regions", "__proto__"])
        if k in d:
            k = k + "_x"
        d[k] = odd_value(rng, pickle_ok)
        return tree, f"{fmt_path(path)}: unknown key {k!r} added", Touch(path)
    v = rng.choice([[], None, "", 0, list(d.values())])
    return put(tree, path, v), f"{fmt_path(path)}: object replaced by {short(v)}", Touch(path)


def _mutate_list(tree: Any, path: tuple, lst: list, rng: random.Random, pickle_ok: bool) -> tuple[Any, str, Touch]:
    op = rng.randrange(6)
    if op == 0 and lst:
        i = rng.randrange(len(lst))
        del lst[i]
        return tree, f"{fmt_path(path + (i,))}: element dropped", Touch(path + (i,), "drop")
    if op == 1 and lst:
        i = rng.randrange(len(lst))
        lst.insert(i, copy.deepcopy(lst[i]))
        return tree, f"{fmt_path(path + (i,))}: element duplicated", Touch(path + (i,), "dup")
    if op == 2:
        i = rng.randrange(len(lst) + 1)
        v = rng.choice([None, 0, "s", [], [1, 2], True, float("nan"), odd_value(rng, pickle_ok)])
        lst.insert(i, v)
        return tree, f"{fmt_path(path + (i,))}: non-object element {short(v)} inserted", Touch(path + (i,), "insert")
    if op == 3:
        lst.clear()
        return tree, f"{fmt_path(path)}: list emptied", Touch(path, "list")
    if op == 4 and len(lst) > 1:
        lst.reverse()
        return tree, f"{fmt_path(path)}: list reversed", Touch(path, "list")
    v = rng.choice([{}, None, "", 0, {str(i): x for i, x in enumerate(lst)}])
    return put(tree, path, v), f"{fmt_path(path)}: list replaced by {short(v)}", Touch(path)


# --------------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------------

INSERTS = [b"\x00", b"\xff", b"\xfe\xff", b"\n", b"\r", b'"', b"{", b"]", b"\\", b"\xed\xa0\x80", b"\xc3", b"\xef\xbb\xbf", b"NaN", b"\x80\x02", b"." ]


def mutate_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> tuple[bytes, str, int]:
    """Flip, truncate, insert, delete or duplicate bytes in ``data[lo:hi]``; return ``(data, description, offset)``."""
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return data + b"\xff", "byte 0xff appended", len(data)
    op = rng.randrange(6)
    at = rng.randrange(lo, hi)
    if op == 0:
        n = rng.choice([1, 1, 2, 4, 8])
        b = bytearray(data)
        flipped = []
        for _ in range(n):
            i = rng.randrange(lo, hi)
            bit = 1 << rng.randrange(8)
            b[i] ^= bit
            flipped.append(i)
        return bytes(b), f"{n} bit(s) flipped at offset(s) {sorted(flipped)}", min(flipped)
    if op == 1:
        return data[:at], f"truncated to {at} of {len(data)} bytes", at
    if op == 2:
        ins = rng.choice(INSERTS) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 16])))
        return data[:at] + ins + data[at:], f"{ins!r} inserted at offset {at}", at
    if op == 3:
        n = rng.choice([1, 2, 10, 100])
        return data[:at] + data[at + n :], f"{n} byte(s) deleted at offset {at}", at
    if op == 4:
        n = rng.choice([1, 10, 100, 1000])
        return data[:at] + data[at : at + n] * 2 + data[at + n :], f"{n} byte(s) duplicated at offset {at}", at
    i = rng.randrange(lo, hi)
    v = rng.choice([0, 0xFF, 0x7F, 0x80])
    return data[:i] + bytes([v]) + data[i + 1 :], f"byte {i} set to {v:#04x}", i


# --------------------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------------------


def mutate_jsonl(lines: list[Any], rng: random.Random) -> tuple[bytes, str, bool]:
    """Mutate a JSON Lines file given as its records; return ``(bytes, description, breaks_a_line)``.

    ``breaks_a_line``: some line is no longer one valid JSON value (an error about it should name its line).
    Which records survive untouched is decided afterwards by comparing lines (see :func:`untouched_lines`).
    """
    enc = [json_bytes(r) for r in lines]
    k = rng.randrange(len(enc)) if enc else 0
    r = rng.random()
    if r < 0.45 and enc:  # a JSON-aware mutation of one record
        rec, descs, _ = mutate_tree(lines[k], rng)
        enc[k] = json_bytes(rec)
        return _join(enc), f"line {k + 1}: " + "; ".join(descs), _breaks(enc[k])
    if r < 0.6 and enc:  # bytes of one line
        data, d, _ = mutate_bytes(enc[k], rng)
        enc[k] = data
        return _join(enc), f"line {k + 1}: {d}", True
    if r < 0.68 and enc:
        op = rng.randrange(3)
        if op == 0:
            del enc[k]
            return _join(enc), f"line {k + 1} dropped", False
        enc.insert(k + rng.randrange(2), enc[k])
        return _join(enc), f"line {k + 1} duplicated", False
    if r < 0.76:
        v = rng.choice([b"[1, 2]", b"1", b"null", b'"s"', b"true", b"[]", b"NaN", b"{}", b"[" * 100_000 + b"]" * 100_000, b"9" * 5000])
        enc.insert(rng.randrange(len(enc) + 1), v)
        return _join(enc), f"line {short(v[:30])} inserted", v.startswith(b"[[") or v.startswith(b"999")
    if r < 0.82:
        ws = rng.choice([b"", b"   ", b"\t", b"\r", b"\x0c", b"\x00", b"\xef\xbb\xbf"])
        enc.insert(rng.randrange(len(enc) + 1), ws)
        return _join(enc), f"line {ws!r} inserted", ws in (b"\x00", b"\xef\xbb\xbf", b"\x0c")
    if r < 0.86:
        return b"\r\n".join(enc) + b"\r\n", "CRLF line endings", False
    if r < 0.89:
        return b"\xef\xbb\xbf" + _join(enc), "UTF-8 byte order mark at the start", True
    if r < 0.92:
        data = _join(enc)
        return data[:-1], "no newline at the end", False
    if r < 0.96 and enc:  # invalid UTF-8 inside a string of one line (the rest of the line is valid JSON)
        j = enc[k].find(b'": "')
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"])
        if j >= 0:
            enc[k] = enc[k][: j + 4] + bad + enc[k][j + 4 :]
        else:
            enc[k] = enc[k] + bad
        return _join(enc), f"line {k + 1}: invalid UTF-8 {bad!r} inside a string", True
    data, d, _ = mutate_bytes(_join(enc), rng)
    return data, f"file bytes: {d}", True


def jsonl_breaks(data: bytes) -> bool:
    """Whether some non-blank line of ``data`` is not valid UTF-8 JSON (an error about it should name its line)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a byte order mark before the first line: accepted or reported, either is fine
    for line in data.split(b"\n"):
        if line.strip() and _breaks(line):
            return True
    return False


def _join(enc: list[bytes]) -> bytes:
    return b"".join(e + b"\n" for e in enc)


def _breaks(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return True
    return False


def untouched_lines(original: list[bytes], mutated: bytes) -> list[tuple[int, bytes]]:
    """``(line number in the mutated file, content)`` of each original line that is still present, whole and unique.

    A line counts as untouched when the same bytes (ignoring a trailing ``\\r``) occur as a line of the
    mutated file exactly as often as in the original; a line whose content now appears more often
    (duplicated) is touched.
    """
    orig = [o.rstrip(b"\r") for o in original]
    lines = [m.rstrip(b"\r") for m in mutated.split(b"\n")]
    if mutated.startswith(b"\xef\xbb\xbf") and lines:
        lines[0] = b"\x00BOM" + lines[0]
    out = []
    for n, line in enumerate(lines, start=1):
        if line and line in orig and lines.count(line) == orig.count(line):
            out.append((n, line))
    return out


# --------------------------------------------------------------------------------------------------
# Pickles
# --------------------------------------------------------------------------------------------------


class _Reducer:
    """An object that pickles as a call ``func(*args)`` (for unsafe and memory-bomb pickles)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def unsafe_pickle(rng: random.Random, marker: str, inner: Any) -> tuple[bytes, str]:
    """A pickle that would run code or allocate without bound if loaded with plain ``pickle.load``."""
    import os
    import pathlib

    op = rng.randrange(6)
    if op == 0:
        obj, d = [_Reducer(pathlib.Path.touch, (pathlib.Path(marker),))], "pickle calling pathlib.Path.touch (creates a marker file)"
    elif op == 1:
        obj, d = [_Reducer(os.system, (f"touch {marker}",))], "pickle calling os.system"
    elif op == 2:
        obj, d = [_Reducer(eval, (f"open({marker!r}, 'w')",))], "pickle calling builtins.eval"
    elif op == 3:
        n = rng.choice([2**40, 2**34, 2**62])
        obj, d = [_Reducer(bytearray, (n,))], f"pickle calling the allowed bytearray({n}) (memory bomb)"
    elif op == 4:
        obj, d = [_Reducer(getattr, (inner, "__class__"))], "pickle calling builtins.getattr"
    else:
        obj, d = [_Reducer(set, ([[1], [2]],))], "pickle calling set() on unhashable items"
    return pickle.dumps(obj, protocol=2), d


ODD_PICKLES: list[tuple[bytes, str]] = [
    (b"", "empty file"),
    (b".", "STOP only"),
    (b"\x80\x06.", "protocol 6 header"),
    (b"\x80\x02N.", "None"),
    (b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"ab.", "BINBYTES8 declaring 2**62 bytes"),
    (b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"x.", "BINUNICODE8 declaring 2**40 bytes"),
    (b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"\x00\x00\x00\x00.", "LONG4 declaring 2 GiB"),
    (b"\x80\x02B" + struct.pack("<i", 2**31 - 1) + b"xy.", "BINSTRING declaring 2 GiB"),
    (b"\x80\x02h\x05.", "GET of a memo entry never stored"),
    (b"\x80\x05\x97.", "NEXT_BUFFER (out-of-band data)"),
    (b"\x80\x02\x82\x01.", "EXT1 (copyreg extension registry)"),
    (b"\x80\x02Pfoo\n.", "PERSID"),
    (b"(i__builtin__\nset\n.", "INST of builtins.set"),
    (b"\x80\x02c__builtin__\nset\n)\x81.", "NEWOBJ of builtins.set"),
    (b"\x80\x02]}b.", "BUILD on a list"),
    (b"\x80\x02}(]]u.", "a list as a dict key"),
    (b"\x80\x02c__builtin__\ncomplex\nX\x03\x00\x00\x00nan\x85R.", "complex('nan')"),
    (b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x04\x00\x00\x00zlib\x86R.", "_codecs.encode(str, 'zlib')"),
    (b"\x80\x02ccollections\nOrderedDict\n]](K\x01K\x02K\x03ea\x85R.", "OrderedDict of a 3-element item"),
    (b"\x80\x02c__builtin__\nfrozenset\n]" + b"(" + b"K\x01" * 3 + b"e\x85R.", "frozenset"),
    (b"\x80\x02]q\x00" + b"(h\x00h\x00lq\x00" * 60 + b"h\x00.", "2**60 elements when walked (shared lists)"),
    (b"\x80\x02)q\x00" + b"(h\x00h\x00tq\x00" * 60 + b"}h\x00K\x01s.", "a dict key that is a 2**60-element shared tuple"),
    (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.", "bytearray(2**30)"),
    (b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.", "os.system('true')"),
    (b"cposix\nsystem\n(S'true'\ntR.", "protocol 0 posix.system"),
]


def odd_opcode_pickle(rng: random.Random) -> tuple[bytes, str]:
    data, d = rng.choice(ODD_PICKLES)
    return data, f"hand-written pickle: {d}"


def deep_pickle(depth: int) -> bytes:
    """A protocol-2 pickle of ``depth`` nested lists, written as opcodes (pickle.dumps would recurse)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


# --------------------------------------------------------------------------------------------------
# Tar shards
# --------------------------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # declared size when different from len(data)


def write_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.type
            info.linkname = m.linkname
            info.mode = 0o644
            if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                info.size = 0
                tf.addfile(info)
    data = buf.getvalue()
    return data


def declared_size_tar(members: list[Member], index: int, size: int) -> bytes:
    """The tar of ``members`` with member ``index``'s header declaring ``size`` bytes (checksum fixed)."""
    data = bytearray(write_tar(members))
    off = _header_offsets(bytes(data))[index]
    field = (b"%011o" % size + b"\x00") if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    data[off + 124 : off + 136] = field
    data[off + 148 : off + 156] = b"        "
    chk = sum(data[off : off + 512])
    data[off + 148 : off + 156] = b"%06o\x00 " % chk
    return bytes(data)


def _header_offsets(data: bytes) -> list[int]:
    """Offset of each member's own header block (after any GNU long-name blocks)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [m.offset_data - 512 for m in tf.getmembers()]


def member_spans(data: bytes) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` byte range (header to padded data end) of each member of a tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [(m.name, m.offset, m.offset_data + ((m.size + 511) // 512) * 512) for m in tf.getmembers()]
