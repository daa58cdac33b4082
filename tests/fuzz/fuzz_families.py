"""The fuzzed programs: one *family* per builder and per ``fclm-eval score`` task.

A family writes a small, valid fixture in its source format once (``build``: the fixture writers of
``tests/data_builders/builder_fixtures.py`` and ``tests/metrics/metrics_testkit.py``), then makes
case ``i`` (``case``): a copy of that fixture with one seeded mutation, the command line to run,
and what the run must still produce — the ids of the records the mutation did not touch
(``expected``), computed by comparing the mutated input with the original, unit by unit.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
for _p in (HERE.parent / "data_builders", HERE.parent / "metrics"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
from builder_fixtures import poly_rect, refer_fixture, rle_of, uncompressed_rle, write_image  # noqa: E402
from fuzz_mutators import (  # noqa: E402
    Member, declared_size_tar, deep_pickle, json_bytes, jsonl_breaks, member_spans, mutate_bytes, mutate_jsonl, odd_opcode_pickle,
    mutate_tree, pickle_bytes, unsafe_pickle, untouched_lines, write_tar,
)
from metrics_testkit import gt, pred, rect, seg  # noqa: E402
from PIL import Image  # noqa: E402

from fclm.data.schema import chat, make_record, region_entry, target_entry  # noqa: E402
from fclm.data.templates import REGION_CAPTION_PROMPT  # noqa: E402


@dataclass
class Case:
    """One fuzz case: a mutated copy of a family's fixture and the command that reads it."""

    family: str
    index: int
    dir: Path
    program: str  # "data" (python -m data_builders) or "eval" (python -m eval)
    argv: list[str]
    description: str
    inputs: list[Path]  # files/folders an error message may name
    out: Path  # output file (data) or folder (eval)
    line_files: list[Path] = field(default_factory=list)  # JSON Lines inputs (errors name file:line)
    needs_line: bool = False  # the mutation broke a line of a JSON Lines input
    expected: Optional[set[str]] = None  # ids that must be written on exit 0 (None: not computable)
    allow_duplicate_ids: bool = False  # the mutation duplicated an input unit
    kind: str = "build"  # build | validate | score
    info: dict = field(default_factory=dict)

    def command(self) -> str:
        module = "data_builders" if self.program == "data" else "eval"
        return "python -m " + module + " " + " ".join(_shq(a) for a in self.argv)


def _shq(a: str) -> str:
    import shlex

    return shlex.quote(a)


def same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types (``1 == 1.0 == True`` but a builder may treat them apart); NaN ≠ NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b
    return a == b


def count_same(items: list, x: Any) -> int:
    return sum(1 for y in items if same(x, y))


def load_json_bytes(data: bytes) -> Any:
    """What ``json.load`` (as the builders call it) reads from ``data``; None when it fails."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


class _OracleUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in {("__builtin__", "set"), ("builtins", "set"), ("__builtin__", "frozenset"), ("builtins", "frozenset"),
                              ("_codecs", "encode"), ("collections", "OrderedDict"), ("__builtin__", "complex"), ("builtins", "complex")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_pickle_bytes(data: bytes) -> Any:
    try:
        return _OracleUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception:
        return None


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(h: int, w: int) -> bytes:
    """A PNG that declares ``w``×``h`` pixels but is tiny (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def box_mask(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ==================================================================================================
# Families
# ==================================================================================================


class Family:
    name = ""
    program = "data"

    def build(self, base: Path) -> None:  # write the valid fixture under base
        raise NotImplementedError

    def case(self, rng: random.Random, d: Path, index: int) -> Case:  # d: a copy of base
        raise NotImplementedError

    def baseline(self, d: Path) -> Case:  # the unmutated fixture: everything must be written
        raise NotImplementedError


def _mutate_doc(rng: random.Random, tree: Any, *, pickle_ok: bool = False, byte_share: float = 0.2) -> tuple[bytes, str]:
    """Serialised mutated document: a tree mutation, a byte mutation of the serialised original, or a whole-file oddity."""
    r = rng.random()
    if r < 0.08:
        if pickle_ok:
            return odd_opcode_pickle(rng)
        text = json_bytes(tree)
        op = rng.randrange(8)
        if op == 0:
            return text.decode("utf-8").encode("utf-16"), "file re-encoded as UTF-16"
        if op == 1:
            return b"\xef\xbb\xbf" + text, "UTF-8 byte order mark"
        if op == 2:
            return text + rng.choice([b"\x00", b" trailing", b"\n{}", b"]"]), "trailing data after the document"
        if op == 3:
            v = rng.choice([b"", b"   \n", b"null", b"NaN", b"0", b'"s"', b"[]", b"{}", b"[null]", b"[[]]"])
            return v, f"the whole file is {v!r}"
        if op == 4:
            return b"[" * 100_000 + b"]" * 100_000, "the whole file is 100000 nested lists"
        if op == 5:
            return text.replace(b", ", b",\n" + b" " * 10_000), "100 kB of whitespace between values"
        if op == 6:
            return text.decode("utf-8").encode("latin-1", "replace").replace(b"e", b"\xe9", 3), "latin-1 bytes in the text"
        return text[: len(text) // 2], "cut in the middle"
    if r < 0.08 + byte_share:
        data = pickle_bytes(tree) if pickle_ok else json_bytes(tree)
        data, d, _ = mutate_bytes(data, rng)
        return data, "bytes: " + d
    new, descs, _ = mutate_tree(tree, rng, pickle_ok=pickle_ok)
    if pickle_ok:
        proto = rng.choice([2, 2, 2, 0, 1, 4, 5])
        return pickle_bytes(new, protocol=proto), "; ".join(descs) + (f" (pickle protocol {proto})" if proto != 2 else "")
    return json_bytes(new), "; ".join(descs)


def _fs_oddity(rng: random.Random, path: Path) -> str:
    """Replace an input file by something that is not a readable file."""
    import os

    op = rng.randrange(4)
    path.unlink()
    if op == 0:
        return f"{path.name} removed"
    if op == 1:
        path.mkdir()
        return f"{path.name} is a directory"
    if op == 2:
        os.symlink(path.name, path)
        return f"{path.name} is a symlink to itself"
    os.symlink("/dev/null", path)
    return f"{path.name} is a symlink to /dev/null"


# --------------------------------------------------------------------------------------------------
# refer format: refcoco (+/g), grefcoco, rrefcoco, ref-zom
# --------------------------------------------------------------------------------------------------

_EXTRA_ANNS = [
    {"id": 202, "image_id": 2, "category_id": 2, "iscrowd": 0, "bbox": [2, 30, 20, 15], "segmentation": rle_of(box_mask(50, 30, 30, 45, 2, 22))},
    {"id": 103, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 30, 10, 5], "segmentation": [poly_rect(0, 30, 10, 5)]},
]


def _sent(i: int, text: str, **kw) -> dict:
    return {"sent_id": i, "sent": text, "raw": text.capitalize() + ".", "tokens": text.split(), **kw}


class ReferFamily(Family):
    """A refer-format dataset folder: ``refs(…).p`` (or gRefCOCO's ``.json``) + ``instances.json`` + images."""

    def __init__(self, name: str, command: str, dataset: str, split_by: str, refs_name: str, as_json: bool, refs: list, objects: Callable[[dict, dict], list], tasks: tuple[str, ...]):
        self.name, self.command, self.dataset, self.split_by = name, command, dataset, split_by
        self.refs_name, self.as_json, self.refs0, self.objects, self.tasks = refs_name, as_json, refs, objects, tasks

    def build(self, base: Path) -> None:
        refer_fixture(base / "refer", dataset=self.dataset, refs_name=self.refs_name, refs=copy.deepcopy(self.refs0), extra_anns=copy.deepcopy(_EXTRA_ANNS), as_json=self.as_json)
        self.inst = json.loads((base / "refer" / self.dataset / "instances.json").read_text())
        self.refs = copy.deepcopy(self.refs0)

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        root = d / "refer"
        folder = root / self.dataset
        refs_path, inst_path = folder / self.refs_name, folder / "instances.json"
        out = d / "out" / "o.jsonl"
        descs = []
        r = rng.random()
        mutate_refs, mutate_inst = r < 0.55 or r >= 0.9, r >= 0.55
        if mutate_refs:
            q = rng.random()
            if not self.as_json and q < 0.08:
                data, dd = unsafe_pickle(rng, str(d / "escape" / "pwned"), self.refs)
            elif not self.as_json and q < 0.12:
                depth = rng.choice([1000, 100_000, 1_000_000])
                data, dd = deep_pickle(depth), f"a pickle of {depth} nested lists"
            else:
                data, dd = _mutate_doc(rng, self.refs, pickle_ok=not self.as_json)
            refs_path.write_bytes(data)
            descs.append(f"{refs_path.name}: {dd}")
        if mutate_inst:
            data, dd = _mutate_doc(rng, self.inst)
            inst_path.write_bytes(data)
            descs.append(f"instances.json: {dd}")
        if rng.random() < 0.03:
            descs.append(_fs_oddity(rng, rng.choice([refs_path, inst_path])))
        extra: list[str] = []
        splits: Optional[set] = None
        if rng.random() < 0.15:
            extra += ["--text", "raw"]
        if rng.random() < 0.15:
            extra += ["--task", rng.choice(self.tasks)]
        if rng.random() < 0.1:
            extra += ["--no-check-images"]
        if rng.random() < 0.15:
            splits = {"val", "train"}
            extra += ["--split", "val,train"]
        if rng.random() < 0.05:
            extra += ["--strict"]
        argv = [self.command, "--root", str(root), "--dataset", self.dataset, "--split-by", self.split_by, "--out", str(out), *extra]
        # what must still be written: refs unchanged, with their image and annotations unchanged
        refs_bytes = refs_path.read_bytes() if refs_path.is_file() else b"\x00"
        inst_bytes = inst_path.read_bytes() if inst_path.is_file() else b"\x00"
        if "hand-written pickle" in " ".join(descs) or "pickle calling" in " ".join(descs):
            refs_bytes = b"\x00"  # not loaded here: it may hash or allocate without bound; nothing of it is expected
        refs_eff = load_json_bytes(refs_bytes) if self.as_json else load_pickle_bytes(refs_bytes)
        inst_eff = load_json_bytes(inst_bytes)
        expected: set[str] = set()
        dup = False
        try:
            expected, dup = self._expected(refs_eff, inst_eff, splits)
        except RecursionError:
            expected = set()
        return Case(self.name, index, d, "data", argv, " | ".join(descs), [refs_path, inst_path, folder, root], out,
                    expected=expected)

    def baseline(self, d: Path) -> Case:
        root, out = d / "refer", d / "out" / "o.jsonl"
        folder = root / self.dataset
        return Case(self.name, -1, d, "data", [self.command, "--root", str(root), "--dataset", self.dataset, "--split-by", self.split_by, "--out", str(out)], "unmutated",
                    [folder / self.refs_name, folder / "instances.json", folder, root], out, expected=self._expected(self.refs, self.inst, None)[0])

    def _expected(self, refs_eff: Any, inst_eff: Any, splits: Optional[set]) -> tuple[set[str], bool]:
        expected: set[str] = set()
        dup = False
        if isinstance(refs_eff, list) and isinstance(inst_eff, dict):
            images = _by_id(inst_eff.get("images"))
            anns = _by_id(inst_eff.get("annotations"))
            for ref in self.refs:
                n = count_same(refs_eff, ref)
                dup |= n > 1
                if n != 1 or (splits and ref["split"] not in splits):
                    continue
                img0 = next(i for i in self.inst["images"] if i["id"] == ref["image_id"])
                if not same(images.get(ref["image_id"]), img0):
                    continue
                ann_ok = all(same(anns.get(a), next(x for x in self.inst["annotations"] if x["id"] == a)) for a in self.objects(ref, {}))
                if ann_ok:
                    expected |= {f"{self.dataset}-{self.split_by}-{ref['split']}-{s['sent_id']}" for s in ref["sentences"]}
        return expected, dup


def _by_id(entries: Any) -> dict:
    """``{entry["id"]: entry}`` as a builder indexes a COCO list (later entries win; malformed ones left out)."""
    out: dict = {}
    if isinstance(entries, list):
        for e in entries:
            if isinstance(e, dict) and "id" in e:
                try:
                    out[e["id"]] = e
                except TypeError:
                    pass
    return out


REFCOCO_REFS = [
    {"ref_id": 0, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "train", "file_name": "a.jpg", "sentences": [_sent(0, "left man"), _sent(1, "man on the left")]},
    {"ref_id": 1, "ann_id": 102, "image_id": 1, "category_id": 2, "split": "val", "file_name": "b.jpg", "sentences": [_sent(2, "red car")]},
    {"ref_id": 2, "ann_id": 201, "image_id": 2, "category_id": 1, "split": "testA", "file_name": "c.jpg", "sentences": [_sent(3, "person")]},
    {"ref_id": 3, "ann_id": 202, "image_id": 2, "category_id": 2, "split": "testB", "file_name": "d.jpg", "sentences": [_sent(4, "bottom car"), _sent(5, "the lower vehicle")]},
    {"ref_id": 4, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "val", "file_name": "e.jpg", "sentences": [_sent(6, "the man")]},
    {"ref_id": 5, "ann_id": 102, "image_id": 1, "category_id": 2, "split": "train", "file_name": "f.jpg", "sentences": [_sent(7, "car")]},
]

GREFCOCO_REFS = [
    {"ref_id": 0, "ann_id": [101, 102, 103], "image_id": 1, "category_id": [1, 2], "split": "train", "sentences": [_sent(0, "everything")]},
    {"ref_id": 1, "ann_id": [-1], "image_id": 1, "category_id": [-1], "split": "val", "sentences": [_sent(1, "the dog"), _sent(2, "a cat")]},
    {"ref_id": 2, "ann_id": 201, "image_id": 2, "category_id": 1, "split": "val", "sentences": [_sent(3, "person")]},
    {"ref_id": 3, "ann_id": [201, 202], "image_id": 2, "category_id": [1, 2], "split": "testA", "sentences": [_sent(4, "both things")]},
    {"ref_id": 4, "ann_id": [102], "image_id": 1, "category_id": [2], "split": "testB", "sentences": [_sent(5, "the car")]},
]

RREFCOCO_REFS = [
    {"ref_id": 5, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "val",
     "sentences": [_sent(0, "left man", exist=True), _sent(1, "the purple giraffe", exist=False), _sent(2, "man")]},
    {"ref_id": 6, "ann_id": 201, "image_id": 2, "category_id": 1, "split": "val", "sentences": [_sent(3, "person", exist=True), _sent(4, "a boat", exist=False)]},
    {"ref_id": 7, "ann_id": 202, "image_id": 2, "category_id": 2, "split": "train", "sentences": [_sent(5, "car", exist=True)]},
    {"ref_id": 8, "ann_id": 102, "image_id": 1, "category_id": 2, "split": "testA", "sentences": [_sent(6, "red car"), _sent(7, "a horse", exist=False)]},
]

REFZOM_REFS = [
    {"ref_id": 0, "ann_id": [101, 102], "image_id": 1, "category_id": 1, "split": "test", "source": "many", "sentences": [_sent(0, "two things")]},
    {"ref_id": 1, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "test", "source": "one", "sentences": [_sent(1, "a man")]},
    {"ref_id": 2, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "test", "source": "zero", "sentences": [_sent(2, "a unicorn")]},
    {"ref_id": 3, "ann_id": [201, 202], "image_id": 2, "category_id": 1, "split": "train", "source": "many", "sentences": [_sent(3, "all of them"), _sent(4, "both")]},
    {"ref_id": 4, "ann_id": [202], "image_id": 2, "category_id": 2, "split": "train", "source": "one", "sentences": [_sent(5, "the car")]},
]


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _gref_objects(ref, sent):
    ids = _as_list(ref["ann_id"])
    return [] if ids == [-1] else ids


def _zom_objects(ref, sent):
    return [] if ref.get("source") == "zero" else [a for a in _as_list(ref["ann_id"]) if a != -1]


# --------------------------------------------------------------------------------------------------
# Describe Anything shards (dam)
# --------------------------------------------------------------------------------------------------


class DamFamily(Family):
    name = "dam"

    H, W = 20, 30

    def build(self, base: Path) -> None:
        root = base / "dam"
        H, W = self.H, self.W
        m = [box_mask(H, W, 2, 10, 3, 12), box_mask(H, W, 5, 18, 15, 29), box_mask(H, W, 0, 20, 0, 5), box_mask(H, W, 12, 19, 1, 9)]
        regs = {
            "s1": [{"caption": "A red box. It is shiny.", "mask_rle": rle_of(m[0])}, {"caption": "A blue box.", "mask_rle": uncompressed_rle(m[1])}],
            "s2": [{"caption": "A tall bar on the left.", "mask_rle": rle_of(m[2])}],
            "s3": {"regions": [{"caption": "A small square.", "mask_rle": rle_of(m[3])}]},
            "s4": [{"caption": "Two things.", "mask_rle": rle_of(m[0] | m[1])}],
            "s5": {"caption": "A single region dict.", "mask_rle": rle_of(m[1])},
            "t1": [{"caption": "A cat.", "mask_rle": rle_of(m[2])}, {"caption": "A dog.", "mask_rle": rle_of(m[3])}],
            "sub/t2": [{"caption": "In a folder.", "mask_rle": rle_of(m[0])}],
        }
        layout = {
            ("SrcA", "images/shard-000000.tar"): [("s1", "jpg"), ("s2", "png"), ("s3", "jpg")],
            ("SrcA", "images/shard-000001.tar"): [("s4", "jpg"), ("s5", "webp")],
            ("SrcB", "shard-000000.tar"): [("t1", "jpeg"), ("sub/t2", "jpg")],
        }
        self.regs, self.layout, self.shards = regs, layout, {}
        for (src, rel), samples in layout.items():
            members = []
            for n, (key, ext) in enumerate(samples):
                members.append(Member(f"{key}.{ext}", png_bytes(H, W, seed=n)))
                members.append(Member(f"{key}.pickle", pickle.dumps(regs[key], protocol=2)))
            self.shards[(src, rel)] = members
            path = root / src / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(write_tar(members))
        self.ann = {}
        for src in ("SrcA", "SrcB"):
            ann = {k: regs[k] for (s, _), samples in layout.items() if s == src for k, _ in samples}
            self.ann[src] = ann
            (root / src / "annotations.json").write_text(json.dumps(ann))

    def _n_regions(self, key: str) -> int:
        r = self.regs[key]
        return len(r["regions"]) if isinstance(r, dict) and "regions" in r else (1 if isinstance(r, dict) else len(r))

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        root = d / "dam"
        out = d / "out" / "o.jsonl"
        (d / "escape").mkdir(exist_ok=True)
        mode = "annotations" if rng.random() < 0.3 else "pickle"
        touched: set[tuple[str, str]] = set()  # (source, key)
        dup = False
        r = rng.random()
        if r < 0.6:
            (src, rel) = rng.choice(sorted(self.shards))
            members = copy.deepcopy(self.shards[(src, rel)])
            keys = [k for k, _ in self.layout[(src, rel)]]
            desc, t, dup, data = self._member_op(rng, d, src, members, keys, mode)
            touched |= {(src, k) for k in t}
            (root / src / rel).write_bytes(data)
            desc = f"{src}/{rel}: {desc}"
        elif r < 0.8:
            (src, rel) = rng.choice(sorted(self.shards))
            data0 = (root / src / rel).read_bytes()
            data, dd, at = mutate_bytes(data0, rng)
            spans = member_spans(data0)
            for name, start, end in spans:
                if end > at:
                    touched.add((src, name.rsplit(".", 1)[0]))
            (root / src / rel).write_bytes(data)
            desc = f"{src}/{rel}: bytes: {dd}"
        else:
            src = rng.choice(["SrcA", "SrcB"])
            data, dd = _mutate_doc(rng, self.ann[src], byte_share=0.3)
            (root / src / "annotations.json").write_bytes(data)
            desc = f"{src}/annotations.json: {dd}"
            if mode == "annotations":
                eff = load_json_bytes(data)
                for k in self.ann[src]:
                    if not (isinstance(eff, dict) and same(eff.get(k), self.ann[src][k])):
                        touched.add((src, k))
        argv = ["dam", "--root", str(root), "--out", str(out), "--regions-from", mode]
        if rng.random() < 0.1:
            argv += ["--strict"]
        expected = set()
        for (src, rel), samples in self.layout.items():
            for key, _ in samples:
                if (src, key) not in touched:
                    expected |= {f"dam-{src}-{key}-{j}" for j in range(self._n_regions(key))}
        shard_paths = [root / s / rel for s, rel in self.shards]
        return Case(self.name, index, d, "data", argv, f"--regions-from {mode}; {desc}",
                    [root, *shard_paths, root / "SrcA" / "annotations.json", root / "SrcB" / "annotations.json"], out,
                    expected=expected, info={"escape": str(d / "escape")})

    def baseline(self, d: Path) -> Case:
        root, out = d / "dam", d / "out" / "o.jsonl"
        (d / "escape").mkdir(exist_ok=True)
        expected = {f"dam-{src}-{key}-{j}" for (src, _), samples in self.layout.items() for key, _ in samples for j in range(self._n_regions(key))}
        return Case(self.name, -1, d, "data", ["dam", "--root", str(root), "--out", str(out)], "unmutated", [root], out, expected=expected)

    def _member_op(self, rng, d: Path, src: str, members: list[Member], keys: list[str], mode: str):
        """Mutate the members of one shard; return (description, touched keys, duplicated?, tar bytes)."""
        H, W = self.H, self.W
        k = rng.randrange(len(keys))
        key = keys[k]
        img_i, pkl_i = 2 * k, 2 * k + 1
        op = rng.randrange(12)
        pickle_touch = {key} if mode == "pickle" else set()
        good_pkl = pickle.dumps([{"caption": "An escaped region.", "mask_rle": rle_of(box_mask(H, W, 1, 5, 1, 5))}], protocol=2)
        if op == 0:  # the regions pickle, mutated as data
            new, descs, _ = mutate_tree(self.regs[key], rng, pickle_ok=True)
            members[pkl_i].data = pickle_bytes(new)
            return f"{key}.pickle: " + "; ".join(descs), pickle_touch, "duplicated" in " ".join(descs), write_tar(members)
        if op == 1:  # the pickle's bytes, or a pickle that runs code / bombs memory / nests deeply
            q = rng.random()
            if q < 0.3:
                members[pkl_i].data, dd = unsafe_pickle(rng, str(d / "escape" / "pwned"), self.regs[key])
            elif q < 0.45:
                members[pkl_i].data, dd = odd_opcode_pickle(rng)
            elif q < 0.6:
                depth = rng.choice([1000, 100_000])
                members[pkl_i].data, dd = deep_pickle(depth), f"{depth} nested lists"
            else:
                members[pkl_i].data, dd, _ = mutate_bytes(members[pkl_i].data, rng)
            return f"{key}.pickle: {dd}", pickle_touch, False, write_tar(members)
        if op == 2:  # the image
            q = rng.randrange(6)
            img = members[img_i]
            if q == 0:
                img.data, dd = img.data[: rng.randrange(len(img.data))], "truncated image"
            elif q == 1:
                img.data, dd = b"", "empty image"
            elif q == 2:
                img.data, dd = png_bytes(H + 3, W, 9), f"image of another size {H + 3}x{W}"
            elif q == 3:
                hh, ww = rng.choice([(100_000, 100_000), (30_000, 30_000), (1, 2**31 - 1), (H, W)])
                img.data, dd = huge_png_header(hh, ww), f"PNG header declaring {hh}x{ww} pixels"
            elif q == 4:
                img.data, dd = b"GIF89a" + b"\x00" * 20, "garbage image"
            else:
                img.data, dd, _ = mutate_bytes(img.data, rng)
            return f"{img.name}: {dd}", {key}, False, write_tar(members)
        if op == 3:  # drop a member
            i = rng.choice([img_i, pkl_i])
            name = members[i].name
            del members[i]
            t = {key} if (i == img_i or mode == "pickle") else set()
            return f"member {name} dropped", t, False, write_tar(members)
        if op == 4:  # duplicate a member (adjacent)
            i = rng.choice([img_i, pkl_i])
            members.insert(i + 1, copy.deepcopy(members[i]))
            return f"member {members[i].name} duplicated", {key}, True, write_tar(members)
        if op == 5:  # members of one key not adjacent
            i = rng.choice([img_i, pkl_i])
            m = members.pop(i)
            members.append(m)
            return f"member {m.name} moved to the end of the shard", {key}, True, write_tar(members)
        if op == 6:  # path traversal / absolute names, a valid sample otherwise
            q = rng.randrange(4)
            if q == 0:
                stem = "../../../escape/evil"
            elif q == 1:
                stem = str(d / "escape" / "abs")
            elif q == 2:
                stem = "a/../../../../escape/evil2"
            else:
                stem = "./" + "../" * 3 + "escape/evil3"
            members.insert(0, Member(f"{stem}.jpg", png_bytes(H, W, 3)))
            members.insert(1, Member(f"{stem}.pickle", good_pkl))
            return f"sample with member names {stem}.jpg/.pickle added (must not be written outside --image-dir)", set(), False, write_tar(members)
        if op == 7:  # links and special members in place of the image
            q = rng.randrange(5)
            img = members[img_i]
            target = rng.choice(["/etc/passwd", "../../../escape/target.jpg", str(d / "escape" / "t.jpg"), members[pkl_i].name])
            if q == 0:
                members[img_i] = Member(img.name, type=tarfile_type("SYMTYPE"), linkname=target)
                dd = f"image member is a symlink to {target}"
            elif q == 1:
                members[img_i] = Member(img.name, type=tarfile_type("LNKTYPE"), linkname=target)
                dd = f"image member is a hard link to {target}"
            elif q == 2:
                members[img_i] = Member(img.name, type=tarfile_type("DIRTYPE"))
                dd = "image member is a directory"
            elif q == 3:
                members[img_i] = Member(img.name, type=tarfile_type("FIFOTYPE"))
                dd = "image member is a FIFO"
            else:
                members[img_i] = Member(img.name, type=tarfile_type("CHRTYPE"))
                dd = "image member is a character device"
            return dd, {key}, False, write_tar(members)
        if op == 8:  # odd key names for an added valid sample
            name = rng.choice(["sp ace", "ké\u00e9y", "new\nline", "-dash", "a.b", "", ".hidden", "UP", "x" * 200, "tab\tkey", "back\\slash", "quote\"d"])
            ext = rng.choice(["jpg", "JPG", "png", "jpg.gz"])
            members.append(Member(f"{name}.{ext}", png_bytes(H, W, 4)))
            members.append(Member(f"{name}.pickle", good_pkl))
            return f"sample {name!r}.{ext} added", set(), False, write_tar(members)
        if op == 9:  # a member whose header declares more bytes than the shard has
            i = rng.choice([img_i, pkl_i])
            size = rng.choice([10**6, 10**10, 8**11 + 5])
            data = declared_size_tar(members, i, size)
            return f"member {members[i].name} declares {size} bytes", set(keys[k:]), False, data
        if op == 10:
            if rng.random() < 0.5:  # an image member without its pickle and a pickle without image
                members.append(Member("orphan.pickle", good_pkl))
                members.insert(0, Member("lonely.jpg", png_bytes(H, W, 5)))
                return "orphan members added", set(), False, write_tar(members)
            # the same sample key again later in the shard, with another image and regions: ids must stay unique
            members += [Member(members[img_i].name, png_bytes(H, W, 6)), Member(members[pkl_i].name, good_pkl)]
            return f"sample {key!r} repeated at the end of the shard (other image and regions)", {key}, True, write_tar(members)
        # a huge but consistent sample: image and mask of the same large size
        hh, ww = rng.choice([(4000, 4000), (8000, 8000)])
        from fuzz_mutators import rle_string

        members[img_i].data = _blank_png(hh, ww)
        members[pkl_i].data = pickle.dumps([{"caption": "A huge region.", "mask_rle": {"size": [hh, ww], "counts": rle_string([hh * ww - 100, 100])}}], protocol=2)
        return f"sample with a {hh}x{ww} image and a mask of that size", {key}, False, write_tar(members)


_PNG_CACHE: dict = {}


def _blank_png(h: int, w: int) -> bytes:
    if (h, w) not in _PNG_CACHE:
        buf = io.BytesIO()
        Image.new("L", (w, h)).save(buf, format="PNG")
        _PNG_CACHE[(h, w)] = buf.getvalue()
    return _PNG_CACHE[(h, w)]


def tarfile_type(name: str) -> bytes:
    import tarfile

    return getattr(tarfile, name)


# --------------------------------------------------------------------------------------------------
# JSON Lines inputs: dlres (region captions) and validate (any schema records)
# --------------------------------------------------------------------------------------------------


class DlresFamily(Family):
    name = "dlres"
    CAPTIONS = [
        "A red box on the left.", "A blue box. It is shiny.", "The dog is a golden retriever. Its tongue hangs out.",
        "A white ceramic mug with a blue pattern. The mug has a glossy finish.", "Red sports car parked on the street.", "A TV mounted on the wall",
    ]

    def build(self, base: Path) -> None:
        write_image(base / "imgs" / "a.png", 20, 30)
        m = box_mask(20, 30, 3, 9, 4, 20)
        self.records = [
            make_record(id=f"cap-{i}", image="../imgs/a.png", task="region_caption", messages=chat(REGION_CAPTION_PROMPT, c),
                        regions=[region_entry(rle_of(m) if i % 2 == 0 else uncompressed_rle(m), [4, 3, 20, 9])], meta={"source": "dam", "subset": "SA"})
            for i, c in enumerate(self.CAPTIONS)
        ]
        (base / "src").mkdir(parents=True, exist_ok=True)
        self.lines = [json_bytes(r) for r in self.records]
        (base / "src" / "caps.jsonl").write_bytes(b"".join(x + b"\n" for x in self.lines))

    def baseline(self, d: Path) -> Case:
        src, out = d / "src" / "caps.jsonl", d / "out" / "dlres.jsonl"
        return Case(self.name, -1, d, "data", ["dlres", "--src", str(src), "--out", str(out)], "unmutated", [src], out, line_files=[src],
                    expected={"dlres-" + r["id"] for r in self.records})

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        src, out = d / "src" / "caps.jsonl", d / "out" / "dlres.jsonl"
        data, desc, _ = mutate_jsonl(self.records, rng)
        breaks = jsonl_breaks(data)
        src.write_bytes(data)
        expected = set()
        for _, line in untouched_lines(self.lines, data):
            expected.add("dlres-" + json.loads(line)["id"])
        argv = ["dlres", "--src", str(src), "--out", str(out)]
        if rng.random() < 0.15:
            argv += ["--max-words", str(rng.choice([1, 5, 1000]))]
        if rng.random() < 0.08:
            argv += ["--strict"]
        return Case(self.name, index, d, "data", argv, desc, [src], out, line_files=[src], needs_line=breaks,
                    expected=expected)


class ValidateFamily(Family):
    name = "validate"

    def build(self, base: Path) -> None:
        write_image(base / "img.png", 20, 30)
        m = box_mask(20, 30, 2, 9, 3, 12)
        m2 = box_mask(20, 30, 10, 18, 15, 25)
        self.records = [
            make_record(id="r0", image="img.png", task="res", messages=chat("Please segment: it.", "[SEG]"), targets=[target_entry([rle_of(m)], [[3, 2, 12, 9]])], meta={"source": "t"}),
            make_record(id="r1", image="img.png", task="gres", messages=chat("Please segment: nothing.", "[SEG]"), targets=[target_entry()], meta={}),
            make_record(id="r2", image="img.png", task="gres", messages=chat("Please segment: both.", "[SEG]"), targets=[target_entry([rle_of(m), rle_of(m2)], [[3, 2, 12, 9], [15, 10, 25, 18]])]),
            make_record(id="r3", image="img.png", task="region_caption", messages=chat("Describe <region> in detail.", "A box."), regions=[region_entry(uncompressed_rle(m), [3, 2, 12, 9])]),
            make_record(id="r4", image="img.png", task="rec", messages=chat("Please locate: it.", "[SEG]"), targets=[{"masks": [[poly_rect(3, 2, 9, 7)]], "boxes": [[3, 2, 12, 9]]}]),
            make_record(id="r5", image="img.png", task="dlres", messages=chat("Please segment: the box.", "[SEG]"), targets=[target_entry([rle_of(m2)], [[15, 10, 25, 18]])],
                        regions=[region_entry(rle_of(m2), [15, 10, 25, 18], target_index=0, in_prompt=False)]),
            make_record(id="r6", image="img.png", task="conversation", messages=[{"role": "user", "content": "<region1> and <region2>?"}, {"role": "assistant", "content": "Two boxes."}],
                        regions=[region_entry(rle_of(m), [3, 2, 12, 9]), region_entry(rle_of(m2), [15, 10, 25, 18])]),
        ]
        self.lines = [json_bytes(r) for r in self.records]
        (base / "records.jsonl").write_bytes(b"".join(x + b"\n" for x in self.lines))

    def baseline(self, d: Path) -> Case:
        path = d / "records.jsonl"
        return Case(self.name, -1, d, "data", ["validate", str(path)], "unmutated", [path], d / "none", line_files=[path], kind="validate",
                    info={"good_lines": list(range(1, len(self.records) + 1))})

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        path = d / "records.jsonl"
        data, desc, _ = mutate_jsonl(self.records, rng)
        breaks = jsonl_breaks(data)
        path.write_bytes(data)
        untouched = untouched_lines(self.lines, data)
        # ids now used by more than one line: a legitimately reported duplicate (whichever line comes second)
        ids: dict[str, int] = {}
        for line in data.split(b"\n"):
            obj = load_json_bytes(line)
            if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                ids[obj["id"]] = ids.get(obj["id"], 0) + 1
        good_lines = [n for n, line in untouched if ids.get(json.loads(line)["id"], 0) == 1]
        argv = ["validate", str(path)]
        for opt, p in (("--no-images", 0.15), ("--no-decode", 0.15), ("--strict", 0.08)):
            if rng.random() < p:
                argv.append(opt)
        if rng.random() < 0.1:
            argv += ["--max-shown", "2"]
        return Case(self.name, index, d, "data", argv, desc, [path], d / "none", line_files=[path], needs_line=breaks,
                    kind="validate", info={"good_lines": good_lines})


# --------------------------------------------------------------------------------------------------
# JSON document inputs: lvis-roc, gcg, muse, osprey
# --------------------------------------------------------------------------------------------------


class LvisRocFamily(Family):
    name = "lvis-roc"

    def build(self, base: Path) -> None:
        coco = base / "coco"
        write_image(coco / "val2017" / "000000000001.jpg", 30, 40, seed=1)
        write_image(coco / "train2017" / "000000000007.jpg", 30, 40, seed=2)
        m = box_mask(30, 40, 5, 15, 5, 25)
        self.osprey = [
            {"file_name": "val2017/000000000001.jpg", "height": 30, "width": 40, "categories": ["car_(automobile):wheel", "dog"],
             "annotations": [{"segmentation": [poly_rect(2, 2, 10, 8)]}, {"segmentation": rle_of(m)}]},
            {"file_name": "train2017/000000000007.jpg", "height": 30, "width": 40, "categories": ["cat"], "annotations": [{"segmentation": uncompressed_rle(m)}]},
            {"file_name": "val2017/000000000001.jpg", "height": 30, "width": 40, "categories": ["mug", "spoon", "table"],
             "annotations": [{"segmentation": [poly_rect(1, 1, 5, 5)]}, {"segmentation": [poly_rect(20, 10, 10, 10), poly_rect(0, 20, 4, 4)]}, {"segmentation": rle_of(m)}]},
        ]
        self.lvis = {
            "images": [{"id": 7, "height": 30, "width": 40, "coco_url": "http://images.cocodataset.org/train2017/000000000007.jpg"},
                       {"id": 1, "height": 30, "width": 40, "file_name": "val2017/000000000001.jpg"}],
            "annotations": [{"id": 70, "image_id": 7, "category_id": 3, "segmentation": [poly_rect(1, 1, 9, 9)], "bbox": [1, 1, 9, 9]},
                            {"id": 71, "image_id": 7, "category_id": 4, "segmentation": rle_of(m), "bbox": [5, 5, 20, 10]},
                            {"id": 10, "image_id": 1, "category_id": 3, "segmentation": [poly_rect(10, 10, 5, 5)], "bbox": [10, 10, 5, 5]},
                            {"id": 11, "image_id": 1, "category_id": 5, "segmentation": uncompressed_rle(m), "bbox": [5, 5, 20, 10]}],
            "categories": [{"id": 3, "name": "teddy_bear"}, {"id": 4, "name": "car_(automobile)"}, {"id": 5, "name": "mug"}],
        }
        (base / "paco_val_1k_category.json").write_text(json.dumps(self.osprey))
        (base / "lvis_v1_val.json").write_text(json.dumps(self.lvis))

    def baseline(self, d: Path) -> Case:
        out, ann = d / "out" / "roc.jsonl", d / "paco_val_1k_category.json"
        expected = {f"paco-roc-{i}-{j}" for i, item in enumerate(self.osprey) for j in range(len(item["annotations"]))}
        return Case(self.name, -1, d, "data", ["lvis-roc", "--ann", str(ann), "--image-root", str(d / "coco"), "--out", str(out)], "unmutated", [ann], out, expected=expected)

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        out = d / "out" / "roc.jsonl"
        expected: set[str] = set()
        dup = False
        if rng.random() < 0.55:
            ann = d / "paco_val_1k_category.json"
            data, desc = _mutate_doc(rng, self.osprey)
            eff = load_json_bytes(data)
            if isinstance(eff, list):
                for i, item in enumerate(self.osprey):
                    if i < len(eff) and same(eff[i], item):
                        expected |= {f"paco-roc-{i}-{j}" for j in range(len(item["annotations"]))}
        else:
            ann = d / "lvis_v1_val.json"
            data, desc = _mutate_doc(rng, self.lvis)
            eff = load_json_bytes(data)
            if isinstance(eff, dict):
                imgs, anns, cats = eff.get("images"), eff.get("annotations"), eff.get("categories")
                cat_names = {c["id"]: c.get("name") for c in cats if isinstance(c, dict) and isinstance(c.get("id"), int)} if isinstance(cats, list) else {}
                if isinstance(imgs, list) and isinstance(anns, list):
                    for img in self.lvis["images"]:
                        if count_same(imgs, img) != 1 or sum(1 for x in imgs if isinstance(x, dict) and same(x.get("id"), img["id"])) != 1:
                            continue
                        for a in self.lvis["annotations"]:
                            if a["image_id"] != img["id"]:
                                continue
                            orig_cat = next(c["name"] for c in self.lvis["categories"] if c["id"] == a["category_id"])
                            if count_same(anns, a) == 1 and same(cat_names.get(a["category_id"]), orig_cat):
                                expected.add(f"lvis-roc-{img['id']}-{a['id']}")
                dup = "duplicated" in desc
        ann.write_bytes(data)
        argv = ["lvis-roc", "--ann", str(ann), "--image-root", str(d / "coco"), "--out", str(out)]
        if rng.random() < 0.1:
            argv += ["--no-check-images"]
        return Case(self.name, index, d, "data", argv, f"{ann.name}: {desc}", [ann], out, expected=expected)


class GcgFamily(Family):
    name = "gcg"

    def build(self, base: Path) -> None:
        for n, f in enumerate(("x.jpg", "y.jpg", "z.jpg")):
            write_image(base / "imgs" / f, 20, 30, seed=n)
        a, b, c = box_mask(20, 30, 2, 8, 2, 10), box_mask(20, 30, 10, 18, 12, 20), box_mask(20, 30, 10, 18, 22, 28)
        caption = "A man walks two dogs in a park."
        self.train = [
            {"file_name": "x.jpg", "caption": caption,
             "groundings": {"two dogs": {"token_positives": [12, 20], "rle_masks": [rle_of(b), rle_of(c)]}, "A man": {"token_positives": [0, 5], "rle_masks": [rle_of(a)]}}},
            {"file_name": "y.jpg", "caption": "A cat sits next to a box.", "groundings": {"A cat": {"token_positives": [0, 5], "rle_masks": [uncompressed_rle(a)]}}},
            {"file_name": "z.jpg", "caption": "Nothing to see.", "groundings": {}},
        ]
        self.cap = {"images": [{"id": 5, "file_name": "y.jpg", "height": 20, "width": 30}, {"id": 6, "file_name": "z.jpg", "height": 20, "width": 30}],
                    "annotations": [{"id": 1, "image_id": 5, "caption": "A cat sits next to a box.", "labels": ["a cat", "a box"]},
                                    {"id": 2, "image_id": 6, "caption": "One dog.", "labels": ["one dog"]}]}
        self.msk = {"images": self.cap["images"],
                    "annotations": [{"id": 11, "image_id": 5, "segmentation": rle_of(a), "category_id": 1},
                                    {"id": 12, "image_id": 5, "segmentation": [poly_rect(12, 10, 8, 8)], "category_id": 1},
                                    {"id": 21, "image_id": 6, "segmentation": rle_of(c), "category_id": 1}]}
        (base / "GranDf_HA_GCG_train.json").write_text(json.dumps(self.train))
        (base / "val_gcg_coco_caption_gt.json").write_text(json.dumps(self.cap))
        (base / "val_gcg_coco_mask_gt.json").write_text(json.dumps(self.msk))

    def baseline(self, d: Path) -> Case:
        out, ann = d / "out" / "gcg.jsonl", d / "GranDf_HA_GCG_train.json"
        return Case(self.name, -1, d, "data", ["gcg", "--ann", str(ann), "--image-root", str(d / "imgs"), "--out", str(out)], "unmutated", [ann], out,
                    expected={"gcg-x", "gcg-y", "gcg-z"})

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        out = d / "out" / "gcg.jsonl"
        imgs = d / "imgs"
        expected: set[str] = set()
        if rng.random() < 0.55:
            ann = d / "GranDf_HA_GCG_train.json"
            data, desc = _mutate_doc(rng, self.train)
            ann.write_bytes(data)
            eff = load_json_bytes(data)
            if isinstance(eff, list):
                for item in self.train:
                    if item["groundings"] and count_same(eff, item) == 1:
                        expected.add(f"gcg-{Path(item['file_name']).stem}")
            argv = ["gcg", "--ann", str(ann), "--image-root", str(imgs), "--out", str(out)]
            inputs = [ann]
        else:
            capf, mskf = d / "val_gcg_coco_caption_gt.json", d / "val_gcg_coco_mask_gt.json"
            which = rng.random()
            cap_data, msk_data = json_bytes(self.cap), json_bytes(self.msk)
            descs = []
            if which < 0.6:
                cap_data, dd = _mutate_doc(rng, self.cap)
                descs.append(f"{capf.name}: {dd}")
            if which >= 0.4:
                msk_data, dd = _mutate_doc(rng, self.msk)
                descs.append(f"{mskf.name}: {dd}")
            capf.write_bytes(cap_data)
            mskf.write_bytes(msk_data)
            desc = "; ".join(descs)
            ce, me = load_json_bytes(cap_data), load_json_bytes(msk_data)
            if isinstance(ce, dict) and isinstance(me, dict) and isinstance(ce.get("images"), list) and isinstance(ce.get("annotations"), list) and isinstance(me.get("annotations"), list):
                images = _by_id(ce["images"])
                caps: dict = {}
                for a in ce["annotations"]:
                    if isinstance(a, dict):
                        try:
                            caps[a.get("image_id")] = a
                        except TypeError:
                            pass
                for img in self.cap["images"]:
                    iid = img["id"]
                    cap0 = next(a for a in self.cap["annotations"] if a["image_id"] == iid)
                    m0 = [a for a in self.msk["annotations"] if a["image_id"] == iid]
                    m1 = [a for a in me["annotations"] if isinstance(a, dict) and same(a.get("image_id"), iid)]
                    if same(images.get(iid), img) and same(caps.get(iid), cap0) and len(m1) == len(m0) and all(count_same(m1, a) == 1 for a in m0):
                        expected.add(f"gcg-{Path(img['file_name']).stem}")
            argv = ["gcg", "--caption-gt", str(capf), "--mask-gt", str(mskf), "--image-root", str(imgs), "--out", str(out)]
            inputs = [capf, mskf]
        if rng.random() < 0.1 and "--ann" in argv:  # (the evaluation layout's polygons need the image size)
            argv += ["--no-check-images"]
        return Case(self.name, index, d, "data", argv, desc, inputs, out, expected=expected)


class IndexedListFamily(Family):
    """A JSON list of image entries whose record ids contain the entry's index (muse, osprey)."""

    ann_name = ""
    command = ""

    def ids_of(self, i: int, item: dict) -> set[str]:
        raise NotImplementedError

    def baseline(self, d: Path) -> Case:
        ann, out = d / self.ann_name, d / "out" / "o.jsonl"
        expected = set().union(*(self.ids_of(i, item) for i, item in enumerate(self.items)))
        return Case(self.name, -1, d, "data", [self.command, "--ann", str(ann), "--image-root", str(d / self.image_root), "--out", str(out)], "unmutated",
                    [ann], out, expected=expected)

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        ann = d / self.ann_name
        out = d / "out" / "o.jsonl"
        data, desc = _mutate_doc(rng, self.items)
        ann.write_bytes(data)
        if rng.random() < 0.03:
            desc += "; " + _fs_oddity(rng, ann)
            data = b"\x00"
        eff = load_json_bytes(data)
        expected: set[str] = set()
        if isinstance(eff, list):
            for i, item in enumerate(self.items):
                if i < len(eff) and same(eff[i], item):
                    expected |= self.ids_of(i, item)
        argv = [self.command, "--ann", str(ann), "--image-root", str(d / self.image_root), "--out", str(out), *self.options(rng)]
        return Case(self.name, index, d, "data", argv, f"{ann.name}: {desc}", [ann], out, expected=expected)

    def options(self, rng: random.Random) -> list[str]:
        return ["--no-check-images"] if rng.random() < 0.1 else []


class MuseFamily(IndexedListFamily):
    name, ann_name, command, image_root = "muse", "muse_val.json", "muse", "mscoco"

    def build(self, base: Path) -> None:
        write_image(base / "mscoco" / "train2014" / "COCO_train2014_000000000001.jpg", 30, 40)
        write_image(base / "mscoco" / "val2017" / "000000000002.jpg", 30, 40, seed=3)
        o1 = {"segmentation": [poly_rect(1, 1, 10, 10)], "bbox": [1, 1, 10, 10], "category_name": "cup", "rephrased_name": "the mug"}
        o2 = {"segmentation": [poly_rect(20, 5, 10, 20)], "bbox": [20, 5, 10, 20], "category_name": "spoon"}
        o3 = {"segmentation": rle_of(box_mask(30, 40, 2, 12, 25, 35)), "bbox": [25, 2, 10, 10], "category_name": "plate"}
        self.items = [
            {"file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40,
             "questions": ["What would I use for tea?", "Where is nothing?", "Stir with?"], "answers": [[o1, o2], [], [o2]],
             "text_answers": ["You would use {seg} and {seg}.", None, "A {seg}."]},
            {"coco_url": "http://images.cocodataset.org/val2017/000000000002.jpg", "height": 30, "width": 40, "questions": ["Which?"], "answers": [[o3]]},
            {"file_name": "COCO_train2014_000000000001.jpg", "height": 30, "width": 40, "questions": ["All?"], "answers": [[o1, o2, o3]]},
        ]
        (base / self.ann_name).write_text(json.dumps(self.items))

    def ids_of(self, i: int, item: dict) -> set[str]:
        return {f"muse-val-{i}-{q}" for q in range(len(item["questions"]))}


class OspreyFamily(IndexedListFamily):
    name, ann_name, command, image_root = "osprey", "osprey_conversation.json", "osprey", "coco"

    def build(self, base: Path) -> None:
        write_image(base / "coco" / "000000000009.jpg", 30, 40)
        regions = [{"segmentation": [poly_rect(1, 1, 10, 10)]}, {"segmentation": rle_of(box_mask(30, 40, 5, 25, 20, 30))}]
        self.items = [
            {"file_name": "COCO_train2014_000000000009.jpg", "height": 30, "width": 40, "annotation": regions,
             "conversations": [{"from": "human", "value": "<image>\nWhat is <region2> doing next to <region1>?"}, {"from": "gpt", "value": "It holds <region1>."},
                               {"from": "human", "value": "Colour of <region1>?"}, {"from": "gpt", "value": "Red."}]},
            {"file_name": "000000000009.jpg", "height": 30, "width": 40, "annotation": regions, "description": ["<region1>: A small red box.", "<region2>: A tall blue bar."]},
            {"file_name": "000000000009.jpg", "height": 30, "width": 40, "annotation": regions[:1],
             "conversations": [{"from": "human", "value": "What is <region1>?"}, {"from": "gpt", "value": "A box."}]},
            {"file_name": "000000000009.jpg", "height": 30, "width": 40, "annotation": [],
             "conversations": [{"from": "human", "value": "What is in the image?"}, {"from": "gpt", "value": "Shapes."}]},
        ]
        (base / self.ann_name).write_text(json.dumps(self.items))

    def ids_of(self, i: int, item: dict) -> set[str]:
        stem = Path(self.ann_name).stem
        if "conversations" in item:
            return {f"osprey-{stem}-{i}"}
        return {f"osprey-{stem}-{i}-{k}" for k in range(len(item["description"]))}

    def options(self, rng: random.Random) -> list[str]:
        opts = super().options(rng)
        if rng.random() < 0.2:
            opts += ["--suffix", rng.choice(["Answer briefly.", "[SEG]", "\u202e"])]
        return opts


# --------------------------------------------------------------------------------------------------
# fclm-eval score
# --------------------------------------------------------------------------------------------------

A, B, C, D = rect(0, 0, 4, 5), rect(2, 0, 6, 5), rect(5, 5, 10, 10), rect(1, 6, 4, 9)


def _eval_base(task: str) -> tuple[list[dict], list[dict]]:
    """Six GT records and their predictions (one missing) for ``task``."""
    if task in ("res", "dlres"):
        gts = [gt("a", [[A]]), gt("b", [[B]]), gt("c", [[C]]), gt("d", [[D]]), gt("e", [[A]]), gt("f", [[C]])]
        gts[3]["targets"][0]["masks"] = [[[1, 6, 4, 6, 4, 9, 1, 9]]]  # a polygon (rasterised at the image size)
        preds = [pred("a", [seg(B)]), pred("b", [seg(B)]), pred("c", [seg(C, exists=0.2)]), pred("d", [seg(D)]), pred("e", [seg(A, scores=[0.9]), seg(C)])]
    elif task == "rec":
        gts = [gt("a", [[A]], boxes=[[[0, 0, 4, 5]]]), gt("b", [[B]], boxes=[[[2, 0, 6, 5]]]), gt("c", [[C]]), gt("d", [[]], boxes=[[[1, 6, 4, 9]]]),
               gt("e", [[A]], boxes=[[[0, 0, 4, 5]]]), gt("f", [[C]], boxes=[[[5, 5, 10, 10]]])]
        preds = [pred("a", [seg(A, boxes=[[0, 0, 4, 5]], scores=[0.9])]), pred("b", [seg(boxes=[[0, 0, 3, 3], [2, 0, 6, 5]], scores=[0.2, 0.8])]),
                 pred("c", [seg(C)]), pred("d", [seg(boxes=[[1, 6, 4, 9]])]), pred("e", [seg(exists=0.1)])]
    elif task == "gres":
        gts = [gt("a", [[A, C]]), gt("b", [[]]), gt("c", [[C]]), gt("d", [[D]]), gt("e", [[]]), gt("f", [[B]])]
        preds = [pred("a", [seg(A, C)]), pred("b", [seg(exists=0.1)]), pred("c", [seg(C, exists=0.9)]), pred("d", [seg(A)]), pred("e", [seg(B)])]
    elif task == "grec":
        gts = [gt("a", [[A, C]], boxes=[[[0, 0, 4, 5], [5, 5, 10, 10]]]), gt("b", [[]]), gt("c", [[C]], boxes=[[[5, 5, 10, 10]]]),
               gt("d", [[D]], boxes=[[[1, 6, 4, 9]]]), gt("e", [[]]), gt("f", [[B]], boxes=[[[2, 0, 6, 5]]])]
        preds = [pred("a", [seg(boxes=[[0, 0, 4, 5], [5, 5, 10, 10]], scores=[0.9, 0.8])]), pred("b", [seg(boxes=[[0, 0, 1, 1]], scores=[0.1])]),
                 pred("c", [seg(boxes=[[5, 5, 10, 10]])]), pred("d", [seg(boxes=[[0, 0, 9, 9]], scores=[0.95])]), pred("e", [seg()])]
    elif task == "rrefcoco":
        gts = [gt("a", [[A]], meta={"ref_id": 1}), gt("b", [[]], meta={"ref_id": 1}), gt("c", [[C]], meta={"ref_id": 2}),
               gt("d", [[]], meta={"ref_id": 2}), gt("e", [[D]], meta={"ref_id": "x"}), gt("f", [[B]], meta={"ref_id": [3]})]
        preds = [pred("a", [seg(A)]), pred("b", [seg(exists=0.1)]), pred("c", [seg(B)]), pred("d", [seg(C)]), pred("e", [seg(D, exists=0.7)])]
    elif task == "refzom":
        gts = [gt("a", [[A]]), gt("b", [[]]), gt("c", [[C, D]]), gt("d", []), gt("e", [[B]]), gt("f", [[]])]
        preds = [pred("a", [seg(A)]), pred("b", [seg(exists=0.1)]), pred("c", [seg(C, D)]), pred("d", [seg(B)]), pred("e", [seg(B, exists=0.3)])]
    elif task == "muse":
        gts = [gt("a", [[A], [C]], answer="[SEG] and [SEG]"), gt("b", [[B]]), gt("c", [[C], [D], [A]], answer="[SEG] [SEG] [SEG]"), gt("d", [[D]]), gt("e", [[A]]), gt("f", [[C]])]
        preds = [pred("a", [seg(A, scores=[0.9]), seg(C, scores=[0.8])]), pred("b", [seg(B)]), pred("c", [seg(D), seg(C)]), pred("d", [seg(A)]), pred("e", [])]
    elif task == "gcg":
        ans = "<p>A thing</p> [SEG] next to <p>another</p> [SEG]."
        gts = [gt("a", [[A], [C]], answer=ans, meta={"phrases": ["A thing", "another"]}), gt("b", [[B]], answer="<p>One</p> [SEG].", meta={"phrases": ["One"]}),
               gt("c", [[C], [D]], answer=ans), gt("d", [], answer="Nothing here.", meta={"phrases": []}),
               gt("e", [[A]], answer="<p>it</p> [SEG]", meta={"phrases": ["it"]}), gt("f", [[D]], answer="<p>x</p> [SEG]", meta={"phrases": ["x"]})]
        preds = [pred("a", [seg(A), seg(B)], text=ans), pred("b", [seg(B)], text="<p>One</p> [SEG]."), pred("c", [seg(C)], text="<p>A thing</p> [SEG]."),
                 pred("d", [], text="Nothing."), pred("e", [seg(A), seg(C)], text="<p>it</p> [SEG] <p>more</p> [SEG]")]
    elif task == "roc":
        gts = [gt(r, [], answer=c, meta={"category": c}) for r, c in zip("abcdef", ["dog", "car_(automobile)", "car_(automobile):wheel", "mug", "teddy_bear", "cat"])]
        preds = [pred("a", text="a dog"), pred("b", text="car"), pred("c", text="wheel</s>"), pred("d", text="cup: mug."), pred("e", text="")]
    else:
        raise ValueError(task)
    return gts, preds


class EvalFamily(Family):
    program = "eval"

    def __init__(self, task: str):
        self.task = task
        self.name = f"score-{task}"

    def build(self, base: Path) -> None:
        self.gts, self.preds = _eval_base(self.task)
        write_image(base / "img.jpg", 10, 10)
        (base / "gt.jsonl").write_bytes(b"".join(json_bytes(r) + b"\n" for r in self.gts))
        (base / "pred.jsonl").write_bytes(b"".join(json_bytes(r) + b"\n" for r in self.preds))

    def baseline(self, d: Path) -> Case:
        g, p, out = d / "gt.jsonl", d / "pred.jsonl", d / "out"
        argv = ["score", "--task", self.task, "--gt", str(g), "--pred", str(p), "--out", str(out)] + (["--no-caption-metrics"] if self.task == "gcg" else [])
        return Case(self.name, -1, d, "eval", argv, "unmutated", [g, p], out, line_files=[g, p], kind="score", info={"n_gt": len(self.gts)})

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        g, p, out = d / "gt.jsonl", d / "pred.jsonl", d / "out"
        r = rng.random()
        descs, needs_line = [], False
        if r < 0.08:  # the same huge (consistent) mask size in one GT record and its prediction
            from fuzz_mutators import rle_string

            k = rng.randrange(len(self.preds))
            h, w = rng.choice([(16384, 16384), (2**15, 2**15), (1, 2**28), (46341, 46341), (65536, 65536)])
            big = {"size": [h, w], "counts": rle_string([h * w - 7, 7])}
            gts, preds = copy.deepcopy(self.gts), copy.deepcopy(self.preds)
            rid = preds[k]["id"]
            grec = next(x for x in gts if x["id"] == rid)
            for t in grec["targets"]:
                t["masks"] = [big for _ in t["masks"]]
                t["boxes"] = [[w - 7, h - 1, w, h] for _ in t["boxes"]]
            for s in preds[k]["segs"]:
                for inst in s["instances"]:
                    if "mask" in inst:
                        inst["mask"] = big
            g.write_bytes(b"".join(json_bytes(x) + b"\n" for x in gts))
            p.write_bytes(b"".join(json_bytes(x) + b"\n" for x in preds))
            descs.append(f"GT and prediction {rid!r}: every mask a consistent {h}x{w} RLE")
        else:
            if r < 0.5 or r >= 0.92:
                data, dd, _ = mutate_jsonl(self.gts, rng)
                g.write_bytes(data)
                descs.append(f"gt.jsonl: {dd}")
                needs_line |= jsonl_breaks(data)
            if r >= 0.5:
                data, dd, _ = mutate_jsonl(self.preds, rng)
                p.write_bytes(data)
                descs.append(f"pred.jsonl: {dd}")
                needs_line |= jsonl_breaks(data)
        if rng.random() < 0.03:
            descs.append(_fs_oddity(rng, rng.choice([g, p])))
            needs_line = False  # the error is about the whole file
        argv = ["score", "--task", self.task, "--gt", str(g), "--pred", str(p), "--out", str(out)]
        if self.task == "gcg":
            argv.append("--no-caption-metrics")
        if rng.random() < 0.04:
            argv.append("--plot")
        n_gt = 0
        for k, line in enumerate((g.read_bytes() if g.is_file() else b"").split(b"\n")):
            if isinstance(load_json_bytes(line[3:] if k == 0 and line.startswith(b"\xef\xbb\xbf") else line), dict):
                n_gt += 1
        return Case(self.name, index, d, "eval", argv, "; ".join(descs), [g, p], out, line_files=[g, p], needs_line=needs_line,
                    kind="score", info={"n_gt": n_gt})


# --------------------------------------------------------------------------------------------------
# selftest: checks the harness itself (a crash, a hang, a traceback are each recorded and survived)
# --------------------------------------------------------------------------------------------------

SELFTEST_PLAN = ["ok", "raise", "segv", "ok", "hang", "block", "exit3", "ok"]


def selftest_main(argv: list[str]) -> int:
    import os
    import signal
    import time

    what = argv[0]
    if what == "raise":
        raise RuntimeError("boom")
    if what == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if what == "hang":
        time.sleep(3600)  # the worker's alarm interrupts this
    if what == "block":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # the alarm cannot: the parent must kill us
        time.sleep(3600)
    if what == "exit3":
        return 3
    print("wrote 0 record(s) to nowhere")
    return 0


class SelfTestFamily(Family):
    name = "selftest"
    program = "selftest"

    def baseline(self, d: Path) -> Case:
        return self.case(random.Random(0), d, -1)

    def build(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)

    def case(self, rng: random.Random, d: Path, index: int) -> Case:
        what = SELFTEST_PLAN[index % len(SELFTEST_PLAN)] if index >= 0 else "ok"
        return Case(self.name, index, d, "selftest", [what], what, [d], d / "out" / "o.jsonl", kind="selftest")


# ==================================================================================================

EVAL_TASKS = ("res", "dlres", "rec", "gres", "grec", "rrefcoco", "refzom", "muse", "gcg", "roc")


def all_families() -> dict[str, Family]:
    fams: list[Family] = [
        ReferFamily("refcoco", "refcoco", "refcoco", "unc", "refs(unc).p", False, REFCOCO_REFS, lambda ref, s: [ref["ann_id"]], ("res", "rec")),
        ReferFamily("refcocog", "refcoco", "refcocog", "umd", "refs(umd).p", False, REFCOCO_REFS, lambda ref, s: [ref["ann_id"]], ("res", "rec")),
        ReferFamily("grefcoco", "grefcoco", "grefcoco", "unc", "grefs(unc).json", True, GREFCOCO_REFS, _gref_objects, ("gres", "grec")),
        ReferFamily("rrefcoco", "rrefcoco", "rrefcoco", "unc", "refs(unc).p", False, RREFCOCO_REFS, lambda ref, s: [ref["ann_id"]], ("gres", "res")),
        ReferFamily("refzom", "refzom", "ref-zom", "final", "refs(final).p", False, REFZOM_REFS, _zom_objects, ("gres", "grec")),
        DamFamily(), DlresFamily(), LvisRocFamily(), GcgFamily(), MuseFamily(), OspreyFamily(), ValidateFamily(),
    ]
    fams += [EvalFamily(t) for t in EVAL_TASKS]
    fams.append(SelfTestFamily())
    return {f.name: f for f in fams}


FAMILY_NAMES = tuple(n for n in all_families() if n != "selftest")
