"""Describe Anything data (NVlabs/describe-anything, HF ``nvidia/describe-anything-dataset``) → ``region_caption``.

Layout: ``ROOT/`` holds one folder per source (``COCOStuff``, ``LVIS``, ``SAM`` …; ``ROOT`` itself
when it holds the files), each with

* ``annotations.json`` — ``{image_id: [{"caption": str, "mask_rle": {"size": [H, W], "counts": …}, …}]}``
  (a single region dict is accepted in place of the list);
* webdataset tar shards (``*.tar`` or ``images/*.tar``) holding ``{id}.jpg`` (or ``.jpeg``/``.png``/``.webp``)
  and ``{id}.pickle``: the same region list, pickled (read with the restricted unpickler).

The shards are *streamed* (``tarfile`` stream mode, one sample in memory at a time): regions come from
each sample's pickle (``--regions-from pickle``, the default, memory stays flat however large the
source) or from ``annotations.json`` (``--regions-from annotations``, loaded once per source).
Images are written to ``--image-dir/SOURCE/{id}.{ext}`` and each valid region becomes one record::

    user "Describe <region> in detail."   assistant = the caption
    regions = [{"mask": RLE, "box": [x1, y1, x2, y2]}]   targets = []
    meta = {"source": "dam", "subset": SOURCE, "sample_id": id, "region_index": j, "shard": name}

Resume: each finished shard leaves ``OUT.parts/SOURCE/SHARD.jsonl`` and ``….report.json``; a re-run
skips those shards and re-reads their problem reports, then concatenates the parts into ``OUT``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pycocotools import mask as mask_utils

from data_builders.common import BuildResult, add_common_args
from fclm.data.safe_pickle import safe_loads
from fclm.data.schema import chat, make_record, region_entry, relative_image_path
from fclm.data.templates import REGION_CAPTION_PROMPT
from fclm.io import ErrorReport, RecordError, atomic_write, write_json
from fclm.masks import decode_rle

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DamOptions:
    root: Path
    """Folder of source folders (or one source folder)."""
    out: Path
    """Output JSONL file."""
    image_dir: Path | None = None
    """Where images are extracted; default ``OUT_STEM_images`` beside ``OUT``."""
    sources: tuple[str, ...] = ()
    """Only these source folders (default: all)."""
    regions_from: str = "pickle"
    """``pickle`` (streamed, per sample) or ``annotations`` (``annotations.json``)."""
    strict: bool = False

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        self.image_dir = Path(self.image_dir) if self.image_dir else self.out.parent / f"{self.out.stem}_images"
        if self.regions_from not in ("pickle", "annotations"):
            raise ValueError(f"regions_from must be 'pickle' or 'annotations', got {self.regions_from!r}")


def find_sources(root: Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` of each source: sub-folders with ``annotations.json`` or shards, else ``root``."""

    def is_source(d: Path) -> bool:
        return (d / "annotations.json").is_file() or any(d.glob("*.tar")) or any((d / "images").glob("*.tar"))

    subs = sorted(d for d in root.iterdir() if d.is_dir() and d.name != "images" and is_source(d)) if root.is_dir() else []
    if subs:
        return [(d.name, d) for d in subs]
    if root.is_dir() and is_source(root):
        return [(root.name, root)]
    raise RecordError(str(root), "no Describe Anything source folder (annotations.json or *.tar shards) found")


def shards_of(folder: Path) -> list[Path]:
    return sorted(set(folder.glob("*.tar")) | set((folder / "images").glob("*.tar")))


def iter_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` samples of a webdataset tar (members of a key are adjacent)."""
    key: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(shard, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base:
                continue
            dirname = os.path.dirname(member.name)
            k, ext = base.split(".", 1)
            k = f"{dirname}/{k}" if dirname else k
            if k != key:  # the previous sample is complete: hand it on before reading further
                if key is not None:
                    yield key, files
                key, files = k, {}
            f = tf.extractfile(member)
            files[ext.lower()] = f.read() if f is not None else b""
    if key is not None:
        yield key, files


def region_list(obj: Any) -> list:
    """The region dicts of a pickle / annotations entry (a list, ``{"regions": [...]}``, or one region)."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        if "caption" in obj and "mask_rle" in obj:
            return [obj]
        for k in ("regions", "annotations", "objects"):
            if isinstance(obj.get(k), list):
                return obj[k]
    raise ValueError(f"expected a list of region dicts, got {type(obj).__name__}")


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary name and rename (no half-written image survives a kill)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return int(h), int(w)


def _records_of_sample(
    opts: DamOptions, source: str, shard: Path, key: str, files: dict[str, bytes], regions_src: Any, report: ErrorReport
) -> list[dict]:
    where = f"{shard}[{key}]"
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        report.add(RecordError(where, f"no image member ({'/'.join('.' + e for e in IMAGE_EXTS)}) for this key"))
        return []
    if opts.regions_from == "pickle":
        if "pickle" not in files:
            report.add(RecordError(where, f"{key}.{ext} has no {key}.pickle member"))
            return []
        try:
            regions = region_list(safe_loads(files["pickle"]))
        except Exception as e:  # corrupt or unsafe pickle: report it with its cause
            report.add(RecordError(f"{where}.pickle", f"unreadable pickle ({type(e).__name__}: {e})"))
            return []
    else:
        entry = regions_src.get(key)
        if entry is None:
            report.add(RecordError(where, "no entry in annotations.json"))
            return []
        try:
            regions = region_list(entry)
        except ValueError as e:
            report.add(RecordError(f"annotations.json[{key}]", str(e)))
            return []
    try:
        h, w = _image_size(files[ext])
    except Exception as e:  # PIL raises several types for unreadable images
        report.add(RecordError(f"{where}.{ext}", f"image does not open ({type(e).__name__}: {e})"))
        return []
    image_path = opts.image_dir / source / f"{key}.{ext}"
    image = relative_image_path(image_path, opts.out.parent)
    records = []
    for j, r in enumerate(regions):
        rwhere = f"{where}.regions[{j}]"
        try:
            if not isinstance(r, dict):
                raise ValueError(f"a region must be a dict, got {type(r).__name__}")
            caption = r.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError("no caption")
            rle = r.get("mask_rle")
            mask = decode_rle(rle) if isinstance(rle, dict) else None
            if mask is None:
                raise ValueError("no mask_rle")
            if mask.shape != (h, w):
                raise ValueError(f"mask size {list(mask.shape)} differs from the image size {[h, w]}")
            if not mask.any():
                raise ValueError("empty mask")
        except ValueError as e:
            report.add(RecordError(rwhere, str(e)))
            continue
        counts = rle["counts"]
        if isinstance(counts, (str, bytes)):
            clean = {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        else:  # uncompressed: compress once
            enc = mask_utils.encode(mask.astype("uint8", order="F"))
            clean = {"size": [h, w], "counts": enc["counts"].decode("ascii")}
        x, y, bw, bh = mask_utils.toBbox({"size": [h, w], "counts": clean["counts"].encode("ascii")}).tolist()
        records.append(
            make_record(
                id=f"dam-{source}-{key}-{j}",
                image=image,
                task="region_caption",
                messages=chat(REGION_CAPTION_PROMPT, caption.strip()),
                regions=[region_entry(clean, [x, y, x + bw, y + bh])],
                meta={"source": "dam", "subset": source, "sample_id": key, "region_index": j, "shard": shard.name},
            )
        )
    if records:
        _write_bytes(image_path, files[ext])
    return records


def _build_shard(opts: DamOptions, source: str, shard: Path, regions_src: Any, part: Path, part_report: Path) -> tuple[int, ErrorReport]:
    report = ErrorReport(strict=opts.strict)
    n = 0
    with atomic_write(part) as f:
        try:
            for key, files in iter_samples(shard):
                for rec in _records_of_sample(opts, source, shard, key, files, regions_src, report):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n += 1
        except (tarfile.TarError, EOFError, OSError) as e:  # truncated shard: keep what was read, report the rest
            report.add(RecordError(str(shard), f"unreadable shard ({type(e).__name__}: {e}); later samples skipped"))
    write_json(part_report, {"records": n, "problems": [[e.where, e.problem] for e in report.problems]})
    return n, report


def build(opts: DamOptions) -> BuildResult:
    """Stream every shard of every source into ``region_caption`` records (resuming finished shards)."""
    report = ErrorReport(strict=opts.strict)
    parts_dir = opts.out.with_name(opts.out.name + ".parts")
    parts: list[Path] = []
    n_shards = n_resumed = 0
    for source, folder in find_sources(opts.root):
        if opts.sources and source not in opts.sources:
            continue
        regions_src: Any = None
        if opts.regions_from == "annotations":
            ann_path = folder / "annotations.json"
            try:
                with open(ann_path, encoding="utf-8") as f:
                    regions_src = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                report.add(RecordError(str(ann_path), f"cannot read annotations ({type(e).__name__}: {e}); source skipped"))
                continue
            if not isinstance(regions_src, dict):
                report.add(RecordError(str(ann_path), "expected an object {image_id: regions}; source skipped"))
                continue
        for shard in shards_of(folder):
            part = parts_dir / source / f"{shard.stem}.jsonl"
            part_report = parts_dir / source / f"{shard.stem}.report.json"
            n_shards += 1
            if part.is_file() and part_report.is_file():
                n_resumed += 1
                with open(part_report, encoding="utf-8") as f:
                    for where, problem in json.load(f)["problems"]:
                        report.add(RecordError(where, problem))
            else:
                _, shard_report = _build_shard(opts, source, shard, regions_src, part, part_report)
                for e in shard_report.problems:
                    report.add(e)
            parts.append(part)
    n = 0
    with atomic_write(opts.out) as out:
        for part in parts:
            with open(part, encoding="utf-8") as f:
                for line in f:
                    out.write(line)
                    n += 1
    return BuildResult(opts.out, n, report, {"shards": n_shards, "resumed shards": n_resumed})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, type=Path, help="folder of source folders (annotations.json + tar shards)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--image-dir", type=Path, default=None, help="where images are extracted (default OUT_STEM_images/)")
    p.add_argument("--sources", default="", help="comma-separated source folders to read (default: all)")
    p.add_argument("--regions-from", default="pickle", choices=("pickle", "annotations"))
    add_common_args(p, images=False)


def run(args: argparse.Namespace) -> BuildResult:
    return build(
        DamOptions(
            root=args.root,
            out=args.out,
            image_dir=args.image_dir,
            sources=tuple(s for s in args.sources.split(",") if s),
            regions_from=args.regions_from,
            strict=args.strict,
        )
    )
