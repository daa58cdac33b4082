"""Reading pickles from datasets without running code from them, within size, depth and time limits.

Dataset pickles (RefCOCO's ``refs(unc).p``, Describe Anything's per-sample ``{id}.pickle``) only hold
lists, dicts, strings and numbers, yet ``pickle.load`` would import and call any class a file names.
:func:`safe_loads` admits plain containers, numbers and strings (and the few helpers Python 2 and
protocol-2 pickles need to rebuild sets and bytes); anything else raises :class:`UnsafePickleError`
naming the class the file asked for.

Plain data can still be hostile: a 33-byte pickle can ask ``bytearray`` for a gigabyte, a few hundred
bytes of shared nested lists make a structure that is 2**40 elements when walked, and tuples shared the
same way take forever to hash as a dict key. So the loader (the pure-Python unpickler, instrumented;
about 4x slower than ``pickle.loads``, a few seconds for RefCOCO's largest refs file) also enforces
:class:`PickleLimits`, refusing with :class:`PickleLimitError` (naming the limit) when

* the file is over ``max_bytes`` (:data:`MAX_PICKLE_BYTES`), or a length field claims more data than the
  file holds (refused before anything is allocated);
* an allowed helper is asked for something it cannot do in time linear in the file: ``bytearray(n)``
  of an integer, ``_codecs.encode`` with another codec than a text encoding, a dict key or set element
  that is a tuple/frozenset of more than :data:`MAX_KEY_OBJECTS` elements (hashing a shared tuple is
  exponential);
* an opcode would build objects instead of plain data (``BUILD``, ``INST``, ``OBJ``, ``NEWOBJ``, extensions);
* the result, walked as a tree (a shared container counted each time it is referenced), holds more than
  ``max_objects`` elements (default ``2 x file bytes + 1,000,000``: plain data costs at least one byte an
  element, so only sharing or a cycle can exceed it) or nests deeper than ``max_depth``
  (:data:`MAX_PICKLE_DEPTH`) levels — so that whoever walks the data later (``str``, ``json.dumps``, a
  builder) does so in time linear in the file, without a ``RecursionError``;
* loading and checking take longer than ``max_seconds`` (:data:`MAX_PICKLE_SECONDS`, checked while loading).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable

MAX_PICKLE_BYTES = 1 << 30
"""Largest pickle file read (1 GiB; RefCOCO's refs files are 20–50 MB)."""
MAX_PICKLE_DEPTH = 100
"""Deepest container nesting admitted (dataset refs nest 4 levels)."""
MAX_PICKLE_SECONDS = 600.0
"""Wall-clock budget for loading and checking one pickle."""
MIN_OBJECT_BUDGET = 1_000_000
"""Elements always admitted, whatever the file size (see :class:`PickleLimits`)."""
MAX_KEY_OBJECTS = 10_000
"""Largest tuple/frozenset (elements, nested ones included) admitted as a dict key or set element."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a class or function outside the plain-data allow-list, or misused one."""


class PickleLimitError(UnsafePickleError):
    """A pickle exceeded one of the :class:`PickleLimits` (the message names the limit)."""


@dataclass(frozen=True)
class PickleLimits:
    """Resource limits of one load (see the module docstring)."""

    max_bytes: int = MAX_PICKLE_BYTES
    max_depth: int = MAX_PICKLE_DEPTH
    max_objects: int | None = None
    """Elements of the result walked as a tree; ``None``: ``2 x file bytes + MIN_OBJECT_BUDGET``."""
    max_seconds: float = MAX_PICKLE_SECONDS

    def objects_for(self, size: int) -> int:
        return self.max_objects if self.max_objects is not None else 2 * size + MIN_OBJECT_BUDGET


_ATOMS = (str, bytes, int, float, bool, complex, type(None))
_CONTAINERS = (list, tuple, dict, set, frozenset, bytearray, collections.OrderedDict)
_TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})


def _check_key(key: Any) -> None:
    """Refuse a dict key / set element whose hash would take long (a big or shared tuple/frozenset)."""
    if type(key) in _ATOMS:
        return
    if type(key) not in (tuple, frozenset):
        return  # lists, dicts …: hashing raises TypeError at once
    n, todo = 0, [key]
    while todo:
        o = todo.pop()
        n += len(o)
        if n > MAX_KEY_OBJECTS:
            raise PickleLimitError(
                f"a dict key or set element holds more than {MAX_KEY_OBJECTS} elements (fclm.data.safe_pickle.MAX_KEY_OBJECTS)"
            )
        todo.extend(c for c in o if type(c) in (tuple, frozenset))


def _checked_items(iterable: Any, what: str) -> list:
    if isinstance(iterable, int):
        raise UnsafePickleError(f"pickle calls {what}() with an integer; only an iterable of plain data is admitted")
    items = list(iterable)
    for item in items:
        _check_key(item)
    return items


def _set(iterable: Iterable = ()) -> set:
    return set(_checked_items(iterable, "set"))


def _frozenset(iterable: Iterable = ()) -> frozenset:
    return frozenset(_checked_items(iterable, "frozenset"))


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    pairs = list(items.items()) if isinstance(items, dict) else [tuple(p) for p in _checked_items(items, "OrderedDict")]
    for p in pairs:
        if len(p) != 2:
            raise UnsafePickleError("pickle calls OrderedDict() with an item that is not a (key, value) pair")
        _check_key(p[0])
    return collections.OrderedDict(pairs)


def _bytearray(source: Any = b"", encoding: str | None = None, errors: str | None = None) -> bytearray:
    if isinstance(source, int):  # bytearray(n) allocates n zero bytes: 1 GB from a 33-byte file
        raise UnsafePickleError(f"pickle calls bytearray({source}) of an integer; only bytearray(bytes | str, encoding) is admitted")
    if isinstance(source, str):
        if not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in _TEXT_ENCODINGS or errors not in (None, "strict"):
            raise UnsafePickleError(f"pickle calls bytearray(str, {encoding!r}); only a text encoding (latin-1, utf-8, ascii) is admitted")
        return bytearray(source, encoding)
    if encoding is not None or errors is not None:
        raise UnsafePickleError("pickle calls bytearray() with an encoding for a non-str source")
    if not isinstance(source, (bytes, bytearray, list, tuple)):
        raise UnsafePickleError(f"pickle calls bytearray() of {type(source).__name__}; only bytes, str or a list of ints is admitted")
    return bytearray(source)


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # protocol-2 pickles written by Python 3 rebuild bytes as _codecs.encode(str, "latin1")
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in _TEXT_ENCODINGS or errors != "strict":
        raise UnsafePickleError(f"pickle calls _codecs.encode({type(obj).__name__}, {encoding!r}); only encode(str, text encoding) is admitted")
    return obj.encode(encoding)


def _complex(real: Any = 0, imag: Any = 0) -> complex:
    if not isinstance(real, (int, float, str)) or not isinstance(imag, (int, float)):
        raise UnsafePickleError("pickle calls complex() with something other than numbers")
    return complex(real, imag) if not isinstance(real, str) else complex(real)


# (module, name) pairs a plain-data pickle may reference, each mapped to a checked stand-in.
# "__builtin__" is Python 2's "builtins"; "_codecs.encode" rebuilds ``bytes`` in protocol 2 pickles
# written by Python 3.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(mod, "set"): _set for mod in ("builtins", "__builtin__")},
    **{(mod, "frozenset"): _frozenset for mod in ("builtins", "__builtin__")},
    **{(mod, "bytearray"): _bytearray for mod in ("builtins", "__builtin__")},
    **{(mod, "complex"): _complex for mod in ("builtins", "__builtin__")},
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): _ordered_dict,
}

_OBJECT_OPCODES = {
    pickle.BUILD[0]: "BUILD",
    pickle.INST[0]: "INST",
    pickle.OBJ[0]: "OBJ",
    pickle.NEWOBJ[0]: "NEWOBJ",
    pickle.NEWOBJ_EX[0]: "NEWOBJ_EX",
    pickle.EXT1[0]: "EXT1",
    pickle.EXT2[0]: "EXT2",
    pickle.EXT4[0]: "EXT4",
}


def _printable(text: str) -> str:
    """A name from the file, as it may appear in a one-line message (``repr`` when odd, at most 80 characters)."""
    return text if len(text) <= 80 and text.isprintable() else repr(text[:80])


def _refuse_opcode(name: str):
    def load(self: "RestrictedUnpickler") -> None:
        raise UnsafePickleError(f"pickle uses the {name} opcode (builds an object); only plain data is admitted")

    return load


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode can be checked
    """Unpickler that resolves only a small allow-list of plain containers and enforces :class:`PickleLimits`.

    ``size`` is the number of bytes in ``file`` (length fields are checked against it).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, *, encoding: str = "utf-8", limits: PickleLimits | None = None, size: int | None = None):
        super().__init__(file, encoding=encoding)
        self.limits = limits or PickleLimits()
        self.size = size if size is not None else self.limits.max_bytes
        self.deadline = time.monotonic() + self.limits.max_seconds

    # -- what may be referenced --------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise UnsafePickleError(
                f"pickle refers to {_printable(module)}.{_printable(name)}; only plain containers, numbers and strings are admitted"
            )
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses persistent ids; only plain data is admitted")

    # -- opcodes that hash (dict keys, set elements) or allocate -----------------------------------

    def load_setitem(self) -> None:
        _check_key(self.stack[-2])
        super().load_setitem()

    def load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("DICT with an odd number of items")
        for i in range(0, len(items), 2):
            _check_key(items[i])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    def load_additems(self) -> None:
        items = self.pop_mark()
        for item in items:
            _check_key(item)
        target = self.stack[-1]
        if not isinstance(target, set):
            raise pickle.UnpicklingError("ADDITEMS on something that is not a set")
        target.update(items)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        for item in items:
            _check_key(item)
        self.append(frozenset(items))

    def load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self.size:
            raise PickleLimitError(f"pickle declares a bytearray of {n} bytes in a {self.size}-byte file")
        b = bytearray(n)
        self.readinto(b)
        self.append(b)

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    for _code, _name in _OBJECT_OPCODES.items():
        dispatch[_code] = _refuse_opcode(_name)
    del _code, _name

    # -- the loop, with the wall-clock budget ------------------------------------------------------

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise PickleLimitError(
                f"loading took more than {self.limits.max_seconds:g} seconds (PickleLimits.max_seconds)"
            )

    def load(self) -> Any:
        unframer, stop = getattr(pickle, "_Unframer", None), getattr(pickle, "_Stop", None)
        if unframer is None or stop is None:  # another Python's internals: no per-opcode clock
            obj = super().load()
        else:
            self._unframer = unframer(self._file_read, self._file_readline)
            self.read = self._unframer.read
            self.readinto = self._unframer.readinto
            self.readline = self._unframer.readline
            self.metastack = []
            self.stack = []
            self.append = self.stack.append
            self.proto = 0
            read, dispatch, n = self.read, self.dispatch, 0
            try:
                while True:
                    key = read(1)
                    if not key:
                        raise EOFError
                    dispatch[key[0]](self)
                    n += 1
                    if not n & 0xFFF:
                        self._check_time()
            except stop as stopinst:
                obj = stopinst.value
        check_structure(obj, self.limits, self.size, self.deadline)
        return obj


def check_structure(obj: Any, limits: PickleLimits, size: int, deadline: float | None = None) -> None:
    """Refuse ``obj`` if, walked as a tree, it holds too many elements (sharing, cycles) or nests too deep."""
    budget = limits.objects_for(size)
    n, todo = 0, [(obj, 0)]
    while todo:
        o, depth = todo.pop()
        if depth > limits.max_depth:
            raise PickleLimitError(f"pickle nests deeper than {limits.max_depth} levels (PickleLimits.max_depth)")
        if isinstance(o, dict):
            children: Iterable = o.values()
            keys = [k for k in o if type(k) in (tuple, frozenset)]
            if keys:
                todo.extend((k, depth + 1) for k in keys)
        elif isinstance(o, (bytearray, str, bytes)):
            continue
        else:
            children = o
        n += len(o)
        if n > budget:
            raise PickleLimitError(
                f"pickle holds more than {budget} objects when each reference to a shared container is counted "
                f"(a shared or cyclic structure; PickleLimits.max_objects, default 2 x file bytes + {MIN_OBJECT_BUDGET})"
            )
        todo.extend((c, depth + 1) for c in children if type(c) in _CONTAINERS)
        if deadline is not None and not n & 0xFFFF and time.monotonic() > deadline:
            raise PickleLimitError(f"checking took more than {limits.max_seconds:g} seconds (PickleLimits.max_seconds)")


def safe_load(file: BinaryIO, *, encoding: str = "utf-8", limits: PickleLimits | None = None) -> Any:
    """Unpickle plain data from a binary file object (read whole, at most ``limits.max_bytes``).

    ``encoding`` decodes Python 2 ``str`` objects (RefCOCO's pickles were written by Python 2).
    Raises :class:`UnsafePickleError` for a disallowed class or opcode, :class:`PickleLimitError`
    (a subclass) for a limit, and ``pickle.UnpicklingError`` / ``EOFError`` / ``ValueError`` for a
    corrupt file.
    """
    limits = limits or PickleLimits()
    chunks, n = [], 0
    while True:  # in chunks: read(max_bytes + 1) would allocate the whole limit up front
        chunk = file.read(min(1 << 20, limits.max_bytes + 1 - n))
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
        if n > limits.max_bytes:
            raise PickleLimitError(f"pickle is over the {limits.max_bytes}-byte limit (PickleLimits.max_bytes)")
    return safe_loads(b"".join(chunks), encoding=encoding, limits=limits)


def safe_loads(data: bytes, *, encoding: str = "utf-8", limits: PickleLimits | None = None) -> Any:
    """Unpickle plain data from bytes (see :func:`safe_load`)."""
    limits = limits or PickleLimits()
    if len(data) > limits.max_bytes:
        raise PickleLimitError(f"pickle of {len(data)} bytes is over the {limits.max_bytes}-byte limit (PickleLimits.max_bytes)")
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding=encoding, limits=limits, size=len(data))
    try:
        return unpickler.load()
    except RecursionError:
        raise PickleLimitError("pickle nests too deeply to load") from None
    except MemoryError:
        raise PickleLimitError("pickle asks for more memory than is available") from None
    except (pickle.UnpicklingError, EOFError, ValueError):
        raise
    except Exception as e:  # the pure-Python unpickler fails on corrupt data with IndexError, TypeError …
        raise pickle.UnpicklingError(f"corrupt pickle ({type(e).__name__}: {e})") from None


def safe_load_path(path: str | os.PathLike, *, encoding: str = "utf-8", limits: PickleLimits | None = None) -> Any:
    """Unpickle plain data from a file path (see :func:`safe_load`); a file over the size limit is not read."""
    limits = limits or PickleLimits()
    size = os.stat(path).st_size
    if size > limits.max_bytes:
        raise PickleLimitError(f"{os.fspath(path)} is {size} bytes, over the {limits.max_bytes}-byte limit (PickleLimits.max_bytes)")
    with open(path, "rb") as f:
        return safe_load(f, encoding=encoding, limits=limits)
