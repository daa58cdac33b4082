"""DLC-Bench (Describe Anything's detailed localized captioning benchmark), LLM-judged.

Follows NVlabs/describe-anything ``evaluation/eval_model_outputs.py``: for every benchmark key the
judge (any OpenAI-compatible chat endpoint, temperature 0) answers a recognition question and then
the key's multiple-choice questions about the predicted caption; answers are parsed back to a
choice, whose score the benchmark gives.

Two entry points:

* :func:`run_dlc_bench` — live: queries a ``judge`` callable (e.g. :class:`OpenAIChatJudge`), caching
  every answer per question in a JSONL file so an interrupted run resumes where it stopped, and
  returns the per-key results in Describe Anything's eval-cache layout;
* :func:`replay_dlc_cache` — re-scores such an eval cache (``key → {pred, details_recognition,
  details_positives, details_negatives, …}``) by re-parsing each ``pred_answer`` (the stored
  ``eval_result`` is not trusted).
"""

from __future__ import annotations

import functools
import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from fclm.io import atomic_write

from .io import EvalInputError

Judge = Callable[[str], str]
"""``judge(prompt) -> answer``: one chat completion at temperature 0."""

JUDGE_MAX_TOKENS = 300
CHOICE_LABELS = "abcde"

PROMPT_EVAL = """Answer the multiple-choice question based on the text description of an object in an image. You need to follow these rules:
1. Do not output any reasoning. Do not perform correction. Please output exactly one answer from the choices for each question. Do not repeat the question.
2. There is no need for exact matching. Please choose the closest option based on the description.

The description is:
{pred_caption}

From the description above, please answer the following question with one of the choices:
{question_text_str}
"""
"""The judge prompt of ``eval_model_outputs.py``, verbatim."""


class DlcJudgeError(RuntimeError):
    """The judge endpoint failed (network, HTTP status, malformed reply); the message names the URL."""


def parse_pred(pred: str, choices: list[str]) -> Optional[int]:
    """Map a judge answer to a choice index, or None when it matches nothing (``parse_pred`` of
    ``eval_model_outputs.py``), in this order, on the stripped, lowercased answer:

    1. exact: the answer equals a choice, ``"<letter>. <choice>"``, or the choice's letter alone;
    2. exactly one choice occurs as a substring of the answer → that choice;
    3. ``"<letter>."`` prefix → that letter;
    4. several choices occur → the one occurring last (ties: the longest);
    5. the answer is a substring of one or more choices → the longest such choice;
    6. a bare letter followed by end or newline → that letter.

    Where the reference would crash (an empty answer, a one-character answer reaching step 3, a
    letter beyond the number of choices) the answer counts as unparsable (None) instead.
    """
    pred = pred.strip().lower()
    if not pred:
        return None
    n = len(choices)
    substr = []
    for index, choice in enumerate(choices):
        choice = choice.strip().lower()
        prefix = CHOICE_LABELS[index] if index < len(CHOICE_LABELS) else None
        if choice == pred or (prefix is not None and (pred == f"{prefix}. {choice}" or pred == prefix)):
            return index
        if choice in pred:
            substr.append((index, pred.index(choice), len(choice)))
    if len(substr) == 1:
        return substr[0][0]
    if pred[0] in CHOICE_LABELS:
        if len(pred) == 1:  # the reference indexes pred[1] here and crashes
            return None
        if pred[1] == ".":
            idx = CHOICE_LABELS.index(pred[0])
            return idx if idx < n else None
    if substr:
        last = max(s[1] for s in substr)
        return max((s for s in substr if s[1] == last), key=lambda s: s[2])[0]
    inside = [(index, len(c.strip())) for index, c in enumerate(choices) if pred in c.strip().lower()]
    if inside:
        # max() keeps the first of equal lengths, as the reference does.
        return max(inside, key=lambda x: x[1])[0]
    if pred[0] in CHOICE_LABELS and (len(pred) == 1 or pred[1] == "\n"):
        idx = CHOICE_LABELS.index(pred[0])
        return idx if idx < n else None
    return None


@functools.lru_cache(maxsize=1)
def _inflect():
    import inflect

    return inflect.engine()


def recognition_question(class_name: str) -> dict:
    """The recognition question ``eval_model_outputs.py`` puts first (plural via ``inflect``, "bus"
    singular); choices Yes → "correct", No → "incorrect"."""
    p = _inflect()
    plural = False if class_name == "bus" else p.singular_noun(class_name) is not False
    if plural:
        q = f"Is it likely that the objects in the description are {class_name} or objects of a similar type? Again, It does not have to be an exact match."
    else:
        q = f"Is it likely that the object in the description is {p.a(class_name)} or an object of a similar type? Again, It does not have to be an exact match."
    return {"question": q, "choices": [["Yes", "correct"], ["No", "incorrect"]], "type": "recognition"}


def format_prompt(caption: str, question: dict) -> str:
    """The judge prompt for one question: the question, then its choices lettered ``A.`` … ``E.``."""
    text = f"{question['question']}\n"
    for i, (choice, _) in enumerate(question["choices"]):
        text += f"{'ABCDE'[i]}. {choice}\n"
    return PROMPT_EVAL.format(pred_caption=caption, question_text_str=text.strip())


def score_answers(questions: list[dict], answers: list[str]) -> dict:
    """Score one key from its questions (recognition first) and the judge's answers.

    Follows ``eval_model_outputs.py::evaluate``: each answer is parsed (:func:`parse_pred`) to a
    choice whose benchmark score it takes; an unparsable answer scores 0. If the recognition answer
    is "No" (or unparsable — the reference raises there; here the caption is treated as not
    recognised), every positive and negative score is capped at ``min(0, x)``. ``score_pos`` = mean of
    the positives, ``score_neg`` = mean of the negatives or None when the key has none.
    Returns the reference's per-key record (``details_*``, ``score*``, ``recognition_result``).
    """
    details = {"recognition": [], "positive": [], "negative": []}
    recognized: Optional[bool] = None
    unparsable = 0
    for qi, (q, ans) in enumerate(zip(questions, answers)):
        choices = [c for c, _ in q["choices"]]
        idx = parse_pred(ans, choices)
        unparsable += idx is None
        value = q["choices"][idx][1] if idx is not None else 0
        kind = q.get("type")
        if kind == "recognition":
            recognized = value == "correct"
            details["recognition"].append({**q, "pred_answer": ans.strip(), "pred_index": idx, "eval_result": value})
            continue
        if kind not in ("positive", "negative"):
            raise EvalInputError(f"question {qi}: unknown type {kind!r} (expected recognition, positive or negative)")
        if recognized is None:
            raise EvalInputError(f"question {qi}: a {kind} question comes before the recognition question")
        if not isinstance(value, (int, float)):
            raise EvalInputError(f"question {qi}: choice score {value!r} is not a number")
        if not recognized:
            value = min(0, value)
        details[kind].append({**q, "pred_answer": ans.strip(), "pred_index": idx, "question_index": qi - 1, "eval_result": value})
    pos = [d["eval_result"] for d in details["positive"]]
    neg = [d["eval_result"] for d in details["negative"]]
    return {
        "details_positives": details["positive"],
        "details_negatives": details["negative"],
        "details_recognition": details["recognition"],
        "score": (sum(pos) + sum(neg)) / (len(pos) + len(neg)) if pos or neg else None,
        "score_pos": sum(pos) / len(pos) if pos else None,
        "score_neg": sum(neg) / len(neg) if neg else None,
        "neg_valid_num": len(neg),
        "recognition_result": recognized,
        "n_unparsable": unparsable,
    }


def summarize(per_key: dict[str, dict]) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """``pos`` = mean over keys of ``score_pos``; ``neg`` = mean over keys that have negatives;
    ``avg`` = (pos + neg) / 2 (the reference's "Average of Positive and Negative Scores")."""
    pos = [v["score_pos"] for v in per_key.values() if v["score_pos"] is not None]
    neg = [v["score_neg"] for v in per_key.values() if v["score_neg"] is not None]
    metrics: dict[str, float] = {}
    notes = []
    if pos:
        metrics["pos"] = sum(pos) / len(pos)
    else:
        notes.append("pos not reported: no key has positive questions")
    if neg:
        metrics["neg"] = sum(neg) / len(neg)
    else:
        notes.append("neg not reported: no key has negative questions")
    if pos and neg:
        metrics["avg"] = (metrics["pos"] + metrics["neg"]) / 2
    counts = {
        "n_keys": len(per_key),
        "n_keys_with_negatives": len(neg),
        "n_keys_without_positives": len(per_key) - len(pos),
        "n_not_recognized": sum(v["recognition_result"] is not True for v in per_key.values()),
        "n_unparsable_answers": sum(v.get("n_unparsable", 0) for v in per_key.values()),
    }
    return metrics, counts, notes


@dataclass
class OpenAIChatJudge:
    """A judge behind any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, OpenAI …).

    Sends the reference's request: one user message, ``temperature=0``, ``max_tokens=300``,
    ``top_p=1``, no penalties. ``endpoint`` is the API base (``http://host:port/v1``) or the full
    ``…/chat/completions`` URL. Uses only the standard library.
    """

    endpoint: str
    model: str
    api_key: Optional[str] = None
    timeout: float = 120.0
    max_tokens: int = JUDGE_MAX_TOKENS

    @property
    def url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def __call__(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
            "top_p": 1,
            "frequency_penalty": 0,
            "presence_penalty": 0,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise DlcJudgeError(f"judge {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise DlcJudgeError(f"judge {self.url}: {getattr(e, 'reason', e)}") from None
        except json.JSONDecodeError:
            raise DlcJudgeError(f"judge {self.url}: reply is not JSON") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise DlcJudgeError(f"judge {self.url}: reply has no choices[0].message.content") from None
        return content if isinstance(content, str) else ""


class JudgeCache:
    """Judge answers, one JSON line per question, keyed by (benchmark key, question index, model,
    SHA-256 of the prompt) — a changed caption or judge re-asks. Each answer is appended and flushed
    as soon as it arrives, so an interrupted run loses nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[tuple, str] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        e = json.loads(line)
                        self.entries[(e["key"], e["index"], e["model"], e["prompt_sha256"])] = e["response"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        # A line cut short by a kill: ignore it, the question is asked again.
                        continue
        self.hits = 0
        self.misses = 0
        # a run killed mid-write leaves a last line without "\n": start the next answer on a new line
        self._newline_first = self.path.is_file() and self.path.stat().st_size > 0 and self._last_byte() != b"\n"

    def _last_byte(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1)

    @staticmethod
    def _sha(prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()

    def get(self, key: str, index: int, model: str, prompt: str) -> Optional[str]:
        return self.entries.get((key, index, model, self._sha(prompt)))

    def put(self, key: str, index: int, model: str, prompt: str, response: str) -> None:
        sha = self._sha(prompt)
        self.entries[(key, index, model, sha)] = response
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            if self._newline_first:
                f.write("\n")
                self._newline_first = False
            f.write(json.dumps({"key": key, "index": index, "model": model, "prompt_sha256": sha, "response": response}, ensure_ascii=False) + "\n")
            f.flush()


def check_question(q: Any, where: str) -> None:
    """A benchmark question: ``{"question": str, "choices": [[text, score], …] (≤ 5), "type": …}``."""
    ok = (
        isinstance(q, dict)
        and isinstance(q.get("question"), str)
        and isinstance(q.get("choices"), list)
        and 0 < len(q["choices"]) <= len(CHOICE_LABELS)
        and all(isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], str) for c in q["choices"])
        and q.get("type") in ("recognition", "positive", "negative")
    )
    if not ok:
        raise EvalInputError(f"{where}: a question must be {{question: str, choices: [[text, score], …] (1–5), type: recognition|positive|negative}}")


def load_bench(bench_dir: str | Path) -> tuple[dict, dict]:
    """Read DLC-Bench's ``qa.json`` (key → questions) and ``class_names.json`` (key → class name)."""
    bench_dir = Path(bench_dir)
    out = []
    for name in ("qa.json", "class_names.json"):
        p = bench_dir / name
        if not p.is_file():
            raise EvalInputError(f"{p}: no such file (--bench must be the DLC-bench folder with qa.json and class_names.json)")
        out.append(_read_json(p))
    qa, names = out
    if not isinstance(qa, dict) or not isinstance(names, dict):
        raise EvalInputError(f"{bench_dir}: qa.json and class_names.json must be JSON objects keyed by benchmark key")
    for key, questions in qa.items():
        if not isinstance(questions, list):
            raise EvalInputError(f"{bench_dir / 'qa.json'}[{key!r}]: expected a list of questions")
        for i, q in enumerate(questions):
            check_question(q, f"{bench_dir / 'qa.json'}[{key!r}][{i}]")
        if not isinstance(names.get(key, ""), str):
            raise EvalInputError(f"{bench_dir / 'class_names.json'}[{key!r}]: the class name must be a string")
    missing = [k for k in qa if k not in names]
    if missing:
        raise EvalInputError(f"{bench_dir / 'class_names.json'}: no class name for {len(missing)} key(s): {missing[:10]}")
    return qa, names


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError:
        raise EvalInputError(f"{path}: not UTF-8 text") from None


def load_captions(path: str | Path) -> dict[str, str]:
    """Read ``CAPTIONS.json``: ``{key: caption}`` (the layout of Describe Anything's model-output cache)."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    caps = _read_json(path)
    if not isinstance(caps, dict):
        raise EvalInputError(f"{path}: expected a JSON object {{key: caption}}")
    bad = [k for k, v in caps.items() if not isinstance(v, str)]
    if bad:
        raise EvalInputError(f"{path}: caption of key {bad[0]!r} is not a string ({len(bad)} such key(s))")
    return {str(k): v for k, v in caps.items()}


def run_dlc_bench(
    captions: dict[str, str],
    qa: dict[str, list],
    class_names: dict[str, str],
    judge: Judge,
    cache: JudgeCache,
    *,
    model: str,
    default_prediction: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict[str, dict]:
    """Judge every benchmark key; return ``key → {pred, details_*, prompt, response, score*, …}``.

    Keys come in ``qa.json`` order. A key without a caption, or whose caption starts with "Error:",
    is an error unless ``default_prediction`` is given (as in the reference; such keys are marked
    ``"default_prediction": true``). Every question's answer comes from ``cache`` when present,
    else from ``judge`` (and is cached at once).
    """
    missing = [k for k in qa if k not in captions or captions[k].startswith("Error:")]
    if missing and default_prediction is None:
        raise EvalInputError(f"{len(missing)} benchmark key(s) have no usable caption (missing or 'Error:'): {missing[:10]}; pass --default-prediction TEXT to score them with it")
    results: dict[str, dict] = {}
    for n, key in enumerate(qa):
        key = str(key)
        used_default = key in missing
        caption = default_prediction if used_default else captions[key]
        questions = [recognition_question(class_names[key]), *qa[key]]
        prompts, answers = [], []
        for i, q in enumerate(questions):
            prompt = format_prompt(caption, q)
            ans = cache.get(key, i, model, prompt)
            if ans is None:
                ans = judge(prompt)
                cache.put(key, i, model, prompt, ans)
                cache.misses += 1
            else:
                cache.hits += 1
            prompts.append(prompt)
            answers.append(ans)
        info = score_answers(questions, answers)
        results[key] = {"pred": caption, **info, "prompt": prompts, "response": answers, "default_prediction": used_default}
        if progress is not None:
            progress(n + 1, len(qa))
    return results


def replay_dlc_cache(cache: dict) -> dict[str, dict]:
    """Re-score Describe Anything's eval cache (``*_eval.json``): for each key, the questions are its
    ``details_recognition`` then positives and negatives in their original order (``question_index``),
    the answers their ``pred_answer``; scored with :func:`score_answers` (stored ``eval_result`` values
    are ignored). Top-level non-object entries (``avg``, ``avg_pos``, ``avg_neg``) are skipped."""
    per_key = {}
    for key, entry in cache.items():
        if not isinstance(entry, dict):
            continue
        try:
            rec = entry["details_recognition"]
            pos = entry.get("details_positives", [])
            neg = entry.get("details_negatives", [])
            if len(rec) != 1:
                raise EvalInputError(f"key {key!r}: expected one recognition detail, got {len(rec)}")
            body = sorted(pos + neg, key=lambda d: d.get("question_index", 0))
            for i, d in enumerate([*rec, *body]):
                check_question(d, f"key {key!r}, question {i}")
            questions = [{k: d[k] for k in ("question", "choices", "type")} for d in [*rec, *body]]
            answers = [d.get("pred_answer") or "" for d in [*rec, *body]]
        except (KeyError, TypeError, AttributeError) as e:
            raise EvalInputError(f"key {key!r}: not Describe Anything's eval-cache layout ({type(e).__name__}: {e})") from None
        info = score_answers(questions, answers)
        stored = [d.get("eval_result") for d in [*rec, *body]]
        recomputed = [d["eval_result"] for d in info["details_recognition"]] + [
            d["eval_result"] for d in sorted(info["details_positives"] + info["details_negatives"], key=lambda d: d["question_index"])
        ]
        info["n_eval_result_changed"] = sum(a != b for a, b in zip(stored, recomputed))
        per_key[str(key)] = {"pred": entry.get("pred", ""), **info}
    if not per_key:
        raise EvalInputError("the replay cache holds no benchmark keys")
    return per_key


def write_eval_cache(path: str | Path, per_key: dict[str, dict], metrics: dict[str, float]) -> None:
    """Write results in Describe Anything's eval-cache layout (replayable with :func:`replay_dlc_cache`)."""
    out = {k: {kk: vv for kk, vv in v.items() if kk != "n_unparsable"} for k, v in per_key.items()}
    if "pos" in metrics:
        out["avg_pos"] = metrics["pos"]
    if "neg" in metrics:
        out["avg_neg"] = metrics["neg"]
    with atomic_write(path) as f:
        json.dump(out, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _per_key_rows(per_key: dict[str, dict]) -> list[dict]:
    keep = ("score", "score_pos", "score_neg", "neg_valid_num", "recognition_result", "n_unparsable", "n_eval_result_changed", "default_prediction")
    return [{"key": k, **{f: v[f] for f in keep if f in v}} for k, v in per_key.items()]


def _write_dlc_outputs(out_dir: str | Path, per_key: dict[str, dict], extra: dict[str, Any], title: str) -> dict:
    from .report import summary_markdown, write_run

    metrics, counts, notes = summarize(per_key)
    counts.update({k: v for k, v in extra.items() if isinstance(v, int)})
    summary = {"task": "dlc_bench", **{k: v for k, v in extra.items() if not isinstance(v, int)}, **metrics, **counts, "notes": notes}
    md = summary_markdown(title, metrics, counts, notes, "DLC-Bench as Describe Anything `evaluation/eval_model_outputs.py` (avg = (pos + neg) / 2).")
    write_run(out_dir, summary, _per_key_rows(per_key), md)
    return summary


def dlc_bench(
    captions_path: str | Path,
    bench_dir: str | Path,
    judge: Judge,
    out_dir: str | Path,
    *,
    model: str,
    cache_path: Optional[str | Path] = None,
    default_prediction: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Live DLC-Bench: judge ``captions_path`` on ``bench_dir`` and write ``out_dir``.

    Writes ``summary.json`` (``pos``, ``neg``, ``avg`` and counts), ``summary.md``, ``per_sample.jsonl``
    (one line per key) and ``eval_cache.json`` (Describe Anything's layout, replayable). Judge answers
    go to ``cache_path`` (default ``out_dir/judge_cache.jsonl``) as they arrive, so re-running the same
    command resumes. Returns the summary.
    """
    captions = load_captions(captions_path)
    qa, names = load_bench(bench_dir)
    cache = JudgeCache(cache_path or Path(out_dir) / "judge_cache.jsonl")
    per_key = run_dlc_bench(captions, qa, names, judge, cache, model=model, default_prediction=default_prediction, progress=progress)
    extra = {"captions": str(captions_path), "bench": str(bench_dir), "judge_model": model, "n_judge_calls": cache.misses, "n_cached_answers": cache.hits, "n_default_prediction": sum(v["default_prediction"] for v in per_key.values())}
    summary = _write_dlc_outputs(out_dir, per_key, extra, f"DLC-Bench — {Path(captions_path).name}")
    write_eval_cache(Path(out_dir) / "eval_cache.json", per_key, summary)
    return summary


def dlc_replay(cache_path: str | Path, out_dir: str | Path) -> dict:
    """Re-score a Describe Anything eval cache (see :func:`replay_dlc_cache`) and write ``out_dir``
    (``summary.json`` with ``pos``/``neg``/``avg``, ``summary.md``, ``per_sample.jsonl``)."""
    cache_path = Path(cache_path)
    if not cache_path.is_file():
        raise EvalInputError(f"{cache_path}: no such file")
    cache = _read_json(cache_path)
    if not isinstance(cache, dict):
        raise EvalInputError(f"{cache_path}: expected a JSON object keyed by benchmark key")
    try:
        per_key = replay_dlc_cache(cache)
    except EvalInputError as e:
        raise EvalInputError(f"{cache_path}: {e}") from None
    extra = {"replay": str(cache_path), "n_eval_result_changed": sum(v["n_eval_result_changed"] for v in per_key.values())}
    return _write_dlc_outputs(out_dir, per_key, extra, f"DLC-Bench replay — {cache_path.name}")
