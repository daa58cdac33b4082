"""Grounded conversation generation, GranD-f (mbzuai-oryx/groundingLMM) → ``gcg`` records, one per image.

``fclm-data gcg --ann GranDf_HA_GCG_train.json --image-root GranDf_HA_images/train --out gcg_train.jsonl``
reads the training layout: a list of ``{"file_name", "caption", "groundings": {phrase:
{"token_positives": [start, end], "rle_masks": [RLE, …]}}}`` (character spans into the caption).

``fclm-data gcg --caption-gt val_gcg_coco_caption_gt.json --mask-gt val_gcg_coco_mask_gt.json …``
reads the evaluation layout (COCO captions with ``labels`` + COCO masks); each label is found in the
caption in order and paired with the image's mask annotations in id order. (The official files do
not state that pairing; the GCG metrics match masks to phrases without it.)

Record: user ``Describe the image in detail and segment each object you mention.``; assistant the
caption with each grounded phrase written ``<p>phrase</p> [SEG]``; one target per phrase, in caption
order (the union of the phrase's masks, as GLaMM trains); ``meta.phrases`` the phrases in order.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_builders.common import ENTRY_ERRORS, BuildResult, ImageIndex, RecordGate, add_common_args, load_json, valid_id
from fclm.data.schema import chat, image_size, instance, make_record, resolve_image_path, target_entry
from fclm.data.templates import GCG_PROMPT, gcg_phrase
from fclm.io import ErrorReport, RecordError, write_jsonl
from fclm.masks import decode_mask


@dataclass
class GcgOptions:
    image_root: Path
    out: Path
    ann: Path | None = None
    """Training layout (``GranDf_HA_GCG_train.json``)."""
    caption_gt: Path | None = None
    """Evaluation layout: ``{split}_gcg_coco_caption_gt.json`` (with ``mask_gt``)."""
    mask_gt: Path | None = None
    source: str = "grandf"
    strict: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        self.image_root, self.out = Path(self.image_root), Path(self.out)
        if (self.ann is None) == (self.caption_gt is None and self.mask_gt is None):
            raise ValueError("give either --ann (training layout) or --caption-gt and --mask-gt (evaluation layout)")
        if self.ann is None and (self.caption_gt is None or self.mask_gt is None):
            raise ValueError("the evaluation layout needs both --caption-gt and --mask-gt")


def tag_caption(caption: str, spans: list[tuple[int, int]]) -> tuple[str, list[str]]:
    """Insert ``<p>…</p> [SEG]`` around each ``(start, end)`` span; return the text and the phrases.

    Spans must be sorted, non-empty, inside the caption and not overlapping (else ``ValueError``).
    """
    out, phrases, pos = [], [], 0
    for start, end in spans:
        if not 0 <= start < end <= len(caption):
            raise ValueError(f"span [{start}, {end}] is outside the caption of {len(caption)} characters")
        if start < pos:
            raise ValueError(f"span [{start}, {end}] overlaps the previous phrase")
        phrase = caption[start:end].strip()
        if not phrase:
            raise ValueError(f"span [{start}, {end}] is blank")
        out += [caption[pos:start], gcg_phrase(phrase)]
        phrases.append(phrase)
        pos = end
    out.append(caption[pos:])
    return "".join(out).strip().strip('"').strip(), phrases


def _union(masks: list[Any], hw: tuple[int, int] | None) -> np.ndarray:
    union = None
    for m in masks:
        arr = decode_mask(m, *hw) if hw else decode_mask(m)
        if union is not None and arr.shape != union.shape:
            raise ValueError(f"mask sizes differ: {list(arr.shape)} and {list(union.shape)}")
        union = arr if union is None else union | arr
    if union is None or not union.any():
        raise ValueError("the phrase has no (non-empty) mask")
    return union


def _train_items(opts: GcgOptions, report: ErrorReport) -> Iterator[tuple[str, str, str, list[tuple[int, int]], list[list]]]:
    data = load_json(opts.ann)
    if not isinstance(data, list):
        raise RecordError(str(opts.ann), "expected a list of {file_name, caption, groundings}")
    for i, item in enumerate(data):
        where = f"{opts.ann}[{i}]"
        try:
            if not isinstance(item.get("file_name"), str) or not isinstance(item.get("caption"), str):
                raise TypeError("'file_name' and 'caption' must be strings")
            caption = item["caption"]
            groundings = item["groundings"]
            entries = sorted(
                (((int(g["token_positives"][0]), int(g["token_positives"][1])), list(g["rle_masks"])) for g in groundings.values()),
                key=lambda e: e[0],
            )
        except ENTRY_ERRORS as e:
            report.add(RecordError(where, f"malformed entry ({type(e).__name__}: {str(e)[:200]})"))
            continue
        yield where, item["file_name"], caption, [s for s, _ in entries], [m for _, m in entries]


def _eval_items(opts: GcgOptions, report: ErrorReport) -> Iterator[tuple[str, str, str, list[tuple[int, int]], list[list]]]:
    cap, masks = load_json(opts.caption_gt, dict, "a COCO captions object"), load_json(opts.mask_gt, dict, "a COCO instances object")
    for path, doc, keys in ((opts.caption_gt, cap, ("images", "annotations")), (opts.mask_gt, masks, ("annotations",))):
        for key in keys:
            if not isinstance(doc.get(key, []), list):
                raise RecordError(str(path), f"'{key}' must be a list, got {type(doc[key]).__name__}")

    def entries(path: Path, doc: dict, key: str, id_key: str) -> Iterator[dict]:
        for k, e in enumerate(doc.get(key, [])):
            if isinstance(e, dict) and valid_id(e.get(id_key)):
                yield e
            else:
                report.add(RecordError(f"{path}[{key}][{k}]", f"expected an object with an integer or string '{id_key}'; skipped"))

    images = {img["id"]: img for img in entries(opts.caption_gt, cap, "images", "id")}
    caps = {a["image_id"]: a for a in entries(opts.caption_gt, cap, "annotations", "image_id")}
    by_image: dict[Any, list] = {}
    mask_anns = list(entries(opts.mask_gt, masks, "annotations", "image_id"))
    for a in sorted(mask_anns, key=lambda a: (0, a["id"], "") if isinstance(a.get("id"), (int, float)) and not isinstance(a.get("id"), bool) else (1, 0, str(a.get("id")))):
        by_image.setdefault(a["image_id"], []).append(a.get("segmentation"))
    for image_id, img in images.items():
        where = f"{opts.caption_gt}[image_id={image_id}]"
        ann = caps.get(image_id)
        if ann is None:
            report.add(RecordError(where, "no caption annotation"))
            continue
        labels = ann.get("labels", [])
        if not (isinstance(img.get("file_name"), str) and isinstance(ann.get("caption", ""), str)
                and isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            report.add(RecordError(where, "'file_name' and 'caption' must be strings and 'labels' a list of strings"))
            continue
        caption, segs = ann.get("caption", ""), by_image.get(image_id, [])
        if len(labels) != len(segs):
            report.add(RecordError(where, f"{len(labels)} label(s) but {len(segs)} mask(s) in {opts.mask_gt}"))
            continue
        spans, pos, lower = [], 0, caption.lower()
        for label in labels:
            start = lower.find(str(label).lower(), pos)
            if start < 0:
                break
            spans.append((start, start + len(label)))
            pos = start + len(label)
        if len(spans) != len(labels):
            report.add(RecordError(where, f"label {labels[len(spans)]!r} not found in the caption (in order)"))
            continue
        yield where, img["file_name"], caption, spans, [[s] for s in segs]


def build(opts: GcgOptions) -> BuildResult:
    report = ErrorReport(strict=opts.strict)
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    items = _train_items(opts, report) if opts.ann is not None else _eval_items(opts, report)

    def records() -> Iterator[tuple[str, dict]]:
        for where, file_name, caption, spans, mask_lists in items:
            try:
                image = index.field(file_name, where)
                hw = image_size(resolve_image_path(image, opts.out.parent)) if opts.check_images else None
                text, phrases = tag_caption(caption, spans)
                targets = []
                for k, masks in enumerate(mask_lists):
                    try:
                        rle, box = instance(_union(masks, hw))
                    except ValueError as e:
                        raise RecordError(f"{where}.phrase[{k}]", str(e)) from None
                    targets.append(target_entry([rle], [box]))
            except RecordError as e:
                report.add(e)
                continue
            except (OSError, *ENTRY_ERRORS) as e:
                report.add(RecordError(where, str(e)[:300]))
                continue
            except Exception as e:  # PIL refuses some images (decompression bombs) with its own types
                report.add(RecordError(where, f"image does not open ({type(e).__name__}: {str(e)[:200]})"))
                continue
            yield where, make_record(
                id=f"gcg-{Path(file_name).stem}",
                image=image,
                task="gcg",
                messages=chat(GCG_PROMPT, text),
                targets=targets,
                meta={"source": opts.source, "phrases": phrases, "caption": caption, "file_name": file_name},
            )

    gate = RecordGate(report)
    n = write_jsonl(opts.out, (x for x in records() if gate(*x)), report=report, allow_nan=False, located=True)
    return BuildResult(opts.out, n, report)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann", type=Path, default=None, help="GranDf_HA_GCG_train.json (training layout)")
    p.add_argument("--caption-gt", type=Path, default=None, help="{split}_gcg_coco_caption_gt.json (evaluation layout)")
    p.add_argument("--mask-gt", type=Path, default=None, help="{split}_gcg_coco_mask_gt.json (evaluation layout)")
    p.add_argument("--image-root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", default="grandf")
    add_common_args(p)


def run(args: argparse.Namespace) -> BuildResult:
    return build(
        GcgOptions(
            image_root=args.image_root, out=args.out, ann=args.ann, caption_gt=args.caption_gt, mask_gt=args.mask_gt,
            source=args.source, strict=args.strict, check_images=args.check_images,
        )
    )
