"""The refer format (lichengunc/refer) shared by RefCOCO/+/g, gRefCOCO, R-RefCOCO and Ref-ZOM.

A dataset folder ``ROOT/DATASET/`` holds

* ``refs(SPLITBY).p`` — a pickled list of refs (gRefCOCO: ``grefs(SPLITBY).json`` or ``.p``)::

      {"ref_id": 0, "ann_id": 1719310 | [ids], "image_id": 581857, "category_id": 1 | [ids],
       "split": "train", "sentences": [{"sent_id": 0, "sent": "...", "raw": "...", "tokens": [...],
                                        "exist": true /* R-RefCOCO */}, ...],
       "source": "zero" | "one" | "many" /* Ref-ZOM */}

  Pickles are read with :func:`fclm.data.safe_pickle.safe_load_path` (plain data only).
* ``instances.json`` — COCO ``images`` / ``annotations`` (polygons or RLE, ``bbox`` xywh) / ``categories``.

:func:`build_refer` writes one record per sentence; a :class:`Variant` says how a ref's objects
and its no-target sentences are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_builders.common import BuildResult, ImageIndex, add_common_args, to_instance, write_records
from fclm.data.safe_pickle import safe_load_path
from fclm.data.schema import chat, make_record, target_entry, xywh_to_xyxy
from fclm.data.templates import SEG_TOKEN, res_prompt
from fclm.io import ErrorReport, RecordError


@dataclass
class ReferOptions:
    """Options of every refer-format builder."""

    root: Path
    """Folder that holds ``DATASET/refs(SPLITBY).p`` and ``DATASET/instances.json``."""
    dataset: str
    """Dataset folder name (``refcoco``, ``refcoco+``, ``refcocog``, ``grefcoco``, ``rrefcoco``, ``ref-zom`` …)."""
    split_by: str
    """``unc``, ``umd``, ``google`` (RefCOCO family), ``final`` (Ref-ZOM)."""
    out: Path
    """Output JSONL file."""
    image_root: Path | None = None
    """Folder of the COCO images named in ``instances.json``; default ``ROOT/images/mscoco/images/train2014``."""
    splits: tuple[str, ...] = ()
    """Keep refs of these splits only (exact match of the ref's ``split``); empty = all."""
    task: str = "res"
    """Task written into the records."""
    text: str = "sent"
    """Sentence field used as the expression: ``sent`` (normalised) or ``raw``."""
    strict: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        self.image_root = Path(self.image_root) if self.image_root else self.root / "images" / "mscoco" / "images" / "train2014"
        if self.text not in ("sent", "raw"):
            raise ValueError(f"text must be 'sent' or 'raw', got {self.text!r}")


@dataclass
class Variant:
    """How one refer-format dataset states a sentence's objects.

    ``objects(ref, sentence, where)`` returns the annotation ids the sentence refers to (empty for
    no target) or raises :class:`RecordError`; ``meta(ref, sentence)`` adds fields to ``meta``.
    """

    name: str
    refs_files: tuple[str, ...]
    objects: Callable[[dict, dict, str], list[int]]
    meta: Callable[[dict, dict], dict] = field(default=lambda ref, sent: {})
    skip_crowd: bool = False


def as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def load_refs(folder: Path, names: tuple[str, ...], split_by: str) -> tuple[Path, list[dict]]:
    """The refs list of a dataset folder (first existing of ``names`` formatted with ``split_by``)."""
    for pattern in names:
        path = folder / pattern.format(split_by=split_by)
        if path.is_file():
            break
    else:
        tried = ", ".join(str(folder / p.format(split_by=split_by)) for p in names)
        raise RecordError(str(folder), f"no refs file (tried {tried})")
    try:
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                refs = json.load(f)
        else:
            refs = safe_load_path(path)
    except Exception as e:  # the refs file is the whole input: any failure is fatal, with its cause
        raise RecordError(str(path), f"cannot read refs ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise RecordError(str(path), f"expected a list of refs, got {type(refs).__name__}")
    return path, refs


def load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    """``(images by id, annotations by id, category names by id)`` of a COCO instances file."""
    try:
        with open(path, encoding="utf-8") as f:
            inst = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(str(path), f"cannot read instances ({type(e).__name__}: {e})") from None
    if not isinstance(inst, dict) or not all(k in inst for k in ("images", "annotations")):
        raise RecordError(str(path), "expected a COCO instances object with 'images' and 'annotations'")
    images = {img["id"]: img for img in inst["images"]}
    anns = {ann["id"]: ann for ann in inst["annotations"]}
    cats = {c["id"]: c["name"] for c in inst.get("categories", [])}
    return images, anns, cats


def build_refer(opts: ReferOptions, variant: Variant) -> BuildResult:
    """Write one record per sentence of the selected refs; bad refs are reported and skipped."""
    report = ErrorReport(strict=opts.strict)
    folder = opts.root / opts.dataset
    refs_path, refs = load_refs(folder, variant.refs_files, opts.split_by)
    inst_path = folder / "instances.json"
    images, anns, cats = load_instances(inst_path)
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    splits = set(opts.splits)
    instance_cache: dict[int, tuple[dict, list[float]]] = {}
    records: list[dict] = []
    n_refs = n_empty = 0

    def instance_of(ann_id: int, img: dict, where: str) -> tuple[dict, list[float]] | None:
        if ann_id in instance_cache:
            return instance_cache[ann_id]
        ann = anns.get(ann_id)
        if ann is None:
            raise RecordError(where, f"annotation {ann_id} is not in {inst_path}")
        if variant.skip_crowd and ann.get("iscrowd"):
            return None
        akey = f"{inst_path}[annotations id={ann_id}]"
        if ann.get("image_id") != img["id"]:
            raise RecordError(akey, f"belongs to image {ann.get('image_id')}, the ref to image {img['id']}")
        try:
            rle, _, _ = to_instance(ann["segmentation"], img["height"], img["width"])
            box = xywh_to_xyxy(ann["bbox"])
        except (KeyError, ValueError, TypeError) as e:
            raise RecordError(akey, f"bad segmentation/bbox ({type(e).__name__}: {e})") from None
        if box[2] < box[0] or box[3] < box[1]:
            raise RecordError(akey, f"bbox {ann['bbox']} has a negative size")
        instance_cache[ann_id] = (rle, box)
        return instance_cache[ann_id]

    for i, ref in enumerate(refs):
        where = f"{refs_path}[{i}]"
        if not isinstance(ref, dict):
            report.add(RecordError(where, f"a ref must be a dict, got {type(ref).__name__}"))
            continue
        if splits and ref.get("split") not in splits:
            continue
        where = f"{refs_path}[ref_id={ref.get('ref_id', i)}]"
        try:
            img = images.get(ref["image_id"])
            if img is None:
                raise RecordError(where, f"image {ref['image_id']} is not in {inst_path}")
            image = index.field(img["file_name"], where)
            sentences = ref["sentences"]
            if not isinstance(sentences, list) or not sentences:
                raise RecordError(where, "no sentences")
            built = []
            for sent in sentences:
                text = str(sent.get(opts.text) or sent.get("raw") or sent.get("sent") or "").strip()
                if not text:
                    raise RecordError(where, f"sentence {sent.get('sent_id')} has no text")
                ann_ids = variant.objects(ref, sent, where)
                inst = [instance_of(a, img, where) for a in ann_ids]
                inst = [x for x in inst if x is not None]
                if ann_ids and not inst:
                    raise RecordError(where, "every referred annotation is a crowd region")
                target = target_entry([m for m, _ in inst], [b for _, b in inst])
                cat_ids = as_list(ref.get("category_id"))
                meta = {
                    "source": opts.dataset,
                    "split_by": opts.split_by,
                    "split": ref.get("split"),
                    "ref_id": ref.get("ref_id"),
                    "sent_id": sent.get("sent_id"),
                    "image_id": img["id"],
                    "ann_ids": [a for a in ann_ids],
                    "category": [cats.get(c) for c in cat_ids if c in cats] if len(cat_ids) > 1 else cats.get(cat_ids[0]),
                }
                meta.update(variant.meta(ref, sent))
                built.append(
                    make_record(
                        id=f"{opts.dataset}-{opts.split_by}-{ref.get('split')}-{sent.get('sent_id')}",
                        image=image,
                        task=opts.task,
                        messages=chat(res_prompt(text), SEG_TOKEN),
                        targets=[target],
                        meta=meta,
                    )
                )
        except RecordError as e:
            report.add(e)
            continue
        except (KeyError, TypeError, AttributeError) as e:
            report.add(RecordError(where, f"malformed ref ({type(e).__name__}: {e})"))
            continue
        n_refs += 1
        n_empty += sum(1 for r in built if not r["targets"][0]["masks"])
        records += built
    n = write_records(opts.out, records)
    return BuildResult(opts.out, n, report, {"refs": n_refs, "no-target sentences": n_empty})


def add_refer_args(p: Any, *, dataset: str, split_by: str, task: str, tasks: tuple[str, ...]) -> None:
    p.add_argument("--root", required=True, type=Path, help="folder holding DATASET/refs(SPLITBY).p and DATASET/instances.json")
    p.add_argument("--dataset", default=dataset, help=f"dataset folder name (default {dataset})")
    p.add_argument("--split-by", default=split_by, help=f"refs file variant (default {split_by})")
    p.add_argument("--split", default="", help="comma-separated splits to keep (default: all)")
    p.add_argument("--image-root", type=Path, default=None, help="COCO image folder (default ROOT/images/mscoco/images/train2014)")
    p.add_argument("--task", default=task, choices=tasks)
    p.add_argument("--text", default="sent", choices=("sent", "raw"), help="sentence field used as the expression")
    p.add_argument("--out", required=True, type=Path)


def command(variant: Variant, *, dataset: str, split_by: str, task: str, tasks: tuple[str, ...]) -> tuple[Callable, Callable, Callable]:
    """``(build, add_arguments, run)`` of a refer-format builder module."""

    def build(opts: ReferOptions) -> BuildResult:
        return build_refer(opts, variant)

    def add_arguments(p: Any) -> None:
        add_refer_args(p, dataset=dataset, split_by=split_by, task=task, tasks=tasks)
        add_common_args(p)

    def run(args: Any) -> BuildResult:
        return build(options_from_args(args))

    return build, add_arguments, run


def options_from_args(args: Any) -> ReferOptions:
    return ReferOptions(
        root=args.root,
        dataset=args.dataset,
        split_by=args.split_by,
        out=args.out,
        image_root=args.image_root,
        splits=tuple(s for s in args.split.split(",") if s),
        task=args.task,
        text=args.text,
        strict=args.strict,
        check_images=args.check_images,
    )
