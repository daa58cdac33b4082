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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from data_builders.common import (
    ENTRY_ERRORS, BuildResult, ImageIndex, RecordGate, add_common_args, checked_box, image_hw, short_repr, to_instance, valid_id,
    write_records,
)
from fclm.data.safe_pickle import safe_load_path
from fclm.data.schema import chat, make_record, target_entry
from fclm.data.templates import SEG_TOKEN, res_prompt
from fclm.io import ErrorReport, RecordError, read_json


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
    """The refs list of a dataset folder (first existing of ``names`` formatted with ``split_by``).

    Any failure (unreadable, malformed, a pickle refused by :mod:`fclm.data.safe_pickle` or over one
    of its limits) is a one-line :class:`RecordError` naming the file: the refs file is the whole input.
    """
    for pattern in names:
        path = folder / pattern.format(split_by=split_by)
        if path.is_file():
            break
    else:
        tried = ", ".join(str(folder / p.format(split_by=split_by)) for p in names)
        raise RecordError(str(folder), f"no refs file (tried {tried})")
    if path.suffix == ".json":
        refs = read_json(path)
    else:
        try:
            refs = safe_load_path(path)
        except Exception as e:  # the refs file is the whole input: any failure is fatal, with its cause
            raise RecordError(str(path), f"cannot read refs ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise RecordError(str(path), f"expected a list of refs, got {type(refs).__name__}")
    return path, refs


def _index_by_id(entries: Any, path: Path, section: str, report: ErrorReport | None) -> dict[Any, dict]:
    """``{id: entry}`` of a COCO section; an entry that is not an object with a usable ``id`` is reported."""
    if not isinstance(entries, list):
        raise RecordError(str(path), f"'{section}' must be a list, got {type(entries).__name__}")
    out: dict[Any, dict] = {}
    for i, entry in enumerate(entries):
        where = f"{path}[{section}][{i}]"
        problem = None
        if not isinstance(entry, dict):
            problem = f"expected an object, got {type(entry).__name__}"
        elif "id" not in entry:
            problem = "no 'id'"
        elif not valid_id(entry["id"]):
            problem = f"'id' must be an integer or a string, got {short_repr(entry['id'])}"
        elif entry["id"] in out:
            problem = f"id {entry['id']!r} is used twice; the first entry is kept"
        if problem is None:
            out[entry["id"]] = entry
        elif report is not None:
            report.add(RecordError(where, problem + "; entry skipped"))
    return out


def load_instances(path: Path, report: ErrorReport | None = None) -> tuple[dict[int, dict], dict[int, dict], dict[int, str]]:
    """``(images by id, annotations by id, category names by id)`` of a COCO instances file.

    An unusable file is a one-line :class:`RecordError`; an entry that is not an object with an
    ``id`` is reported in ``report`` and left out (the refs that need it are then reported too).
    """
    inst = read_json(path)
    if not isinstance(inst, dict) or not all(k in inst for k in ("images", "annotations")):
        raise RecordError(str(path), "expected a COCO instances object with 'images' and 'annotations'")
    images = _index_by_id(inst["images"], path, "images", report)
    anns = _index_by_id(inst["annotations"], path, "annotations", report)
    cats = {k: c["name"] for k, c in _index_by_id(inst.get("categories", []), path, "categories", report).items() if isinstance(c.get("name"), str)}
    return images, anns, cats


def build_refer(opts: ReferOptions, variant: Variant) -> BuildResult:
    """Write one record per sentence of the selected refs; bad refs are reported and skipped."""
    report = ErrorReport(strict=opts.strict)
    folder = opts.root / opts.dataset
    refs_path, refs = load_refs(folder, variant.refs_files, opts.split_by)
    inst_path = folder / "instances.json"
    images, anns, cats = load_instances(inst_path, report)
    index = ImageIndex(opts.image_root, opts.out.parent, check=opts.check_images)
    splits = set(opts.splits)
    instance_cache: dict[int, tuple[dict, list[float]]] = {}
    records: list[tuple[str, dict]] = []  # (where, record)
    n_refs = n_empty = 0
    gate = RecordGate(report)

    def instance_of(ann_id: Any, img: dict, where: str) -> tuple[dict, list[float]] | None:
        if not valid_id(ann_id):
            raise RecordError(where, f"annotation id {short_repr(ann_id)} is not an integer or a string")
        ann = anns.get(ann_id)
        if ann is None:
            raise RecordError(where, f"annotation {ann_id} is not in {inst_path}")
        if variant.skip_crowd and ann.get("iscrowd"):
            return None
        akey = f"{inst_path}[annotations id={ann_id}]"
        image_id = ann.get("image_id")
        if type(image_id) is not type(img["id"]) or image_id != img["id"]:  # checked on every use: True is not 1
            raise RecordError(akey, f"belongs to image {short_repr(image_id)}, the ref to image {img['id']}")
        if ann_id in instance_cache:
            return instance_cache[ann_id]
        try:
            h, w = image_hw(img.get("height"), img.get("width"))
            rle, _, _ = to_instance(ann["segmentation"], h, w)
            box = checked_box(ann["bbox"], h, w)
        except ENTRY_ERRORS as e:
            raise RecordError(akey, f"bad segmentation/bbox ({type(e).__name__}: {_message(e)})") from None
        instance_cache[ann_id] = (rle, box)
        return instance_cache[ann_id]

    for i, ref in enumerate(refs):
        where = f"{refs_path}[{i}]"
        if not isinstance(ref, dict):
            report.add(RecordError(where, f"a ref must be a dict, got {type(ref).__name__}"))
            continue
        split = ref.get("split")
        if splits and not (isinstance(split, str) and split in splits):
            continue
        rid = ref.get("ref_id", i)
        where = f"{refs_path}[ref_id={rid}]" if valid_id(rid) else f"{refs_path}[{i}]"
        try:
            if not valid_id(ref["image_id"]):
                raise RecordError(where, f"image_id {short_repr(ref['image_id'])} is not an integer or a string")
            img = images.get(ref["image_id"])
            if img is None or type(img["id"]) is not type(ref["image_id"]):
                raise RecordError(where, f"image {ref['image_id']} is not in {inst_path}")
            image = index.field(img["file_name"], where)
            try:
                hw = image_hw(img.get("height"), img.get("width"))
            except ENTRY_ERRORS:
                hw = None  # a bad size is reported with the annotation that needs it (instance_of)
            if hw is not None:
                index.check_hw(image, *hw, where)
            sentences = ref["sentences"]
            if not isinstance(sentences, list) or not sentences:
                raise RecordError(where, "no sentences")
            built = []
            for sent in sentences:
                if not isinstance(sent, dict):
                    raise RecordError(where, f"a sentence must be an object, got {type(sent).__name__}")
                if not valid_id(sent.get("sent_id")):
                    raise RecordError(where, f"sentence without an integer or string 'sent_id' ({short_repr(sent.get('sent_id'))})")
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
                    (f"{where}[sent_id={sent.get('sent_id')}]", make_record(
                        id=f"{opts.dataset}-{opts.split_by}-{ref.get('split')}-{sent.get('sent_id')}",
                        image=image,
                        task=opts.task,
                        messages=chat(res_prompt(text), SEG_TOKEN),
                        targets=[target],
                        meta=meta,
                    )),
                )
        except RecordError as e:
            report.add(e)
            continue
        except ENTRY_ERRORS as e:
            report.add(RecordError(where, f"malformed ref ({type(e).__name__}: {_message(e)})"))
            continue
        built = [(w, r) for w, r in built if gate(w, r)]
        if not built:
            continue
        n_refs += 1
        n_empty += sum(1 for _, r in built if not r["targets"][0]["masks"])
        records += built
    n = write_records(opts.out, records, report, located=True)
    return BuildResult(opts.out, n, report, {"refs": n_refs, "no-target sentences": n_empty})


def _message(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= 200 else text[:197] + "..."


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
