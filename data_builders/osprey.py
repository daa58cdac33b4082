"""Osprey-724K style data (CircleRadon/Osprey) → ``conversation`` and ``region_caption`` records.

``fclm-data osprey --ann osprey_conversation.json --image-root coco/train2017 --out osprey_conv.jsonl``

Input: a list of images ``{"file_name", "height", "width", "annotation": [{"segmentation": polygons |
RLE, …}], …}`` with either

* ``"conversations": [{"from": "human" | "gpt", "value": …}, …]`` naming regions ``<region1>`` … →
  one ``conversation`` record: every annotation is a region, introduced once at the start of the
  first user turn as Osprey does (``There are 2 regions in the picture: region1 <region1>, region2
  <region2>.``), later mentions written ``region1`` as plain text; ``--suffix`` is appended to each
  question (Osprey's short-form and part-level sets use `` Answer the question using a single word
  or phrase.``);
* ``"description": ["<region1>: text", …]`` (detailed descriptions) → one ``region_caption``
  record per region (``Describe <region> in detail.``).

Osprey names COCO images ``COCO_train2014_000000123.jpg`` but reads ``000000123.jpg``: when the
file as named is missing under ``--image-root``, the part after the last ``_`` is tried.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_builders.common import ENTRY_ERRORS, BuildResult, ImageIndex, RecordGate, add_common_args, image_hw, load_json, to_instance
from fclm.data.schema import chat, make_record, region_entry
from fclm.data.templates import REGION_CAPTION_PROMPT
from fclm.io import ErrorReport, RecordError, write_jsonl

_NUMBERED = re.compile(r"<region(\d+)>")
_DESCRIPTION = re.compile(r"^\s*<[^>]*>\s*:\s*(.*)$", re.DOTALL)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class OspreyOptions:
    ann: Path
    image_root: Path
    out: Path
    suffix: str = ""
    """Appended to every question of a conversation."""
    strict: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        self.ann, self.image_root, self.out = Path(self.ann), Path(self.image_root), Path(self.out)


def region_intro(n: int) -> str:
    """``There are 2 regions in the picture: region1 <region1>, region2 <region2>.``"""
    names = ", ".join(f"region{k} <region{k}>" for k in range(1, n + 1))
    return f"There {'is 1 region' if n == 1 else f'are {n} regions'} in the picture: {names}."


def _image(index: ImageIndex, file_name: str, where: str) -> str:
    try:
        return index.field(file_name, where)
    except RecordError:
        if "_" not in file_name:
            raise
        return index.field(file_name.rsplit("_", 1)[-1], where)


def build(opts: OspreyOptions) -> BuildResult:
    report = ErrorReport(strict=opts.strict)
    data = load_json(opts.ann, list, "a list of image entries")
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    stem = opts.ann.stem
    counts = {"conversation": 0, "region_caption": 0}
    gate = RecordGate(report)

    def records() -> Iterator[tuple[str, dict]]:
        for i, item in enumerate(data):
            where = f"{opts.ann}[{i}]"
            try:
                if not isinstance(item, dict):
                    raise RecordError(where, f"expected an object, got {type(item).__name__}")
                if not isinstance(item.get("file_name"), str):
                    raise RecordError(where, "'file_name' must be a string")
                image = _image(index, item["file_name"], where)
                h, w = image_hw(item.get("height"), item.get("width"))
                index.check_hw(image, h, w, where)
                regions = []
                for k, ann in enumerate(item["annotation"]):
                    try:
                        rle, box, _ = to_instance(ann["segmentation"], h, w)
                    except ENTRY_ERRORS as e:
                        raise RecordError(f"{where}.annotation[{k}]", f"bad segmentation ({e})") from None
                    regions.append(region_entry(rle, box))
                meta = {"source": "osprey", "subset": stem, "file_name": item["file_name"]}
                if "conversations" in item:
                    messages = _conversation(item["conversations"], len(regions), opts.suffix, where)
                    rec = make_record(id=f"osprey-{stem}-{i}", image=image, task="conversation", messages=messages, regions=regions, meta=meta)
                    if gate(where, rec):
                        counts["conversation"] += 1
                        yield where, rec
                elif "description" in item:
                    descriptions = item["description"]
                    if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
                        raise RecordError(where, "'description' must be a list of strings")
                    if len(descriptions) != len(regions):
                        raise RecordError(where, f"{len(descriptions)} description(s) for {len(regions)} region(s)")
                    for k, (d, region) in enumerate(zip(descriptions, regions)):
                        m = _DESCRIPTION.match(d)
                        caption = (m.group(1) if m else d).strip()
                        if not caption:
                            report.add(RecordError(f"{where}.description[{k}]", "empty description"))
                            continue
                        rec = make_record(
                            id=f"osprey-{stem}-{i}-{k}", image=image, task="region_caption",
                            messages=chat(REGION_CAPTION_PROMPT, caption), regions=[region], meta={**meta, "region_index": k},
                        )
                        if gate(f"{where}.description[{k}]", rec):
                            counts["region_caption"] += 1
                            yield f"{where}.description[{k}]", rec
                else:
                    raise RecordError(where, "neither 'conversations' nor 'description'")
            except RecordError as e:
                report.add(e)
            except ENTRY_ERRORS as e:
                report.add(RecordError(where, f"malformed entry ({type(e).__name__}: {str(e)[:200]})"))

    n = write_jsonl(opts.out, records(), report=report, allow_nan=False, located=True)
    return BuildResult(opts.out, n, report, counts)


def _conversation(turns: list, n_regions: int, suffix: str, where: str) -> list[dict]:
    messages: list[dict] = []
    if not isinstance(turns, list):
        raise RecordError(where, f"'conversations' must be a list, got {type(turns).__name__}")
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}.conversations[{t}]", f"expected an object, got {type(turn).__name__}")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RecordError(f"{where}.conversations[{t}]", f"unknown speaker {turn.get('from')!r}")
        text = str(turn.get("value", "")).replace("<image>", "").strip()
        for num in _NUMBERED.findall(text):
            if not 1 <= int(num) <= n_regions:
                raise RecordError(f"{where}.conversations[{t}]", f"<region{num}> but {n_regions} region(s)")
        text = _NUMBERED.sub(r"region\1", text)
        if role == "user" and suffix:
            text = f"{text} {suffix.strip()}"
        messages.append({"role": role, "content": text})
    if len(messages) % 2:
        messages = messages[:-1]  # a question without its answer teaches nothing
    if not messages or any(m["role"] != ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(messages)):
        raise RecordError(where, "conversation must alternate human/gpt turns, starting with human")
    if n_regions:
        messages[0]["content"] = f"{region_intro(n_regions)}\n{messages[0]['content']}"
    return messages


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann", required=True, type=Path, help="an Osprey-724K json (conversation, short form, part level, description …)")
    p.add_argument("--image-root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--suffix", default="", help="appended to every question (e.g. ' Answer the question using a single word or phrase.')")
    add_common_args(p)


def run(args: argparse.Namespace) -> BuildResult:
    return build(
        OspreyOptions(ann=args.ann, image_root=args.image_root, out=args.out, suffix=args.suffix, strict=args.strict, check_images=args.check_images)
    )
