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

from data_builders.common import BuildResult, ImageIndex, add_common_args, load_json
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
            caption = str(item["caption"])
            groundings = item["groundings"]
            entries = sorted(
                ((int(g["token_positives"][0]), int(g["token_positives"][1])), list(g["rle_masks"])) for g in groundings.values()
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            report.add(RecordError(where, f"malformed entry ({type(e).__name__}: {e})"))
            continue
        yield where, str(item["file_name"]), caption, [s for s, _ in entries], [m for _, m in entries]


def _eval_items(opts: GcgOptions, report: ErrorReport) -> Iterator[tuple[str, str, str, list[tuple[int, int]], list[list]]]:
    cap, masks = load_json(opts.caption_gt), load_json(opts.mask_gt)
    images = {img["id"]: img for img in cap.get("images", [])}
    caps = {a["image_id"]: a for a in cap.get("annotations", [])}
    by_image: dict[Any, list] = {}
    for a in sorted(masks.get("annotations", []), key=lambda a: a.get("id", 0)):
        by_image.setdefault(a.get("image_id"), []).append(a.get("segmentation"))
    for image_id, img in images.items():
        where = f"{opts.caption_gt}[image_id={image_id}]"
        ann = caps.get(image_id)
        if ann is None:
            report.add(RecordError(where, "no caption annotation"))
            continue
        caption, labels, segs = str(ann.get("caption", "")), list(ann.get("labels", [])), by_image.get(image_id, [])
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
        yield where, str(img["file_name"]), caption, spans, [[s] for s in segs]


def build(opts: GcgOptions) -> BuildResult:
    report = ErrorReport(strict=opts.strict)
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    items = _train_items(opts, report) if opts.ann is not None else _eval_items(opts, report)

    def records() -> Iterator[dict]:
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
            except (ValueError, OSError) as e:
                report.add(RecordError(where, str(e)))
                continue
            yield make_record(
                id=f"gcg-{Path(file_name).stem}",
                image=image,
                task="gcg",
                messages=chat(GCG_PROMPT, text),
                targets=targets,
                meta={"source": opts.source, "phrases": phrases, "caption": caption, "file_name": file_name},
            )

    n = write_jsonl(opts.out, records())
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
