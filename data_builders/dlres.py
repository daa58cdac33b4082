"""DL-RES: detailed referring expressions made by reversing detailed region captions.

``fclm-data dlres --src dam_region_captions.jsonl --out dlres.jsonl --rewriter rule|llm``

Input: ``region_caption`` records (one region each, the caption in the assistant turn), e.g. from
the ``dam`` builder. Each region's mask is checked without decoding it (run lengths cover H×W and
hold a foreground pixel) and, unless ``--no-check-images``, against its image's size (each image
opened once); a record that fails is reported as ``file:line`` and skipped. Each caption is rewritten into a noun phrase that refers to the region and
becomes one ``dlres`` record::

    user "Please segment: {expression}." (one of fclm.data.templates.DLRES_PROMPTS, by record id)
    assistant "[SEG]"
    targets = [{"masks": [region mask], "boxes": [region box]}]
    regions = [{"mask": same, "box": same, "target_index": 0, "in_prompt": false}]   # latent-loss pair
    meta = {"source", "subset", "src_id", "caption", "rewriter"}

Rewriters:

* ``rule`` (default) — deterministic and offline (:func:`rule_rewrite`): the caption's first sentence
  becomes a definite noun phrase, later sentences about the object ("It is …", "It has …") become
  clauses, up to ``--max-words`` words.
* ``llm`` — any OpenAI-compatible ``/chat/completions`` endpoint (``--endpoint``, ``--model``, key
  from the env var named by ``--api-key-env``), at most ``--concurrency`` requests in flight, each
  retried ``--retries`` times with exponential back-off; every answer is appended to a cache file
  (``--cache``, default ``OUT.llm_cache.jsonl``) as it arrives, so a killed run resumes without
  asking again. The cache is keyed by content (prompt version, model, ``--max-words``, caption), so
  a rerun with other inputs or options reuses only answers to the very same question; a damaged
  cache line is ignored (that caption is asked again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from data_builders.common import BuildResult, RecordGate, add_common_args, mask_problem
from fclm.data.schema import check_record, chat, image_size, make_record, region_entry, relative_image_path, resolve_image_path, target_entry
from fclm.data.templates import SEG_TOKEN, dlres_prompt, normalize_expression
from fclm.io import ErrorReport, RecordError, iter_jsonl, write_jsonl

# --------------------------------------------------------------------------------------------------
# Rule rewriter
# --------------------------------------------------------------------------------------------------

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])")
_ARTICLE = re.compile(r"^(?:a|an|the|this|that|one|there\s+is\s+(?:a|an|the)|there\s+are)\s+", re.I)
_LEADING_DET = re.compile(r"^(?:the|a|an|this|that|these|those|its|his|her|their|two|three|several|some)\b", re.I)
_IT_IS = re.compile(r"^(?:it\s+is|it's|it\s+appears\s+to\s+be|it\s+seems\s+to\s+be|they\s+are|this\s+is)\s+", re.I)
_IT_HAS = re.compile(r"^(?:it\s+has|it\s+features|it\s+shows|they\s+have|this\s+has)\s+", re.I)
_ITS = re.compile(r"^its\s+", re.I)
_IT_VERB = re.compile(r"^(?:it|they)\s+", re.I)
_COPULA = re.compile(r"\s+(is|are)\s+")
_DANGLING = re.compile(r"(?:\s+(?:and|or|with|of|in|on|at|to|by|for|from|a|an|the|that|which|whose|its|is|are))+$", re.I)
_TRAIL_PUNCT = re.compile(r"[\s,;:.!?]+$")


def _lower_first(s: str) -> str:
    first = s.split(" ", 1)[0]
    if first.isupper() and len(first) > 1:  # an acronym ("TV") keeps its case
        return s
    return s[:1].lower() + s[1:]


def _definite(np_: str) -> str:
    np_ = _ARTICLE.sub("", np_.strip())
    np_ = _lower_first(np_)
    return np_ if _LEADING_DET.match(np_) else "the " + np_


def _clause(sentence: str, head_words: set[str]) -> str | None:
    """A later caption sentence as a clause about the object, or None if it is about something else."""
    s = _TRAIL_PUNCT.sub("", sentence.strip())
    if not s:
        return None
    if _IT_IS.match(s):
        return _IT_IS.sub("", s)
    if _IT_HAS.match(s):
        return "with " + _IT_HAS.sub("", s)
    if _ITS.match(s):
        return "whose " + _ITS.sub("", s)
    if _IT_VERB.match(s):
        return "that " + _IT_VERB.sub("", s)
    m = re.match(r"^(?:the|this)\s+((?:\w+\s+){0,2}?\w+)\s+(is|are|has|have|features|shows)\s+(.*)$", s, re.I)
    if m and set(m.group(1).lower().split()) & head_words:
        verb, rest = m.group(2).lower(), m.group(3)
        return ("with " + rest) if verb in ("has", "have", "features", "shows") else rest
    return None


_BOUNDARY_WORDS = {"and", "with", "that", "which", "while", "whose", "where"}


def _cap(text: str, max_words: int) -> str:
    """At most ``max_words`` words, cut at the last clause boundary (a comma, or before "and",
    "with", "that" …) in the second half when there is one, without a dangling function word."""
    words = text.split()
    if len(words) <= max_words:
        return text
    words = words[:max_words]
    cut = len(words)
    for k in range(len(words) - 1, max_words // 2 - 1, -1):
        if words[k].endswith(","):
            cut = k + 1
            break
        if k + 1 < len(words) and words[k + 1].lower() in _BOUNDARY_WORDS:
            cut = k + 1
            break
    return _DANGLING.sub("", " ".join(words[:cut]).rstrip(",;:"))


def rule_rewrite(caption: str, *, max_words: int = 40) -> str:
    """Turn a detailed region caption into a detailed referring expression (deterministic, offline).

    ``"A large red circle in the top left of the image. It is partly hidden behind a blue square."``
    → ``"the large red circle in the top left of the image, partly hidden behind a blue square"``.
    The first sentence becomes a definite noun phrase (``X is Y`` → ``X that is Y``); later sentences
    about the object become clauses (``It is …`` → ``…``, ``It has …`` → ``with …``, ``Its …`` →
    ``whose …``, ``The <head noun> has …`` → ``with …``); other sentences are dropped. Clauses are
    added while the phrase stays within ``max_words`` words (the first sentence is cut if longer).
    """
    text = re.sub(r"\s+", " ", str(caption)).strip()
    if not text:
        return ""
    sentences = [s for s in _SENT_SPLIT.split(text) if s.strip()]
    first = _TRAIL_PUNCT.sub("", sentences[0])
    first = _COPULA.sub(lambda m: f" that {m.group(1)} ", first, count=1)
    phrase = _cap(_definite(first), max_words)
    head_words = {w.strip(",;").lower() for w in phrase.split()[:8]}
    for s in sentences[1:]:
        clause = _clause(s, head_words)
        if not clause:
            continue
        candidate = f"{phrase}, {clause}"
        if len(candidate.split()) > max_words:
            break
        phrase = candidate
    return normalize_expression(_DANGLING.sub("", phrase))


# --------------------------------------------------------------------------------------------------
# LLM rewriter (OpenAI-compatible endpoint)
# --------------------------------------------------------------------------------------------------

LLM_SYSTEM_PROMPT = (
    "You turn a detailed description of one object in an image into a detailed referring expression: "
    "a single noun phrase, starting with 'the', that identifies that object and keeps its distinguishing "
    "attributes (category, colour, material, shape, parts, position). Use at most {max_words} words. "
    "Answer with the noun phrase only."
)
LLM_PROMPT_VERSION = "v1"
"""Part of every cache key: change it when the prompt changes so that old answers are not reused."""


@dataclass
class LlmOptions:
    endpoint: str
    """Base URL of an OpenAI-compatible API, e.g. ``http://localhost:8000/v1``."""
    model: str
    api_key: str | None = None
    concurrency: int = 4
    """Requests in flight at most."""
    retries: int = 3
    """Extra attempts after a failed request (HTTP 429/5xx, connection errors, bad JSON)."""
    timeout: float = 60.0
    backoff: float = 1.0
    """Seconds before the first retry; doubled each time."""
    max_words: int = 40

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0:
            raise ValueError("concurrency must be >= 1 and retries >= 0")


class LlmRewriter:
    """Rewrites captions through a chat-completions endpoint, with a JSONL answer cache."""

    def __init__(self, opts: LlmOptions, cache_path: Path):
        self.opts = opts
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self.requests = 0
        if self.cache_path.is_file():
            with open(self.cache_path, "rb") as f:
                for raw in f:
                    try:
                        entry = json.loads(raw.decode("utf-8"))
                        key, expression = entry["key"], entry["expression"]
                    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError):
                        continue  # a line cut by a kill (or damaged): that caption is simply asked again
                    if isinstance(key, str) and isinstance(expression, str):
                        self.cache[key] = expression

    def key(self, caption: str) -> str:
        h = hashlib.sha256()
        for part in (LLM_PROMPT_VERSION, self.opts.model, str(self.opts.max_words), caption):
            h.update(part.encode("utf-8") + b"\0")
        return h.hexdigest()

    def _request(self, caption: str) -> str:
        body = {
            "model": self.opts.model,
            "temperature": 0,
            "max_tokens": 4 * self.opts.max_words,
            "messages": [
                {"role": "system", "content": LLM_SYSTEM_PROMPT.format(max_words=self.opts.max_words)},
                {"role": "user", "content": caption},
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.opts.api_key:
            headers["Authorization"] = f"Bearer {self.opts.api_key}"
        url = self.opts.endpoint.rstrip("/") + "/chat/completions"
        last: Exception | None = None
        for attempt in range(self.opts.retries + 1):
            if attempt:
                time.sleep(self.opts.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
            try:
                with self._lock:
                    self.requests += 1
                with urllib.request.urlopen(req, timeout=self.opts.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                last = e
                if e.code != 429 and e.code < 500:  # a client error will not go away by asking again
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                last = e
        raise RuntimeError(f"LLM request failed after {attempt + 1} attempt(s): {type(last).__name__}: {last}")

    @staticmethod
    def clean(answer: str, max_words: int) -> str:
        """First non-empty line of an answer, without quotes or a label, as an expression."""
        line = next((ln for ln in answer.splitlines() if ln.strip()), "")
        line = re.sub(r"^\s*(?:referring expression|expression|answer)\s*:\s*", "", line, flags=re.I)
        line = line.strip().strip("`\"'“”‘’ ")
        if line.startswith("The "):
            line = "the " + line[4:]
        return normalize_expression(_cap(line, max_words))

    def rewrite_all(self, captions: list[str], on_error: Callable[[str, Exception], None]) -> None:
        """Ask for every caption not in the cache (at most ``concurrency`` at once), caching each answer."""
        todo = list(dict.fromkeys(c for c in captions if self.key(c) not in self.cache))
        if not todo:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.cache_path, "a", encoding="utf-8") as cache_file:

            def work(caption: str) -> None:
                try:
                    expr = self.clean(self._request(caption), self.opts.max_words)
                    if not expr:
                        raise RuntimeError("empty answer")
                except Exception as e:  # reported per caption; the build goes on
                    on_error(caption, e)
                    return
                k = self.key(caption)
                with self._lock:
                    self.cache[k] = expr
                    cache_file.write(json.dumps({"key": k, "expression": expr}, ensure_ascii=False) + "\n")
                    cache_file.flush()

            with ThreadPoolExecutor(max_workers=self.opts.concurrency) as pool:
                list(pool.map(work, todo))

    def get(self, caption: str) -> str | None:
        return self.cache.get(self.key(caption))


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------


@dataclass
class DlresOptions:
    src: Path
    """``region_caption`` JSONL (one region per record)."""
    out: Path
    rewriter: str = "rule"
    max_words: int = 40
    llm: LlmOptions | None = None
    cache: Path | None = None
    strict: bool = False
    check_images: bool = True
    """Open each source image (once) and check that it exists and has the mask's size."""

    def __post_init__(self) -> None:
        self.src, self.out = Path(self.src), Path(self.out)
        if self.rewriter not in ("rule", "llm"):
            raise ValueError(f"rewriter must be 'rule' or 'llm', got {self.rewriter!r}")
        if self.rewriter == "llm" and self.llm is None:
            raise ValueError("the llm rewriter needs LlmOptions (endpoint and model)")
        self.cache = Path(self.cache) if self.cache else self.out.with_name(self.out.name + ".llm_cache.jsonl")


def _caption_records(opts: DlresOptions, report: ErrorReport) -> Iterator[tuple[str, dict, str]]:
    """``(where, record, caption)`` of each usable source record; others are reported.

    The region's mask is checked without decoding it (:func:`data_builders.common.mask_problem`),
    and, with ``check_images``, against its image's size (each image opened once).
    """
    sizes: dict[str, tuple[int, int] | str] = {}

    def image_hw(rec: dict) -> tuple[int, int] | str:
        path = str(resolve_image_path(rec["image"], opts.src.parent))
        if path not in sizes:
            try:
                sizes[path] = image_size(path)
            except Exception as e:  # missing, unreadable, or refused by PIL (decompression bomb)
                sizes[path] = f"image does not open: {path[:300]} ({type(e).__name__})"
        return sizes[path]

    for lineno, rec in iter_jsonl(opts.src, report):
        where = f"{opts.src}:{lineno}"
        problems = check_record(rec, decode_masks=False)
        if problems:
            report.add(RecordError(where, "; ".join(problems)))
            continue
        if rec["task"] != "region_caption" or len(rec["regions"]) != 1:
            report.add(RecordError(where, f"expected a region_caption record with one region (task {rec['task']}, {len(rec['regions'])} regions)"))
            continue
        hw = image_hw(rec) if opts.check_images else None
        problem = hw if isinstance(hw, str) else mask_problem(rec["regions"][0]["mask"], hw)
        if problem:
            report.add(RecordError(where, f"regions[0]: {problem}"))
            continue
        caption = next((m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant"), "").strip()
        if not caption:
            report.add(RecordError(where, "empty caption"))
            continue
        yield where, rec, caption


def build(opts: DlresOptions) -> BuildResult:
    report = ErrorReport(strict=opts.strict)
    rewriter_name = "rule"
    llm: LlmRewriter | None = None
    failed: dict[str, str] = {}  # caption -> why the LLM gave no expression
    cached_before = 0
    if opts.llm is not None and opts.rewriter == "llm":
        llm = LlmRewriter(opts.llm, opts.cache)
        rewriter_name = f"llm:{opts.llm.model}"
        cached_before = len(llm.cache)

        def on_error(caption: str, e: Exception) -> None:
            with llm._lock:
                failed[caption] = f"{type(e).__name__}: {e}"

        # First pass: collect the captions (quietly; problems are reported in the second pass).
        captions = [c for _, _, c in _caption_records(opts, ErrorReport())]
        llm.rewrite_all(captions, on_error)
    src_dir, out_dir = opts.src.parent, opts.out.parent

    def records() -> Iterator[tuple[str, dict]]:
        for where, rec, caption in _caption_records(opts, report):
            try:
                out = record_of(rec, caption, where)
            except RecordError:
                raise  # --strict
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
                report.add(RecordError(where, f"cannot rewrite ({type(e).__name__}: {str(e)[:200]})"))
                continue
            if out is not None:
                yield where, out

    def record_of(rec: dict, caption: str, where: str) -> dict | None:
        if llm is not None:
            expr = llm.get(caption)
            if expr is None:
                report.add(RecordError(where, f"no expression from the LLM ({failed.get(caption, 'not answered')})"))
                return None
        else:
            expr = rule_rewrite(caption, max_words=opts.max_words)
            if not expr:
                report.add(RecordError(where, "the caption gives no expression"))
                return None
        region = rec["regions"][0]
        rid = f"dlres-{rec['id']}"
        meta = rec.get("meta", {})
        return make_record(
            id=rid,
            image=relative_image_path(resolve_image_path(rec["image"], src_dir), out_dir),
            task="dlres",
            messages=chat(dlres_prompt(expr, rid), SEG_TOKEN),
            regions=[region_entry(region["mask"], region["box"], target_index=0, in_prompt=False)],
            targets=[target_entry([region["mask"]], [region["box"]])],
            meta={
                "source": meta.get("source", "unknown"),
                **({"subset": meta["subset"]} if "subset" in meta else {}),
                "src_id": rec["id"],
                "caption": caption,
                "expression": expr,
                "rewriter": rewriter_name,
            },
        )

    gate = RecordGate(report)
    n = write_jsonl(opts.out, (x for x in records() if gate(*x)), report=report, allow_nan=False, located=True)
    counts: dict = {"rewriter": rewriter_name}
    if llm is not None:
        counts.update({"llm requests": llm.requests, "answers in the cache before": cached_before})
    return BuildResult(opts.out, n, report, counts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, type=Path, help="region_caption JSONL (e.g. from the dam builder)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rewriter", default="rule", choices=("rule", "llm"))
    p.add_argument("--max-words", type=int, default=40)
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (llm rewriter), e.g. http://localhost:8000/v1")
    p.add_argument("--model", default=None, help="model name sent to the endpoint (llm rewriter)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (may be unset)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--cache", type=Path, default=None, help="LLM answer cache (default OUT.llm_cache.jsonl)")
    add_common_args(p)


def run(args: argparse.Namespace) -> BuildResult:
    llm = None
    if args.rewriter == "llm":
        if not args.endpoint or not args.model:
            raise ValueError("--rewriter llm needs --endpoint and --model")
        llm = LlmOptions(
            endpoint=args.endpoint,
            model=args.model,
            api_key=os.environ.get(args.api_key_env) or None,
            concurrency=args.concurrency,
            retries=args.retries,
            timeout=args.timeout,
            max_words=args.max_words,
        )
    return build(
        DlresOptions(
            src=args.src, out=args.out, rewriter=args.rewriter, max_words=args.max_words, llm=llm, cache=args.cache, strict=args.strict,
            check_images=args.check_images,
        )
    )
