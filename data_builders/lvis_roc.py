"""Region-level object classification (ROC) on LVIS / PACO → ``roc`` records, one per region.

``fclm-data lvis-roc --ann lvis_val_1k_category.json --image-root coco --out lvis_roc.jsonl``

Two inputs are understood:

* Osprey's evaluation files (CircleRadon/Osprey, ``lvis_val_1k_category.json``,
  ``paco_val_1k_category.json``): a list of ``{"file_name", "height", "width", "categories": [name],
  "annotations": [{"segmentation": polygons | RLE, …}]}``, names and annotations paired by position;
* a COCO-style instances file (LVIS v1: ``images`` with ``coco_url`` or ``file_name``,
  ``annotations``, ``categories``); an image given only by ``coco_url`` is found at
  ``IMAGE_ROOT/<train2017|val2017>/<name>``.

Each region: user ``What is the category of <region>? Answer with its name.``, assistant the
category exactly as the dataset spells it (``car_(automobile)``, ``car_(automobile):wheel``), also
in ``meta.category``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from data_builders.common import (
    ENTRY_ERRORS, BuildResult, ImageIndex, RecordGate, add_common_args, image_hw, load_json, short_repr, to_instance, valid_id,
)
from fclm.data.schema import chat, make_record, region_entry
from fclm.data.templates import ROC_PROMPT
from fclm.io import ErrorReport, RecordError, write_jsonl


@dataclass
class LvisRocOptions:
    ann: Path
    image_root: Path
    out: Path
    source: str = ""
    """``meta.source``; default from the file name (``lvis`` / ``paco``)."""
    max_images: int | None = None
    strict: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        self.ann, self.image_root, self.out = Path(self.ann), Path(self.image_root), Path(self.out)
        if not self.source:
            self.source = "paco" if "paco" in self.ann.name.lower() else "lvis"


def _image_rel(img: dict) -> str:
    if img.get("file_name"):
        return str(img["file_name"])
    url = str(img.get("coco_url", ""))
    if not url:
        raise KeyError("file_name or coco_url")
    parts = url.rstrip("/").split("/")
    return "/".join(parts[-2:])


def build(opts: LvisRocOptions) -> BuildResult:
    report = ErrorReport(strict=opts.strict)
    data = load_json(opts.ann)
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    items: list[tuple[str, str, dict, list]] = []  # (where, id prefix, image entry, [(category, segmentation, key)])
    if isinstance(data, list):  # Osprey evaluation layout: names and annotations paired by position
        for i, item in enumerate(data):
            where = f"{opts.ann}[{i}]"
            if not (isinstance(item, dict) and isinstance(item.get("categories"), list) and isinstance(item.get("annotations"), list)):
                report.add(RecordError(where, "expected {file_name, height, width, categories, annotations}"))
                continue
            names, anns = item["categories"], item["annotations"]
            if len(names) != len(anns):
                report.add(RecordError(where, f"{len(names)} categories but {len(anns)} annotations"))
                continue
            regions = [(c, a.get("segmentation") if isinstance(a, dict) else None, j) for j, (c, a) in enumerate(zip(names, anns))]
            items.append((where, f"{opts.source}-roc-{i}", item, regions))
    elif isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO / LVIS layout
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key, []), list):
                raise RecordError(str(opts.ann), f"'{key}' must be a list, got {type(data[key]).__name__}")
        cats: dict[Any, Any] = {}
        for k, c in enumerate(data.get("categories", [])):
            if isinstance(c, dict) and valid_id(c.get("id")) and isinstance(c.get("name"), str):
                cats[c["id"]] = c["name"]
            else:
                report.add(RecordError(f"{opts.ann}[categories][{k}]", "expected {id, name}; category skipped"))
        by_image: dict[Any, list] = {}
        for k, ann in enumerate(data["annotations"]):
            if not (isinstance(ann, dict) and valid_id(ann.get("image_id"))):
                report.add(RecordError(f"{opts.ann}[annotations][{k}]", "expected an object with an 'image_id'; annotation skipped"))
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)
        for k, img in enumerate(data["images"]):
            if not (isinstance(img, dict) and valid_id(img.get("id"))):
                report.add(RecordError(f"{opts.ann}[images][{k}]", "expected an object with an 'id'; image skipped"))
                continue
            anns = by_image.get(img["id"], [])
            if anns:
                regions = [(cats.get(a.get("category_id"), "") if valid_id(a.get("category_id")) else "", a.get("segmentation"), a.get("id")) for a in anns]
                items.append((f"{opts.ann}[images id={img['id']}]", f"{opts.source}-roc-{img['id']}", img, regions))
    else:
        raise RecordError(str(opts.ann), "expected Osprey's list layout or a COCO/LVIS instances object")
    if opts.max_images is not None:
        items = items[: opts.max_images]

    def records() -> Iterator[tuple[str, dict]]:
        for where, prefix, img, regions in items:
            try:
                rel = _image_rel(img)
                image = index.field(rel, where)
                h, w = image_hw(img.get("height"), img.get("width"))
                index.check_hw(image, h, w, where)
            except RecordError as e:
                report.add(e)
                continue
            except ENTRY_ERRORS as e:
                report.add(RecordError(where, f"malformed image entry ({type(e).__name__}: {str(e)[:200]})"))
                continue
            for j, (category, segm, ann_id) in enumerate(regions):
                rwhere = f"{where}.annotations[{j}]"
                if not isinstance(category, str) or not category:
                    report.add(RecordError(rwhere, "no category name"))
                    continue
                if ann_id is not None and not valid_id(ann_id):
                    report.add(RecordError(rwhere, f"annotation 'id' must be an integer or a string, got {short_repr(ann_id)}"))
                    continue
                try:
                    rle, box, _ = to_instance(segm, h, w)
                except ENTRY_ERRORS as e:
                    report.add(RecordError(rwhere, f"bad segmentation ({str(e)[:200]})"))
                    continue
                yield rwhere, make_record(
                    id=f"{prefix}-{ann_id}",
                    image=image,
                    task="roc",
                    messages=chat(ROC_PROMPT, str(category)),
                    regions=[region_entry(rle, box)],
                    meta={"source": opts.source, "category": str(category), "image": rel, "ann": ann_id},
                )

    gate = RecordGate(report)
    n = write_jsonl(opts.out, (x for x in records() if gate(*x)), report=report, allow_nan=False, located=True)
    return BuildResult(opts.out, n, report, {"images": len(items)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ann", required=True, type=Path, help="Osprey lvis/paco *_category.json or an LVIS instances json")
    p.add_argument("--image-root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--source", default="", help="meta.source (default: lvis or paco from the file name)")
    p.add_argument("--max-images", type=int, default=None)
    add_common_args(p)


def run(args: argparse.Namespace) -> BuildResult:
    return build(
        LvisRocOptions(
            ann=args.ann, image_root=args.image_root, out=args.out, source=args.source,
            max_images=args.max_images, strict=args.strict, check_images=args.check_images,
        )
    )
