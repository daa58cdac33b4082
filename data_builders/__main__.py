"""``python -m data_builders <command> …`` (``fclm-data``): the builders' command line. See ``data_builders``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fclm.io import RecordError

COMMANDS: dict[str, tuple[str, str]] = {
    "refcoco": ("data_builders.refcoco", "RefCOCO/+/g (refer format) → res/rec"),
    "grefcoco": ("data_builders.grefcoco", "gRefCOCO → gres/grec (no-target refs → empty target)"),
    "rrefcoco": ("data_builders.rrefcoco", "R-RefCOCO/+/g → gres (negative sentences → empty target)"),
    "refzom": ("data_builders.refzom", "Ref-ZOM → gres (zero/one/many)"),
    "dam": ("data_builders.dam", "Describe Anything shards → region_caption (streamed, resumable)"),
    "dlres": ("data_builders.dlres", "region captions → DL-RES referring expressions (rule or LLM)"),
    "lvis-roc": ("data_builders.lvis_roc", "LVIS / PACO regions → roc"),
    "gcg": ("data_builders.gcg", "GranD-f → gcg"),
    "muse": ("data_builders.muse", "MUSE → reason_seg"),
    "osprey": ("data_builders.osprey", "Osprey-724K → conversation / region_caption"),
    "synthetic": ("data_builders.synthetic", "generate ShapesRef (every task)"),
    "validate": ("data_builders.validate", "check JSONL files against the schema and the images"),
    "stats": ("data_builders.stats", "per-task counts, tokens, image sizes, empty targets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fclm-data", description="Build, check and describe FCLM data files.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every skipped input as it happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        result = module.run(args)
    except RecordError as e:  # --strict, or an input the whole build depends on
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(result.summary())
        return 1 if result.report.count else 0
    if args.command == "stats":
        from data_builders.stats import format_table

        stats, report, tokenizer = result
        print(format_table(stats))
        print(f"(tokens: {tokenizer}; {report.summary()})")
        return 0
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
