"""MUSE multi-target reasoning segmentation (MaverickRen/PixelLM) → ``reason_seg`` records, one per question.

``fclm-data muse --ann muse_val.json --image-root refer_seg/images/mscoco/images --out muse_val.jsonl``

Input: a list of images ``{"file_name" | "coco_url", "height", "width", "questions": [str],
"answers": [[{"segmentation", "bbox", "category_name", "rephrased_name"?}, …] per question],
"text_answers": [str with "{seg}" per object] (optional)}``. Images named by ``file_name`` are under
``IMAGE_ROOT/train2014``; by ``coco_url`` under ``IMAGE_ROOT/train2017`` or ``val2017``.

Record: user ``{question} Please answer and segment each object you mention.``; assistant the
question's text answer with ``[SEG]`` for each ``{seg}`` (or, without one, ``name [SEG], name [SEG]
and name [SEG].``); one target per object, in answer order, each one instance; ``meta.names``.
A question whose answer names no object gets ``There is no such object in the image.`` and no target.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_builders.common import ENTRY_ERRORS, BuildResult, ImageIndex, RecordGate, add_common_args, checked_box, image_hw, load_json, to_instance
from fclm.data.schema import chat, make_record, target_entry
from fclm.data.templates import NO_TARGET_ANSWER, SEG_TOKEN, join_names, reason_seg_prompt
from fclm.io import ErrorReport, RecordError, write_jsonl


@dataclass
class MuseOptions:
    ann: Path
    image_root: Path
    out: Path
    strict: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        self.ann, self.image_root, self.out = Path(self.ann), Path(self.image_root), Path(self.out)


def image_rel(item: dict) -> str:
    """Image path under the MUSE image root (PixelLM's layout)."""
    if item.get("file_name"):
        return f"train2014/{item['file_name']}"
    url = str(item["coco_url"])
    folder = "train2017" if "train2017" in url else "val2017"
    return f"{folder}/{url.rstrip('/').split('/')[-1]}"


def answer_text(text_answer: str | None, names: list[str]) -> str:
    """The assistant turn: the text answer with ``{seg}`` → ``[SEG]``, else ``name [SEG], … and name [SEG].``"""
    if not names:
        return NO_TARGET_ANSWER
    if text_answer and text_answer.count("{seg}") == len(names):
        return text_answer.replace("{seg}", SEG_TOKEN).strip()
    return join_names([f"{n} {SEG_TOKEN}" for n in names]) + "."


def build(opts: MuseOptions) -> BuildResult:
    report = ErrorReport(strict=opts.strict)
    data = load_json(opts.ann, list, "a list of image entries")
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    split = "val" if "val" in opts.ann.stem else ("test" if "test" in opts.ann.stem else "train")

    def records() -> Iterator[tuple[str, dict]]:
        for i, item in enumerate(data):
            where = f"{opts.ann}[{i}]"
            try:
                if not isinstance(item, dict):
                    raise RecordError(where, f"expected an object, got {type(item).__name__}")
                image = index.field(image_rel(item), where)
                h, w = image_hw(item.get("height"), item.get("width"))
                index.check_hw(image, h, w, where)
                questions, answers = list(item["questions"]), list(item["answers"])
                if len(questions) != len(answers):
                    raise RecordError(where, f"{len(questions)} question(s) but {len(answers)} answer list(s)")
                text_answers = list(item.get("text_answers") or [None] * len(answers))
            except RecordError as e:
                report.add(e)
                continue
            except ENTRY_ERRORS as e:
                report.add(RecordError(where, f"malformed entry ({type(e).__name__}: {str(e)[:200]})"))
                continue
            for q, (question, objs, text_answer) in enumerate(zip(questions, answers, text_answers)):
                qwhere = f"{where}.questions[{q}]"
                try:
                    targets, names = [], []
                    for k, obj in enumerate(objs):
                        try:
                            if not isinstance(obj, dict):
                                raise ValueError(f"expected an object, got {type(obj).__name__}")
                            rle, mask_box, _ = to_instance(obj["segmentation"], h, w)
                            box = checked_box(obj["bbox"], h, w) if obj.get("bbox") else mask_box
                        except ENTRY_ERRORS as e:
                            raise RecordError(f"{qwhere}.answers[{k}]", f"bad segmentation/bbox ({str(e)[:200]})") from None
                        targets.append(target_entry([rle], [box]))
                        names.append(str(obj.get("rephrased_name") or obj.get("category_name") or "the object"))
                    text = answer_text(text_answer if isinstance(text_answer, str) else None, names)
                    prompt = reason_seg_prompt(str(question))
                except RecordError as e:
                    report.add(e)
                    continue
                except ENTRY_ERRORS as e:
                    report.add(RecordError(qwhere, f"malformed question ({type(e).__name__}: {str(e)[:200]})"))
                    continue
                yield qwhere, make_record(
                    id=f"muse-{split}-{i}-{q}",
                    image=image,
                    task="reason_seg",
                    messages=chat(prompt, text),
                    targets=targets,
                    meta={"source": "muse", "split": split, "question": str(question), "names": names, "image_index": i},
                )

    gate = RecordGate(report)
    n = write_jsonl(opts.out, (x for x in records() if gate(*x)), report=report, allow_nan=False, located=True)
    return BuildResult(opts.out, n, report)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann", required=True, type=Path, help="muse_train.json / muse_val.json / muse_test_*.json")
    p.add_argument("--image-root", required=True, type=Path, help="folder holding train2014/, train2017/, val2017/")
    p.add_argument("--out", required=True, type=Path)
    add_common_args(p)


def run(args: argparse.Namespace) -> BuildResult:
    return build(MuseOptions(ann=args.ann, image_root=args.image_root, out=args.out, strict=args.strict, check_images=args.check_images))
