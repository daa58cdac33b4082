"""Reading and writing files without losing anything.

* ``iter_jsonl`` reads JSON Lines and reports a malformed line with its file and line number; in
  lenient mode the line is recorded in an :class:`ErrorReport` and skipped, in strict mode it raises.
* ``atomic_write`` / ``write_jsonl`` / ``write_json`` write to a temporary file in the target's
  folder and rename it over the target, so a killed job never leaves a half-written file.
* ``ResumableJsonl`` appends whole lines to an output that a rerun resumes (ids already written are skipped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


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


def iter_jsonl(path: str | os.PathLike, report: ErrorReport | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file (1-based numbers).

    A line that is not valid JSON, or not a JSON object, raises :class:`RecordError` naming the file
    and line, unless a lenient ``report`` is given, in which case it is recorded and skipped.
    """
    path = Path(path)
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                err = RecordError(f"{path}:{lineno}", f"malformed JSON ({e.msg} at column {e.colno})")
                if report is None:
                    raise err from None
                report.add(err)
                continue
            if not isinstance(obj, dict):
                err = RecordError(f"{path}:{lineno}", f"expected a JSON object, got {type(obj).__name__}")
                if report is None:
                    raise err
                report.add(err)
                continue
            yield lineno, obj


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


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write ``records`` as JSON Lines atomically; return how many were written."""
    n = 0
    with atomic_write(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
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
