"""``fclm-chat`` — ask a trained FCLM about an image: a line-by-line conversation, or one question.

    fclm-chat --model runs/demo/stage2/export --image street.jpg         # conversation on stdin
    > /box 10,20,200,240
    region 1: box [10, 20, 200, 240]; the next question needs 1 <region> placeholder(s)
    > What is <region>?
    A man with a red umbrella.
    > Please segment the umbrella.
    [SEG]
      [SEG] 1 (sam): 1 instance, box [40, 22, 180, 110], score 0.93
    > /save umbrella.png                                                  # + umbrella.json

    fclm-chat --model DIR --image street.jpg --prompt "What is <region>?" --box 10,20,200,240 \\
        --out overlay.png --json answer.json                               # one question, then exit

A plain line is a question about the current image, asked within the conversation so far (earlier
turns and their regions stay in the prompt); its answer is printed as it is generated, then one line
per ``[SEG]`` (phrase, head, instances, boxes, scores) and per input region. Lines starting with ``/``
are commands (:data:`HELP`). Region commands add a region for the next question, which must hold one
``<region>`` placeholder per region, in the order they were added; consecutive ``/point`` commands
(``--point`` options) are one region of several clicks. In one-shot mode ``--box``, ``--point``,
``--scribble`` and ``--mask`` may repeat and make regions in command-line order.

The JSON that ``/save`` and ``--json`` write is ``Answer.to_json()`` (``fclm/inference/predictor.py``;
masks as COCO RLE) plus ``image`` and ``prompt``; the PNG is :func:`fclm.visualize.overlay`.

Errors: in the conversation a bad line (unknown command, bad coordinates, a region outside the image,
an unreadable file, a placeholder count that differs from the pending regions …) prints one line
``error: …`` on stderr and the conversation goes on. On the command line (one-shot, or a bad
``--model``/``--image`` at start) it is one line ``fclm-chat: error: …`` on stderr and exit code 2.
All model work is :class:`fclm.inference.FCLMPredictor`'s; this file only reads input and prints.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import numpy as np
from PIL import Image

from fclm.inference import Answer, FCLMPredictor, SamplingConfig
from fclm.inference.regions import parse_region
from fclm.io import RecordError, write_json
from fclm.processor import load_image
from fclm.visualize import save_overlay

PROG = "fclm-chat"

HELP = """\
A plain line is a question about the image. Commands:
  /image PATH              set the image (starts a new conversation)
  /box x1,y1,x2,y2         add a box region (pixels) for the next question
  /point x,y[,neg]         add a click; consecutive /point commands make one region (neg: negative click)
  /scribble x1,y1;x2,y2;…  add a scribble region (a polyline)
  /mask FILE.png           add a mask region (a PNG of the image's size; nonzero = inside)
  /head [NAME]             grounding head for [SEG] (without NAME: list the heads)
  /save OUT.png            overlay of the last answer, and OUT.json beside it
  /reset                   new conversation; drops the pending regions
  /help                    this text
  /quit                    leave (so does the end of input)
The next question needs one <region> placeholder per pending region, in the order they were added."""

USAGE = {
    "/image": "/image PATH",
    "/box": "/box x1,y1,x2,y2",
    "/point": "/point x,y[,neg]",
    "/scribble": "/scribble x1,y1;x2,y2;…",
    "/mask": "/mask FILE.png",
    "/save": "/save OUT.png",
}

# a user's mistake: one line, never a traceback (RecordError is a ValueError)
USER_ERRORS = (ValueError, OSError)


def _message(error: BaseException) -> str:
    """The error's message; a RecordError's 'where' names an internal record or repeats the file, so drop it."""
    return error.problem if isinstance(error, RecordError) else str(error)


# --------------------------------------------------------------------------------------------------
# regions as typed: "x1,y1,x2,y2", "x,y[,neg]", "x1,y1;x2,y2", FILE.png
# --------------------------------------------------------------------------------------------------


def _numbers(text: str, count: int, usage: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ValueError(f"expected {usage} ({count} numbers), got {text!r}")
    return [int(v) if v.is_integer() else v for v in values]


def parse_box(text: str) -> dict:
    """``"x1,y1,x2,y2"`` → ``{"box": [x1, y1, x2, y2]}`` (pixels of the original image)."""
    return {"box": _numbers(text, 4, "x1,y1,x2,y2")}


def parse_point(text: str) -> tuple[list[float], int]:
    """``"x,y"`` or ``"x,y,neg"`` (also ``pos``) → ([x, y], label) with label 1 positive, 0 negative."""
    parts = [p.strip() for p in text.split(",")]
    label = 1
    if len(parts) == 3:
        if parts[2].lower() not in ("neg", "pos"):
            raise ValueError(f"expected x,y or x,y,neg, got {text!r} (the third field is 'neg' or 'pos')")
        label = 0 if parts[2].lower() == "neg" else 1
        parts = parts[:2]
    return _numbers(",".join(parts), 2, "x,y[,neg]"), label


def parse_scribble(text: str) -> dict:
    """``"x1,y1;x2,y2;…"`` → ``{"scribble": [[x1, y1], [x2, y2], …]}``."""
    points = [p for p in text.split(";") if p.strip()]
    if not points:
        raise ValueError(f"expected x1,y1;x2,y2;… , got {text!r}")
    return {"scribble": [_numbers(p, 2, "x,y for each scribble point") for p in points]}


def load_mask(path: str | Path) -> np.ndarray:
    """A mask PNG (or any image file) → H×W bool, nonzero = inside (any nonzero colour channel counts)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("1", "L", "P", "I", "I;16", "F"):
                array = np.asarray(im)
            else:  # colour (alpha ignored: a fully opaque mask would otherwise be all inside)
                array = np.asarray(im.convert("RGB")).any(axis=-1)
    except FileNotFoundError:
        raise ValueError(f"mask file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read mask {path}: {type(e).__name__}: {e}") from None
    return array != 0


class PendingRegions:
    """The regions typed for the next question, checked against the image as they are added."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._points_open = False

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items = []
        self._points_open = False

    def close_points(self) -> None:
        """The next ``point`` starts a new region (called for every line that is not a ``/point``)."""
        self._points_open = False

    def add(self, kind: str, text: str, height: int, width: int) -> str:
        """Add a ``box`` / ``point`` / ``scribble`` / ``mask`` given as typed; return a line describing it.

        Raises ``ValueError`` naming the region for bad syntax, a region outside the H×W image or a mask
        of another size; nothing is added then.
        """
        joins = kind == "point" and self._points_open and bool(self.items)
        index = len(self.items) - 1 if joins else len(self.items)
        if kind == "point":
            xy, label = parse_point(text)
            parse_region({"points": [xy]}, index, height, width)  # only the click's place: one region may hold negatives
            if joins:
                self.items[-1]["points"].append(xy)
                self.items[-1]["labels"].append(label)
            else:
                self.items.append({"points": [xy], "labels": [label]})
            self._points_open = True
            labels = self.items[-1]["labels"]
            negatives = labels.count(0)
            return f"region {index + 1}: points, {len(labels)} click(s)" + (f" ({negatives} negative)" if negatives else "")
        if kind == "box":
            region = parse_box(text)
            what = f"box {region['box']}"
        elif kind == "scribble":
            region = parse_scribble(text)
            what = f"scribble of {len(region['scribble'])} point(s)"
        elif kind == "mask":
            region = {"mask": load_mask(text)}
            what = f"mask from {text} ({int(region['mask'].sum())} px)"
        else:
            raise ValueError(f"unknown region kind {kind!r}")
        parse_region(region, index, height, width)
        self.items.append(region)
        self._points_open = False
        return f"region {index + 1}: {what}"


# --------------------------------------------------------------------------------------------------
# printing an answer
# --------------------------------------------------------------------------------------------------


def _box(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def describe(answer: Answer) -> list[str]:
    """One line per ``[SEG]`` (phrase, head, instance count, boxes, scores) and per input region."""
    lines = []
    for k, seg in enumerate(answer.segments):
        label = f'[SEG] {k + 1} "{seg.phrase}"' if seg.phrase else f"[SEG] {k + 1}"
        n = len(seg.instances)
        if n == 0:
            what = "no mask"
        elif n == 1:
            what = f"1 instance, box {_box(seg.instances[0].box)}, score {seg.instances[0].score:.2f}"
        else:
            what = (f"{n} instances, boxes " + " ".join(_box(i.box) for i in seg.instances)
                    + ", scores " + " ".join(f"{i.score:.2f}" for i in seg.instances))
        if seg.exists is not None:
            what += f", exists {seg.exists:.2f}"
        lines.append(f"  {label} ({seg.head}): {what}")
    for i, region in enumerate(answer.regions):
        how = {"given": "mask as given", "sam": "mask by SAM", "fallback": "SAM gave nothing: the prompt's own shape"}
        lines.append(f"  region {i + 1} ({region.kind}): {how.get(region.source, region.source)}, {int(region.mask.sum())} px")
    if answer.finish_reason == "length":
        lines.append("  (cut: --max-new-tokens reached)")
    return lines


def save_answer(png: str | Path | None, json_path: str | Path | None, image: Image.Image, image_path: str, prompt: str,
                answer: Answer) -> None:
    """Write the overlay PNG (``png`` may be None) and the JSON (``json_path`` may be None)."""
    if png is not None:
        save_overlay(png, image, answer)
    if json_path is not None:
        write_json(json_path, {"image": image_path, "prompt": prompt, **answer.to_json()}, indent=None)


# --------------------------------------------------------------------------------------------------
# the conversation
# --------------------------------------------------------------------------------------------------


class ChatSession:
    """State of one ``fclm-chat`` conversation; :meth:`handle` takes one input line."""

    def __init__(self, predictor: FCLMPredictor, out: TextIO, *, sampling: SamplingConfig, head: str | None = None) -> None:
        self.predictor = predictor
        self.out = out
        self.sampling = sampling
        self.head = head
        self.chat = predictor.chat()
        self.pending = PendingRegions()
        self.image_path: str | None = None
        self._last: tuple[Answer, str, Image.Image, str] | None = None  # answer, question, image, image path

    def _print(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def set_image(self, path: str) -> None:
        image = load_image(path)
        self.predictor.set_image(image)
        self.image_path = path
        self.chat.reset()
        self.pending.clear()
        self._last = None
        self._print(f"image {path}: {image.width}×{image.height}; new conversation")

    def handle(self, line: str) -> bool:
        """Answer a question or run a command; False after ``/quit``. User errors propagate (see :meth:`run`)."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.pending.close_points()
            self.ask(line)
            return True
        command, _, arg = line.partition(" ")
        command, arg = command.lower(), arg.strip()
        if command != "/point":
            self.pending.close_points()
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self._print(HELP)
            return True
        if command == "/reset":
            self.chat.reset()
            self.pending.clear()
            self._print("new conversation; no pending regions")
            return True
        if command == "/head":
            heads = sorted(self.predictor.model.heads)
            if not arg:
                self._print(f"head: {self.head or self.predictor.processor.config.default_head} (this model has {', '.join(heads)})")
            elif arg not in heads:
                raise ValueError(f"unknown head {arg!r}; this model has {', '.join(heads)}")
            else:
                self.head = arg
                self._print(f"head: {arg}")
            return True
        if command not in USAGE:
            raise ValueError(f"unknown command {command!r} (/help lists the commands)")
        if not arg:
            raise ValueError(f"usage: {USAGE[command]}")
        if command == "/image":
            self.set_image(arg)
        elif command == "/save":
            self.save(arg)
        else:
            if self.image_path is None:
                raise ValueError("no image is set: use /image PATH first")
            h, w = self.predictor.image_size
            try:
                described = self.pending.add(command[1:], arg, h, w)
            except ValueError as e:
                raise ValueError(f"{command}: {e}") from None
            self._print(f"{described}; the next question needs {len(self.pending)} <region> placeholder(s)")
        return True

    def ask(self, question: str) -> None:
        if self.image_path is None:
            raise ValueError("no image is set: use /image PATH first")
        try:
            stream = self.predictor.ask(question, list(self.pending.items), head=self.head, history=self.chat.history,
                                        stream=True, sampling=self.sampling)
        except RecordError as e:  # how the prompt was built (placeholders …): say what was pending
            raise ValueError(f"{e.problem} (pending regions: {len(self.pending)})") from None
        for piece in stream:
            self.out.write(piece)
            self.out.flush()
        self._print()
        answer = stream.answer
        self.chat.record(question, answer)
        self.pending.clear()  # the regions belong to this turn now; kept pending only if the question failed
        self._last = (answer, question, self.predictor.image, self.image_path)
        for line in describe(answer):
            self._print(line)

    def save(self, arg: str) -> None:
        png = Path(arg)
        if png.suffix.lower() != ".png":
            raise ValueError(f"/save needs a path ending in .png (the JSON goes beside it), got {arg!r}")
        if self._last is None:
            raise ValueError("nothing to save: ask a question about this image first")
        answer, question, image, image_path = self._last
        json_path = png.with_suffix(".json")
        save_answer(png, json_path, image, image_path, question, answer)
        self._print(f"saved {png} and {json_path}")

    def run(self, lines: TextIO, *, interactive: bool) -> None:
        """Read lines until ``/quit`` or the end of input; a user error prints ``error: …`` on stderr and goes on."""
        while True:
            if interactive:
                self.out.write("> ")
                self.out.flush()
            line = lines.readline()
            if not line:
                if interactive:
                    self._print()
                return
            try:
                if not self.handle(line):
                    return
            except USER_ERRORS as e:
                self.out.flush()  # keep the order of stdout and stderr lines in a terminal
                print(f"error: {_message(e)}", file=sys.stderr, flush=True)
            except KeyboardInterrupt:  # Ctrl-C stops the answer being generated, not the conversation
                self._print()
                print("error: interrupted", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


class _RegionOption(argparse.Action):
    """Collects --box/--point/--scribble/--mask in command-line order (the order of the placeholders)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, "regions", [*getattr(namespace, "regions", []), (self.dest, option_string, values)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a trained FCLM about an image: a conversation on stdin (/help lists its commands), "
                    "or one question with --prompt.",
        epilog=f"""examples:
  {PROG} --model runs/demo/stage2/export --image street.jpg          a conversation on stdin
  {PROG} --model DIR --image street.jpg --prompt "What is <region>?" --box 10,20,200,240 \\
      --out overlay.png --json answer.json                                one question, then exit

A bad option or file ends with one line '{PROG}: error: …' and exit code 2.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="exported model folder (fclm-train export)")
    p.add_argument("--image", help="image to start with (the conversation can change it with /image)")
    p.add_argument("--device", help="torch device, e.g. cuda:0 (default: where the model loads, the CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="precision to run in (default: the model's)")
    p.add_argument("--head", help="grounding head for [SEG] (default: the model's default head)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="token budget of an answer (default 64)")
    p.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (needs --temperature)")
    p.add_argument("--seed", type=int, help="seed of the sampling, for repeatable answers (needs --temperature)")
    one = p.add_argument_group("one question (needs --image), then exit")
    one.add_argument("--prompt", help="the question; one <region> placeholder per region option")
    one.add_argument("--box", action=_RegionOption, metavar="x1,y1,x2,y2", help="a box region (repeatable)")
    one.add_argument("--point", action=_RegionOption, metavar="x,y[,neg]",
                     help="a click; consecutive --point options make one region")
    one.add_argument("--scribble", action=_RegionOption, metavar="x1,y1;x2,y2;…", help="a scribble region (repeatable)")
    one.add_argument("--mask", action=_RegionOption, metavar="FILE.png", help="a mask region, nonzero = inside (repeatable)")
    one.add_argument("--out", type=Path, help="write the overlay PNG here")
    one.add_argument("--json", type=Path, help="write the answer JSON here (masks as COCO RLE)")
    p.set_defaults(regions=[])
    return p


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    if args.temperature is None:
        if args.top_p is not None or args.seed is not None:
            raise ValueError("--top-p and --seed only apply when sampling: give --temperature too")
        return SamplingConfig(max_new_tokens=args.max_new_tokens)
    return SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=args.temperature,
                          top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed)


def _load(args: argparse.Namespace) -> FCLMPredictor:
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: no such folder")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would sit between our lines
    predictor = FCLMPredictor.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.head is not None and args.head not in predictor.model.heads:
        raise ValueError(f"--head {args.head!r} is not one of this model's heads ({', '.join(sorted(predictor.model.heads))})")
    return predictor


def _one_shot(args: argparse.Namespace, out: TextIO, sampling: SamplingConfig) -> int:
    if args.image is None:
        raise ValueError("--prompt needs --image")
    # everything the user typed is checked before the model loads, so a typo fails fast
    image = load_image(args.image)
    pending = PendingRegions()
    for kind, option, value in args.regions:
        try:
            pending.add(kind, value, image.height, image.width)
        except ValueError as e:
            raise ValueError(f"{option} {value}: {e}") from None
    predictor = _load(args)
    predictor.set_image(image)
    try:
        answer = predictor.ask(args.prompt, pending.items, head=args.head, sampling=sampling)
    except RecordError as e:
        raise ValueError(f"{e.problem} (region options: {len(pending)})") from None
    out.write(answer.text + "\n")
    for line in describe(answer):
        out.write(line + "\n")
    save_answer(args.out, args.json, image, args.image, args.prompt, answer)
    for path in (args.out, args.json):
        if path is not None:
            out.write(f"wrote {path}\n")
    out.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> int:
    """Run ``fclm-chat`` with ``argv`` (default ``sys.argv[1:]``), reading ``stdin`` and printing to ``stdout``; return the exit code."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its error (or --help)
        return e.code if isinstance(e.code, int) else 2
    try:
        sampling = _sampling(args)
        if args.prompt is not None:
            return _one_shot(args, stdout, sampling)
        given = [name for name, v in (("--out", args.out), ("--json", args.json)) if v is not None]
        given += [option for _, option, _ in args.regions]
        if given:
            raise ValueError(f"{', '.join(dict.fromkeys(given))} only apply to one question: give --prompt too")
        image = load_image(args.image) if args.image is not None else None  # before the slow model load
        session = ChatSession(_load(args), stdout, sampling=sampling, head=args.head)
        if image is not None:
            session.predictor.set_image(image)
            session.image_path = args.image
            stdout.write(f"image {args.image}: {image.width}×{image.height}\n")
        else:
            stdout.write("no image yet: /image PATH sets one\n")
        interactive = bool(getattr(stdin, "isatty", lambda: False)())
        if interactive:
            stdout.write("/help lists the commands; /quit leaves\n")
        stdout.flush()
        session.run(stdin, interactive=interactive)
        return 0
    except USER_ERRORS as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
