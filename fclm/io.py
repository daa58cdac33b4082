"""Reading and writing files without losing anything.

* ``iter_jsonl`` reads JSON Lines and reports a bad line (malformed JSON, invalid UTF-8, a lone
  surrogate escape, nesting deeper than :data:`MAX_JSON_DEPTH`) with its file and line number; in
  lenient mode the line is recorded in an :class:`ErrorReport` and skipped, in strict mode it raises.
* ``read_json`` reads one whole JSON document; a failure is one :class:`RecordError` line naming the
  file (and the byte/line of invalid UTF-8, the line/column of malformed JSON).
* ``atomic_write`` / ``write_jsonl`` / ``write_json`` write to a temporary file in the target's
  folder and rename it over the target, so a killed job never leaves a half-written file;
  ``write_jsonl`` reports (or raises for) a record that cannot be written as UTF-8 JSON, by its id.
* ``ResumableJsonl`` appends whole lines to an output that a rerun resumes (ids already written are skipped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

logger = logging.getLogger(__name__)


class RecordError(ValueError):
    """A problem with one record or line of an input file.

    The message always names where the problem is (``file:line`` or ``file[key]``) and what it is.
    """

    def __init__(self, where: str, problem: str):
        self.where = one_line(str(where))
        self.problem = one_line(str(problem))
        super().__init__(f"{self.where}: {self.problem}")


@dataclass
class ErrorReport:
    """Collects skipped inputs so that a long job reports them instead of crashing or hiding them."""

    strict: bool = False
    problems: list[RecordError] = field(default_factory=list)
    max_logged: int = 20

    def add(self, error: RecordError) -> None:
        """Record ``error``; raise it instead when strict."""
        if self.strict:
            raise error
        self.problems.append(error)
        if len(self.problems) <= self.max_logged:
            logger.warning("skipped %s", error)

    @property
    def count(self) -> int:
        return len(self.problems)

    def summary(self) -> str:
        if not self.problems:
            return "0 problems"
        lines = [f"{self.count} problem(s), each skipped:"]
        lines += [f"  {e}" for e in self.problems[: self.max_logged]]
        if self.count > self.max_logged:
            lines.append(f"  … and {self.count - self.max_logged} more")
        return "\n".join(lines)


MAX_JSON_DEPTH = 100
"""Deepest nesting of arrays/objects admitted in one JSON Lines record (records nest about 7 levels).
Deeper lines are reported and skipped: Python's ``json`` raises ``RecursionError`` near 1000 levels, and
whatever walks a record later (``json.dumps``, ``repr``) would fail the same way."""

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether the arrays/objects of JSON ``text`` nest deeper than ``limit`` (brackets in strings ignored)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = 0
    for c in brackets:
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def find_lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) of a parsed JSON value holding a lone UTF-16 surrogate, else None.

    ``json`` turns an escape such as ``"\\ud800"`` into a ``str`` that cannot be written as UTF-8.
    """
    todo = [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, str):
            if _SURROGATE.search(o):
                return o
        elif isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, list):
            todo.extend(o)
    return None


def one_line(s: str) -> str:
    """``s`` printable on one line: line breaks and other control characters escaped, lone surrogates too."""
    if _CONTROL.search(s):
        s = _CONTROL.sub(lambda m: repr(m.group(0))[1:-1], s)
    return safe_text(s)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


def safe_text(s: str) -> str:
    """``s`` with lone surrogates written as ``\\udXXX`` (so that it can be printed and written as UTF-8)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(s) else s


def iter_jsonl(
    path: str | os.PathLike, report: ErrorReport | None = None, *, max_depth: int = MAX_JSON_DEPTH
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file (1-based numbers).

    Each line is decoded on its own, so one bad line costs that line only. A line that is not valid
    UTF-8, not valid JSON, not a JSON object, nested deeper than ``max_depth`` or holding a lone
    surrogate escape (``"\\ud800"``) raises :class:`RecordError` naming the file and line, unless a
    lenient ``report`` is given, in which case it is recorded and skipped. A UTF-8 byte-order mark on
    the first line is ignored.
    """
    path = Path(path)

    def problem(lineno: int, text: str) -> RecordError:
        return RecordError(f"{path}:{lineno}", text)

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            err: RecordError | None = None
            obj: Any = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                err = problem(lineno, f"invalid UTF-8 at byte {e.start} of the line ({e.reason}); line skipped")
            else:
                if json_depth_exceeds(line, max_depth):
                    err = problem(lineno, f"JSON nested deeper than {max_depth} levels (fclm.io.MAX_JSON_DEPTH)")
                else:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        err = problem(lineno, f"malformed JSON ({e.msg} at column {e.colno})")
                    except RecursionError:
                        err = problem(lineno, f"JSON nested deeper than {max_depth} levels (fclm.io.MAX_JSON_DEPTH)")
                    except ValueError as e:  # e.g. an integer with more digits than Python converts
                        err = problem(lineno, f"malformed JSON ({str(e)[:200]})")
                    else:
                        if not isinstance(obj, dict):
                            err = problem(lineno, f"expected a JSON object, got {type(obj).__name__}")
                        elif "\\u" in line and _SURROGATE_ESCAPE.search(line):
                            bad = find_lone_surrogate(obj)
                            if bad is not None:
                                err = problem(lineno, f"a lone UTF-16 surrogate escape in the string {safe_text(bad[:60])!r} (not valid Unicode)")
            if err is not None:
                if report is None:
                    raise err
                report.add(err)
                continue
            yield lineno, obj


def read_json(path: str | os.PathLike) -> Any:
    """Read one whole JSON document; any failure raises a one-line :class:`RecordError` naming the file.

    Invalid UTF-8 is reported with its byte offset and line, malformed JSON with its line and column,
    nesting too deep for Python's parser as such. A UTF-8 byte-order mark is ignored.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecordError(str(path), f"cannot read ({type(e).__name__}: {e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(str(path), f"invalid UTF-8 at byte {e.start} (line {line}): {e.reason}") from None
    del data
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(str(path), f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise RecordError(str(path), "JSON nested too deeply for Python's parser (about 1000 levels); the file cannot be read") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts (sys.get_int_max_str_digits)
        raise RecordError(str(path), f"malformed JSON ({str(e)[:200]})") from None


def encode_json_line(obj: Any, *, allow_nan: bool = True) -> bytes:
    """``obj`` as one UTF-8 JSON line (with its newline); ``ValueError`` if it cannot be written.

    A string holding a lone surrogate, nesting too deep, a cycle, a value JSON cannot hold and, with
    ``allow_nan=False`` (strict JSON, as the builders write), a NaN or infinite number are each a
    ``ValueError`` with a one-line message.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=allow_nan)
    except RecursionError:
        raise ValueError("nested too deeply to write as JSON") from None
    except (TypeError, ValueError) as e:
        if not allow_nan and "Out of range float" in str(e):
            raise ValueError("holds a NaN or infinite number (not valid JSON)") from None
        raise ValueError(f"cannot be written as JSON ({e})") from None
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[max(0, e.start - 20) : e.end + 20]
        raise ValueError(f"holds a lone UTF-16 surrogate (not valid Unicode), in the JSON text {safe_text(bad)}") from None


def record_where(rec: Any) -> str:
    """``record 'ID'`` for an error about an output record."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"record {safe_text(rid)!r}" if isinstance(rid, str) else f"record {type(rid).__name__}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(
    path: str | os.PathLike,
    records: Iterable[Any],
    report: ErrorReport | None = None,
    *,
    allow_nan: bool = True,
    located: bool = False,
) -> int:
    """Write ``records`` as JSON Lines atomically; return how many were written.

    A record that cannot be written (a lone surrogate in a string, nesting too deep, with
    ``allow_nan=False`` a NaN/infinite number …) raises :class:`RecordError` naming its id, and
    nothing is written; with a lenient ``report`` it is recorded there and skipped instead. With
    ``located=True`` the items are ``(where, record)`` pairs and the problem names ``where`` (the
    input the record came from) as well.
    """
    n = 0
    with atomic_write(path, "wb") as f:
        for item in records:
            where, rec = item if located else (None, item)
            try:
                line = encode_json_line(rec, allow_nan=allow_nan)
            except ValueError as e:
                err = RecordError(f"{where} ({record_where(rec)})" if where else record_where(rec), str(e))
                if report is None:
                    raise err from None
                report.add(err)
                continue
            f.write(line)
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write one JSON document atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


class ResumableJsonl:
    """An append-only JSON Lines output that a killed job resumes: ids already written are skipped.

    Opening reads the ids of the complete lines already in ``path`` (:attr:`done`) and cuts off a last
    line that a kill left without its newline. :meth:`append` writes each object as one complete line
    in a single ``write`` and :meth:`flush` makes it durable (``fsync``), so after a crash every line in
    the file is whole and each id appears exactly once.
    """

    def __init__(self, path: str | os.PathLike, id_key: str = "id") -> None:
        self.path = Path(path)
        self.id_key = id_key
        self.done: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, "rb") as f:
                data = f.read()
            keep = data.rfind(b"\n") + 1  # bytes up to the last complete line
            if keep < len(data):
                logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", self.path, len(data) - keep)
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
            for lineno, line in enumerate(data[:keep].decode("utf-8", errors="replace").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{self.path}:{lineno}", f"malformed JSON in an existing output ({e.msg}); move the file away to start over") from None
                self.done.add(str(obj.get(id_key)) if isinstance(obj, dict) else "")
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, obj: dict) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.done.add(str(obj.get(self.id_key)))

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
