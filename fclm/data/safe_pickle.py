"""Reading pickles from datasets without running code from them.

Dataset pickles (RefCOCO's ``refs(unc).p``, Describe Anything's per-sample ``{id}.pickle``) only hold
lists, dicts, strings and numbers, yet ``pickle.load`` would import and call any class a file names.
:func:`safe_loads` admits plain containers, numbers and strings (and the few helpers Python 2 and
protocol-2 pickles need to rebuild sets and bytes); anything else raises :class:`UnsafePickleError`
naming the class the file asked for.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

# (module, name) pairs a plain-data pickle may reference. "__builtin__" is Python 2's "builtins";
# "_codecs.encode" rebuilds ``bytes`` in protocol 2 pickles written by Python 3.
_ALLOWED_GLOBALS = frozenset(
    {(mod, name) for mod in ("builtins", "__builtin__") for name in ("set", "frozenset", "bytearray", "complex")}
    | {("_codecs", "encode"), ("collections", "OrderedDict")}
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a class or function outside the plain-data allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals in a small allow-list of plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)  # the base class maps Python 2 names
        raise UnsafePickleError(
            f"pickle refers to {module}.{name}; only plain containers, numbers and strings are admitted"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses persistent ids; only plain data is admitted")


def safe_load(file: BinaryIO, *, encoding: str = "utf-8") -> Any:
    """Unpickle plain data from a binary file object.

    ``encoding`` decodes Python 2 ``str`` objects (RefCOCO's pickles were written by Python 2).
    Raises :class:`UnsafePickleError` for a disallowed class and ``pickle.UnpicklingError`` /
    ``EOFError`` / ``ValueError`` for a corrupt file.
    """
    return RestrictedUnpickler(file, encoding=encoding).load()


def safe_loads(data: bytes, *, encoding: str = "utf-8") -> Any:
    """Unpickle plain data from bytes (see :func:`safe_load`)."""
    return safe_load(io.BytesIO(data), encoding=encoding)


def safe_load_path(path: str | os.PathLike, *, encoding: str = "utf-8") -> Any:
    """Unpickle plain data from a file path (see :func:`safe_load`)."""
    with open(path, "rb") as f:
        return safe_load(f, encoding=encoding)
