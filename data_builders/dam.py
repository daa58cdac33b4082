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
skips those shards and re-reads their problem reports, then concatenates the parts into ``OUT``. A
resume is keyed by the inputs and options: ``OUT.parts/fingerprint.json`` holds ``--root``,
``--image-dir``, ``--regions-from`` and ``--max-member-bytes``, and each shard's report the path, size
and modification time of the shard (and of ``annotations.json`` when regions come from it). A rerun
whose inputs or options differ refuses with a message saying what differs; ``--overwrite`` removes the
old parts and starts fresh. (``--sources`` only selects parts and is not part of the key.)

Hostile shards: a member is extracted only as a regular file under ``--image-dir/SOURCE/`` — a name
that is absolute or climbs out (``..``), a symbolic or hard link, a device file or FIFO, and a member
over ``--max-member-bytes`` (default :data:`DEFAULT_MAX_MEMBER_BYTES`) are each reported with the
shard and the member name and skipped. Only image members and the ``.pickle`` are read into memory;
pickles go through :mod:`fclm.data.safe_pickle` (plain data within its limits) and masks through
:mod:`fclm.masks` (sizes and run lengths checked before pycocotools).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from data_builders.common import BuildResult, add_common_args
from fclm.data.safe_pickle import safe_loads
from fclm.data.schema import chat, make_record, region_entry, relative_image_path
from fclm.data.templates import REGION_CAPTION_PROMPT
from fclm.io import ErrorReport, RecordError, atomic_write, encode_json_line, read_json, safe_text, write_json
from fclm.masks import decode_rle, encode_mask, mask_to_box

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEPT_EXTS = IMAGE_EXTS + ("pickle",)
"""Members read into memory; others (``.json``, ``.txt`` …) are passed over unread."""
DEFAULT_MAX_MEMBER_BYTES = 64 << 20
"""Largest tar member read (64 MiB; Describe Anything images are under 10 MB): a larger one is reported."""
FINGERPRINT_VERSION = 1
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


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
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """Largest tar member read; a larger one is reported and skipped."""
    overwrite: bool = False
    """Remove the parts of an earlier run (whatever its inputs) instead of resuming from them."""

    def __post_init__(self) -> None:
        self.root, self.out = Path(self.root), Path(self.out)
        self.image_dir = Path(self.image_dir) if self.image_dir else self.out.parent / f"{self.out.stem}_images"
        if self.regions_from not in ("pickle", "annotations"):
            raise ValueError(f"regions_from must be 'pickle' or 'annotations', got {self.regions_from!r}")
        if self.max_member_bytes <= 0:
            raise ValueError(f"max_member_bytes must be positive, got {self.max_member_bytes}")


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


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(sample key, lower-case extension)`` of a tar member name, or None if it has no extension.

    The key keeps the member's folders (``a/b/x.jpg`` → ``a/b/x``) without ``.`` components; a name
    that is absolute, climbs out (``..``), holds control characters or is not valid UTF-8 raises
    ``ValueError`` (the member would be written outside ``--image-dir/SOURCE``).
    """
    if _CONTROL.search(name):
        raise ValueError("member name holds control characters or is not valid UTF-8; refused")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError("absolute member name refused (it would be written outside the image folder)")
    if any(p == ".." for p in re.split(r"[/\\]", name)):
        raise ValueError("member name climbs out of the image folder ('..'); refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or "." not in parts[-1]:
        return None
    stem, ext = parts[-1].split(".", 1)
    if not stem:
        raise ValueError("member name has an empty sample key; refused")
    return "/".join(parts[:-1] + [stem]), ext.lower()


def iter_samples(
    shard: Path, report: ErrorReport | None = None, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream ``(key, {extension: bytes})`` samples of a webdataset tar (members of a key are adjacent).

    Only regular files with an image or ``pickle`` extension are read. A member that is a link, a
    device file or FIFO, has an unsafe name (:func:`split_member_name`) or is over ``max_member_bytes``
    is reported as ``SHARD[MEMBER]`` (raised when no ``report`` is given) and never read.
    """
    key: str | None = None
    files: dict[str, bytes] = {}

    def refuse(member: tarfile.TarInfo, problem: str) -> None:
        err = RecordError(f"{shard}[{safe_text(member.name)!r}]", problem)
        if report is None:
            raise err
        report.add(err)

    with tarfile.open(shard, mode="r|*") as tf:
        members = iter(tf)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except Exception:  # a corrupt header or data cut short: the sample read so far is whole
                if key is not None:
                    yield key, files
                    key = None
                raise
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                kind = "symbolic" if member.issym() else "hard"
                refuse(member, f"{kind} link to {safe_text(member.linkname)!r} refused (links are never extracted)")
                continue
            if member.ischr() or member.isblk() or member.isfifo():
                refuse(member, "device file or FIFO refused")
                continue
            if not member.isfile():
                refuse(member, f"member of type {member.type!r} refused (only regular files are read)")
                continue
            try:
                parsed = split_member_name(member.name)
            except ValueError as e:
                refuse(member, str(e))
                continue
            if parsed is None or parsed[1] not in KEPT_EXTS:
                continue
            if member.size > max_member_bytes:
                refuse(member, f"member of {member.size} bytes is over the {max_member_bytes}-byte limit (--max-member-bytes); skipped")
                continue
            k, ext = parsed
            if k != key:  # the previous sample is complete: hand it on before reading further
                if key is not None:
                    yield key, files
                key, files = k, {}
            f = tf.extractfile(member)
            files[ext] = f.read(max_member_bytes + 1) if f is not None else b""
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


def _write_bytes(base: Path, path: Path, data: bytes) -> None:
    """Write ``path`` (inside ``base``) via a temporary file and rename (no half-written image survives a kill).

    ``ValueError`` if ``path`` would resolve outside ``base`` (a folder on the way is a link out).
    """
    base_real = os.path.realpath(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    parent_real = os.path.realpath(path.parent)
    if os.path.commonpath([base_real, parent_real]) != base_real:
        raise ValueError(f"{path} would be written outside {base}; refused")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return int(h), int(w)


def _records_of_sample(
    opts: DamOptions, source: str, shard: Path, key: str, files: dict[str, bytes], regions_src: Any, report: ErrorReport
) -> list[bytes]:
    """The JSON lines of one sample's valid regions (its image written); problems go to ``report``."""
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
        except Exception as e:  # corrupt, unsafe or over-limit pickle: report it with its cause
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
    base = opts.image_dir / source
    image_path = base / f"{key}.{ext}"
    image = relative_image_path(image_path, opts.out.parent)
    lines = []
    for j, r in enumerate(regions):
        rwhere = f"{where}.regions[{j}]"
        try:
            if not isinstance(r, dict):
                raise ValueError(f"a region must be a dict, got {type(r).__name__}")
            caption = r.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError("no caption")
            rle = r.get("mask_rle")
            if not isinstance(rle, dict):
                raise ValueError("no mask_rle")
            size = rle.get("size")
            if isinstance(size, (list, tuple)) and list(size) != [h, w]:  # checked before anything is decoded
                raise ValueError(f"mask size {list(size)[:4]} differs from the image size {[h, w]}")
            mask = decode_rle(rle)  # fclm.masks: size limit and run lengths checked before pycocotools
            if not mask.any():
                raise ValueError("empty mask")
            counts = rle["counts"]
            if isinstance(counts, (str, bytes)):  # valid compressed RLE (decode_rle checked its runs): kept as is
                clean = {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
            else:  # uncompressed: compress once
                clean = encode_mask(mask)
            rec = make_record(
                id=f"dam-{source}-{key}-{j}",
                image=image,
                task="region_caption",
                messages=chat(REGION_CAPTION_PROMPT, caption.strip()),
                regions=[region_entry(clean, mask_to_box(mask))],
                meta={"source": "dam", "subset": source, "sample_id": key, "region_index": j, "shard": shard.name},
            )
            lines.append(encode_json_line(rec, allow_nan=False))  # a lone surrogate in a caption is this region's problem only
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            if isinstance(e, RecordError):
                raise  # --strict
            report.add(RecordError(rwhere, str(e)[:300]))
            continue
    if lines:
        try:
            _write_bytes(base, image_path, files[ext])
        except (OSError, ValueError) as e:
            report.add(RecordError(f"{where}.{ext}", f"image not written ({type(e).__name__}: {e}); its regions skipped"))
            return []
    return lines


def _stamp(path: Path) -> dict:
    """What identifies an input file's content for resuming: its resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(opts: DamOptions) -> dict:
    """The options a part's content depends on (``--sources`` only selects parts)."""
    return {
        "version": FINGERPRINT_VERSION,
        "root": str(opts.root.resolve()),
        "image_dir": str(opts.image_dir.resolve()),
        "regions_from": opts.regions_from,
        "max_member_bytes": opts.max_member_bytes,
    }


def _differences(old: Any, new: dict) -> str:
    if not isinstance(old, dict):
        return "unreadable fingerprint"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    return ", ".join(f"{k}: {old.get(k)!r} → now {new.get(k)!r}" for k in keys) or "none"


def _remove_parts(parts_dir: Path) -> None:
    """Remove what an earlier run left in ``parts_dir`` (only this builder's own files)."""
    if not parts_dir.is_dir() or parts_dir.is_symlink():
        return
    for f in sorted(parts_dir.rglob("*"), reverse=True):
        if f.is_file() and (f.name == "fingerprint.json" or f.name.endswith((".jsonl", ".report.json", ".tmp"))):
            f.unlink()
        elif f.is_dir() and not f.is_symlink() and not any(f.iterdir()):
            f.rmdir()


def _prepare_parts(opts: DamOptions, parts_dir: Path) -> None:
    """Check that ``parts_dir`` holds parts of a run with these options (or none); write the fingerprint."""
    fp_path = parts_dir / "fingerprint.json"
    want = _fingerprint(opts)
    if opts.overwrite:
        _remove_parts(parts_dir)
    elif fp_path.is_file():
        try:
            have = json.loads(fp_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError):
            have = None
        if have != want:
            raise RecordError(
                str(parts_dir),
                f"holds the parts of an earlier run with other inputs or options ({_differences(have, want)}); "
                "rerun with --overwrite to start fresh, or choose another --out",
            )
    elif parts_dir.is_dir() and any(parts_dir.rglob("*.jsonl")):
        raise RecordError(
            str(parts_dir),
            "holds parts without a fingerprint of their inputs (an earlier version or another program); "
            "rerun with --overwrite to start fresh, or choose another --out",
        )
    write_json(fp_path, want)


def _build_shard(opts: DamOptions, source: str, shard: Path, regions_src: Any, part: Path, part_report: Path, stamp: dict,
                 seen: dict[str, str]) -> tuple[int, ErrorReport]:
    """Records of one shard into its part file. ``seen`` maps the source's sample keys already built to
    their shard: a key seen before is reported and skipped (its image would overwrite the first one's and
    its record ids would repeat)."""
    report = ErrorReport(strict=opts.strict)
    n = 0
    with atomic_write(part, "wb") as f:
        try:
            for key, files in iter_samples(shard, report, opts.max_member_bytes):
                if key in seen:
                    report.add(RecordError(f"{shard}[{key}]", f"sample key repeats one of {seen[key]}; this sample is skipped"))
                    continue
                seen[key] = shard.name
                for line in _records_of_sample(opts, source, shard, key, files, regions_src, report):
                    f.write(line)
                    n += 1
        except RecordError:
            raise  # --strict
        except Exception as e:  # truncated or corrupt shard (tar, gzip, …): keep what was read, report the rest
            report.add(RecordError(str(shard), f"unreadable shard ({type(e).__name__}: {e}); later samples skipped"))
    write_json(part_report, {"records": n, "input": stamp, "problems": [[e.where, e.problem] for e in report.problems]})
    return n, report


def _part_names(folder: Path, shards: list[Path]) -> list[str]:
    """A part name per shard: its stem, or its path under the source folder when two stems clash."""
    stems = [s.stem for s in shards]
    return [
        s.stem if stems.count(s.stem) == 1 else "__".join(s.relative_to(folder).with_suffix("").parts)
        for s in shards
    ]


def _resumable(part: Path, part_report: Path, stamp: dict) -> list | None:
    """The problems recorded for a finished part, or None if the shard has to be built.

    ``RecordError`` if the part was built from another version of the input (size or time differ).
    """
    if not (part.is_file() and part_report.is_file()):
        return None
    try:
        saved = json.loads(part_report.read_bytes().decode("utf-8"))
        problems = [(str(w), str(p)) for w, p in saved["problems"]]
        saved_stamp = saved.get("input")
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # a damaged report: build the shard again
    if saved_stamp != stamp:
        raise RecordError(
            str(part),
            f"was built from other input files ({_differences(saved_stamp, stamp)}); "
            "rerun with --overwrite to start fresh, or choose another --out",
        )
    return problems


def build(opts: DamOptions) -> BuildResult:
    """Stream every shard of every source into ``region_caption`` records (resuming finished shards)."""
    report = ErrorReport(strict=opts.strict)
    parts_dir = opts.out.with_name(opts.out.name + ".parts")
    sources = [(s, f) for s, f in find_sources(opts.root) if not opts.sources or s in opts.sources]
    _prepare_parts(opts, parts_dir)
    parts: list[Path] = []
    n_shards = n_resumed = 0
    for source, folder in sources:
        regions_src: Any = None
        ann_stamp = None
        if opts.regions_from == "annotations":
            ann_path = folder / "annotations.json"
            try:
                regions_src = read_json(ann_path)
                ann_stamp = _stamp(ann_path)
            except (RecordError, OSError) as e:
                report.add(RecordError(str(ann_path), f"cannot read annotations ({e}); source skipped"))
                continue
            if not isinstance(regions_src, dict):
                report.add(RecordError(str(ann_path), "expected an object {image_id: regions}; source skipped"))
                continue
        shards = shards_of(folder)
        seen: dict[str, str] = {}  # sample keys of this source already built, and their shard
        for shard, name in zip(shards, _part_names(folder, shards)):
            part = parts_dir / source / f"{name}.jsonl"
            part_report = parts_dir / source / f"{name}.report.json"
            n_shards += 1
            stamp = {"shard": _stamp(shard), "annotations": ann_stamp}
            problems = _resumable(part, part_report, stamp)
            if problems is not None:
                n_resumed += 1
                for where, problem in problems:
                    report.add(RecordError(where, problem))
                for line in part.read_bytes().splitlines():  # its keys count as seen for the shards after it
                    if line.strip():
                        seen.setdefault(str(json.loads(line)["meta"]["sample_id"]), shard.name)
            else:
                _, shard_report = _build_shard(opts, source, shard, regions_src, part, part_report, stamp, seen)
                for e in shard_report.problems:
                    report.add(e)
            parts.append(part)
    n = 0
    with atomic_write(opts.out, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
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
    p.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                   help=f"largest tar member read; larger ones are reported and skipped (default {DEFAULT_MAX_MEMBER_BYTES})")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the parts of an earlier run (OUT.parts/) instead of resuming; needed when inputs or options changed")
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
            max_member_bytes=args.max_member_bytes,
            overwrite=args.overwrite,
        )
    )
