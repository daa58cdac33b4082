"""Every program's command line behaves the same way.

* ``--help`` (of the program and of each subcommand) exits 0 and prints a ``usage:`` line;
* a bad invocation ends with exit code 2 and a last stderr line ``PROG: error: …`` (one prefix per
  program, whatever part of it fails: argparse, a subcommand, the config, the input files);
* options of ``fclm-data`` are accepted before or after the command.

Everything runs in-process (``main(argv)``); nothing loads a model.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _programs() -> dict[str, Callable]:
    import data_builders.__main__ as data
    import eval.__main__ as ev
    import infer.__main__ as infer
    import infer.chat as chat
    import serve.__main__ as serve
    import train.__main__ as train

    return {"fclm-train": train.main, "fclm-eval": ev.main, "fclm-data": data.main, "fclm-infer": infer.main, "fclm-chat": chat.main, "fclm-serve": serve.main}


def run(prog: str, argv: list[str]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``prog argv`` run in-process; argparse's SystemExit counts as a return."""
    main = _programs()[prog]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return rc, out.getvalue(), err.getvalue()


def _subcommands() -> list[tuple[str, list[str]]]:
    from data_builders.__main__ import COMMANDS

    cases = [(p, []) for p in ("fclm-train", "fclm-eval", "fclm-data", "fclm-infer", "fclm-chat", "fclm-serve")]
    cases += [("fclm-train", ["cache-sam"]), ("fclm-train", ["export"])]
    cases += [("fclm-eval", [c]) for c in ("run", "score", "dlc-bench")]
    cases += [("fclm-data", [c]) for c in COMMANDS]
    return cases


@pytest.mark.parametrize("prog, sub", _subcommands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_help_exits_0_with_a_usage_line(prog, sub):
    rc, out, err = run(prog, [*sub, "--help"])
    assert rc == 0, err
    assert any(line.lower().startswith("usage:") for line in out.splitlines()), out[:500]
    assert prog in out
    if sub:
        assert " ".join([prog, *sub]) in out.splitlines()[0] or " ".join([prog, *sub]) in out


def test_short_help_too():
    for prog in ("fclm-train", "fclm-eval", "fclm-data"):
        rc, out, _ = run(prog, ["-h"])
        assert rc == 0 and "usage:" in out.lower()


def test_train_help_lists_the_config_keys_with_their_docs_and_defaults():
    rc, out, _ = run("fclm-train", ["--help"])
    assert rc == 0
    for key in ("stage", "output_dir", "init_from", "max_steps", "data.train", "data.batch_size", "optim.lr", "optim.schedule",
                "checkpoint.every", "trainability.llm", "trainability.lora.r", "loss.latent_kind", "sam_cache.dir",
                "model.preset", "model.backbone.name_or_path", "model.sam.variant", "model.region_extractor.context_margin"):  # fmt: skip
        assert any(line.strip().startswith(key + " ") or line.strip().startswith(key + ":") for line in out.splitlines()), key
    assert "Peak learning rate" in out and ("0.0002" in out or "2e-04" in out)
    assert "Examples" in out or "examples" in out
    rc2, out2, _ = run("fclm-train", ["cache-sam", "--help"])
    assert rc2 == 0 and "optim.lr" in out2


def test_eval_score_help_describes_the_prediction_format():
    rc, out, _ = run("fclm-eval", ["score", "--help"])
    assert rc == 0
    for word in ('"segs"', '"instances"', '"mask"', '"score"', '"exists"', "RLE", "one line per GT record"):
        assert word in out, word
    assert "example" in out.lower()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.yaml").write_text("stage: 3\n")
    (tmp_path / "x.jsonl").write_text(json.dumps({"id": "a"}) + "\n")
    return tmp_path


def _bad_invocations(t: Path) -> list[tuple[str, list[str]]]:
    return [
        ("fclm-train", []),
        ("fclm-train", [str(t / "none.yaml")]),
        ("fclm-train", [str(t / "bad.yaml")]),
        ("fclm-train", ["cache-sam"]),
        ("fclm-train", ["cache-sam", str(t / "none.yaml")]),
        ("fclm-train", ["export", str(t / "nothing"), "--out", str(t / "o")]),
        ("fclm-train", ["export"]),
        ("fclm-eval", []),
        ("fclm-eval", ["score", "--task", "nope", "--gt", "a", "--pred", "b", "--out", "c"]),
        ("fclm-eval", ["score", "--task", "res", "--gt", str(t / "none.jsonl"), "--pred", str(t / "x.jsonl"), "--out", str(t / "o")]),
        ("fclm-eval", ["dlc-bench", "--out", str(t / "o")]),
        ("fclm-data", []),
        ("fclm-data", ["validate"]),
        ("fclm-data", ["refcoco", "--bogus"]),
        ("fclm-data", ["stats", str(t / "none.jsonl")]),
        ("fclm-infer", ["--bogus"]),
        ("fclm-infer", ["--model", str(t), "--data", str(t / "none.jsonl"), "--out", str(t / "p.jsonl")]),
        ("fclm-chat", ["--bogus"]),
        ("fclm-chat", ["--model", str(t / "no-model")]),
        ("fclm-serve", ["--bogus"]),
        ("fclm-serve", ["--model", str(t)]),
    ]


def test_every_error_has_the_program_prefix(files):
    for prog, argv in _bad_invocations(files):
        rc, out, err = run(prog, argv)
        lines = err.strip().splitlines()
        assert rc == 2, (prog, argv, rc, err)
        assert lines and lines[-1].startswith(f"{prog}: error: "), (prog, argv, err)
        assert "Traceback" not in err, (prog, argv, err)
        other = [line for line in lines if ": error:" in line or line.startswith("error:")]
        assert all(line.startswith(f"{prog}: error: ") for line in other), (prog, argv, err)


@pytest.mark.parametrize("argv", [["-v", "validate", "X"], ["validate", "X", "-v"], ["validate", "-v", "X"], ["--verbose", "validate", "X"], ["validate", "X", "--verbose"]])
def test_data_options_before_or_after_the_command(files, argv):
    from data_builders.__main__ import build_parser

    argv = [str(files / "x.jsonl") if a == "X" else a for a in argv]
    args = build_parser().parse_args(argv)
    assert args.command == "validate" and args.verbose is True and args.files == [files / "x.jsonl"]
    args = build_parser().parse_args(["validate", str(files / "x.jsonl")])
    assert args.verbose is False


def test_data_verbose_after_the_command_runs(files):
    rc, out, err = run("fclm-data", ["validate", str(files / "x.jsonl"), "-v", "--no-images"])
    assert rc in (0, 1) and "error: unrecognized arguments" not in err, err


def test_installed_console_scripts_match_the_mains():
    """pyproject's [project.scripts] names are the programs tested here."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(_programs())
    assert sys.version_info >= (3, 10)
