"""``python -m data_builders <command> …`` (``fclm-data``): the builders' command line. See ``data_builders``.

Options of the program (``-v``) go before or after the command. Every error is one line
``fclm-data: error: …`` on stderr, exit code 2 (``validate`` exits 1 when it found problems).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing

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


PROG = "fclm-data"

EXAMPLES = f"""examples:
  {PROG} synthetic --n 2000 --seed 0 --out data/shapesref          generate ShapesRef (every task)
  {PROG} refcoco --dataset refcoco --split-by unc --root DATA/refcoco --out refcoco_unc.jsonl
  {PROG} dlres --src dam_region_captions.jsonl --out dlres.jsonl --rewriter rule
  {PROG} validate refcoco_unc.jsonl -v                             check against the schema and the images
  {PROG} stats refcoco_unc.jsonl                                   counts, tokens, image sizes
  {PROG} COMMAND --help                                            the options of one command"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors carry the program's one prefix (``fclm-data: error:``), also in subcommands."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _add_common(p: argparse.ArgumentParser, default: typing.Any) -> None:
    """The program's own options; on each command too (default SUPPRESS there), so they go before or after it."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log every skipped input as it happens")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Build, check and describe FCLM data files.", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(p, argparse.SUPPRESS)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        result = module.run(args)
    except RecordError as e:  # --strict, or an input the whole build depends on
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
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
