"""``fclm-data validate FILE …``: check JSONL files against the record schema and the images on disk.

Every line must be UTF-8 JSON (no lone surrogate escapes, nested at most ``fclm.io.MAX_JSON_DEPTH``
levels) and every record must pass :func:`fclm.data.schema.validate_record`, which owns the record
rules (the same the datasets apply at load and the processor applies when encoding), with its image
opened (``--no-images`` skips that). The only rule of this command: ids are unique in a file.
Problems are printed with ``file:line``; the exit status is 1 when there is any.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fclm.data.schema import validate_record
from fclm.io import ErrorReport, RecordError, iter_jsonl


@dataclass
class ValidateResult:
    files: list[Path]
    records: int
    valid: int
    report: ErrorReport

    def summary(self) -> str:
        return f"{self.records} record(s) in {len(self.files)} file(s): {self.valid} valid\n{self.report.summary()}"


def validate_files(paths: list[Path], *, check_images: bool = True, decode_masks: bool = True, strict: bool = False, max_shown: int = 20) -> ValidateResult:
    report = ErrorReport(strict=strict, max_logged=max_shown)
    n = valid = 0
    for path in paths:
        seen: dict[str, int] = {}
        for lineno, rec in iter_jsonl(path, report):
            n += 1
            where = f"{path}:{lineno}"
            try:
                problems = validate_record(rec, where, image_root=path.parent, check_images=check_images, decode_masks=decode_masks)
            except Exception as e:  # a safety net: the checker reports, never crashes on one record
                problems = [f"{where}: the record cannot be checked ({type(e).__name__}: {str(e)[:200]})"]
            rid = rec.get("id")
            if isinstance(rid, str):
                if rid in seen:
                    problems.append(f"{where}: id {rid!r} already used on line {seen[rid]}")
                else:
                    seen[rid] = lineno
            if problems:
                report.add(RecordError(where, "; ".join(p[len(where) + 2 :] for p in problems)))
            else:
                valid += 1
    return ValidateResult(list(paths), n, valid, report)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--no-images", dest="check_images", action="store_false", help="do not open the images")
    p.add_argument("--no-decode", dest="decode_masks", action="store_false", help="check RLE structure without decoding masks")
    p.add_argument("--strict", action="store_true", help="stop at the first problem")
    p.add_argument("--max-shown", type=int, default=20, help="problems printed in full")


def run(args: argparse.Namespace) -> ValidateResult:
    return validate_files(args.files, check_images=args.check_images, decode_masks=args.decode_masks, strict=args.strict, max_shown=args.max_shown)

