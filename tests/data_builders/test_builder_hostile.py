"""Builders on hostile files (mutations of real formats): no crash, hang, escape or code execution, and
nothing valid lost. Inputs that once killed the process (pycocotools), hung or allocated gigabytes run
through ``run_cli_isolated`` (a child process with a memory cap and a timeout)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from builder_fixtures import poly_rect, read_jsonl, refer_fixture, rle_of, run_cli_isolated, write_image
from PIL import Image

from data_builders import dam
from data_builders.__main__ import main
from fclm.io import RecordError

# --------------------------------------------------------------------------------------------------
# dam: members that would be written outside --image-dir, links, devices, oversized members
# --------------------------------------------------------------------------------------------------


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def regions_pickle(h: int = 20, w: int = 30, caption: str = "A box.") -> bytes:
    m = np.zeros((h, w), bool)
    m[2:10, 3:12] = True
    return pickle.dumps([{"caption": caption, "mask_rle": rle_of(m)}], protocol=2)


def add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def add_special(tf: tarfile.TarFile, name: str, type_: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    tf.addfile(info)


def test_dam_refuses_members_outside_the_image_dir_links_devices_and_oversized(tmp_path):
    src = tmp_path / "dam" / "S"
    src.mkdir(parents=True)
    outside = tmp_path / "abs_target"  # where an absolute member name points (inside tmp, so the old code's write is harmless)
    img = png_bytes(20, 30)
    with tarfile.open(src / "shard-0.tar", "w") as tf:
        add_file(tf, "ok.jpg", img)
        add_file(tf, "ok.pickle", regions_pickle())
        add_file(tf, "../../../escape.jpg", img)
        add_file(tf, "../../../escape.pickle", regions_pickle())
        add_file(tf, f"{outside}/abs.jpg", img)
        add_file(tf, f"{outside}/abs.pickle", regions_pickle())
        add_special(tf, "sym.jpg", tarfile.SYMTYPE, "/etc/passwd")
        add_file(tf, "sym.pickle", regions_pickle())
        add_special(tf, "hard.jpg", tarfile.LNKTYPE, "ok.jpg")
        add_special(tf, "dev.jpg", tarfile.CHRTYPE)
        add_special(tf, "fifo.jpg", tarfile.FIFOTYPE)
        add_file(tf, "big.png", png_bytes(200, 200, seed=3))  # ~120 kB, over the 60 kB limit below
        add_file(tf, "big.pickle", regions_pickle(200, 200))
        add_file(tf, "ok2.jpg", img)
        add_file(tf, "ok2.pickle", regions_pickle(caption="Another box."))
    image_dir = tmp_path / "out" / "a" / "b" / "images"
    out = tmp_path / "out" / "dam.jsonl"
    res = dam.build(dam.DamOptions(root=tmp_path / "dam", out=out, image_dir=image_dir, max_member_bytes=60_000))
    assert [r["id"] for r in read_jsonl(out)] == ["dam-S-ok-0", "dam-S-ok2-0"]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert written == ["out/a/b/images/S/ok.jpg", "out/a/b/images/S/ok2.jpg"]  # nothing outside --image-dir
    assert not outside.exists()
    problems = [str(e) for e in res.report.problems]
    text = "\n".join(problems)
    for member, why in [
        ("../../../escape.jpg", "climbs out"),
        (f"{outside}/abs.jpg", "absolute"),
        ("sym.jpg", "symbolic link"),
        ("hard.jpg", "hard link"),
        ("dev.jpg", "device"),
        ("fifo.jpg", "FIFO"),
        ("big.png", "over the 60000-byte limit"),
    ]:
        line = next((p for p in problems if f"shard-0.tar['{member}']" in p), None)
        assert line is not None and why in line, (member, text)
    assert main(["dam", "--root", str(tmp_path / "dam"), "--out", str(tmp_path / "o2.jsonl"), "--max-member-bytes", "60000"]) == 0


def dam_source(root, key: str, caption: str, seed: int = 0, shard_name: str = "shard-0.tar"):
    src = root / "S"
    src.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / shard_name, "w") as tf:
        add_file(tf, f"{key}.jpg", png_bytes(20, 30, seed))
        add_file(tf, f"{key}.pickle", regions_pickle(caption=caption))
    (src / "annotations.json").write_text(json.dumps({key: pickle.loads(regions_pickle(caption=caption + " (json)"))}))


def test_dam_skips_a_repeated_sample_key_and_keeps_the_first_image(tmp_path, capsys):
    """A key seen before (in this shard, or an earlier shard of the source) would overwrite the first image
    and repeat its record ids: it is reported and skipped (found by the fuzz suite)."""
    src = tmp_path / "S"
    src.mkdir()
    with tarfile.open(src / "a.tar", "w") as tf:
        for name, data in [("k.jpg", png_bytes(20, 30, 1)), ("k.pickle", regions_pickle(caption="first k")),
                           ("z.jpg", png_bytes(20, 30, 2)), ("z.pickle", regions_pickle(caption="z")),
                           ("k.jpg", png_bytes(20, 30, 3)), ("k.pickle", regions_pickle(caption="second k"))]:
            add_file(tf, name, data)
    with tarfile.open(src / "b.tar", "w") as tf:
        add_file(tf, "z.jpg", png_bytes(20, 30, 4))
        add_file(tf, "z.pickle", regions_pickle(caption="z again"))
    out = tmp_path / "o.jsonl"
    assert main(["dam", "--root", str(tmp_path), "--out", str(out)]) == 0
    records = read_jsonl(out)
    assert [(r["id"], r["messages"][1]["content"]) for r in records] == [("dam-S-k-0", "first k"), ("dam-S-z-0", "z")]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o_images" / "S" / "k.jpg")),
                          np.asarray(Image.open(io.BytesIO(png_bytes(20, 30, 1)))))
    err = capsys.readouterr()
    assert "2 problem" in err.out + err.err and "sample key repeats" in err.out + err.err


def test_dam_does_not_resume_from_the_parts_of_other_inputs_or_options(tmp_path):
    dam_source(tmp_path / "A", "a1", "From A.")
    dam_source(tmp_path / "B", "b1", "From B.", seed=1)
    out = tmp_path / "dam.jsonl"
    dam.build(dam.DamOptions(root=tmp_path / "A", out=out))
    assert [r["id"] for r in read_jsonl(out)] == ["dam-S-a1-0"]
    # another --root, same --out: refused, naming what differs, and the output is left alone
    with pytest.raises(RecordError, match=r"other inputs or options \(root: .*--overwrite"):
        dam.build(dam.DamOptions(root=tmp_path / "B", out=out))
    assert [r["id"] for r in read_jsonl(out)] == ["dam-S-a1-0"]
    assert main(["dam", "--root", str(tmp_path / "B"), "--out", str(out)]) == 2
    # another --regions-from: refused too
    with pytest.raises(RecordError, match="regions_from"):
        dam.build(dam.DamOptions(root=tmp_path / "A", out=out, regions_from="annotations"))
    # --overwrite starts fresh
    assert main(["dam", "--root", str(tmp_path / "B"), "--out", str(out), "--overwrite"]) == 0
    recs = read_jsonl(out)
    assert [(r["id"], r["messages"][1]["content"]) for r in recs] == [("dam-S-b1-0", "From B.")]
    # the same inputs resume
    again = dam.build(dam.DamOptions(root=tmp_path / "B", out=out))
    assert again.counts == {"shards": 1, "resumed shards": 1}
    # a shard replaced under the same name (new size and time): refused
    dam_source(tmp_path / "B", "b2", "A longer caption from B, second version.", seed=2)
    with pytest.raises(RecordError, match="other input files"):
        dam.build(dam.DamOptions(root=tmp_path / "B", out=out))
    assert dam.build(dam.DamOptions(root=tmp_path / "B", out=out, overwrite=True)).records == 1
    assert [r["id"] for r in read_jsonl(out)] == ["dam-S-b2-0"]


# --------------------------------------------------------------------------------------------------
# Masks that used to reach pycocotools (NaN/Infinity/huge polygon coordinates, huge RLE sizes)
# --------------------------------------------------------------------------------------------------

HOSTILE_SEGMENTATIONS = [
    [[float("nan"), 1, 10, 1, 10, 10, 1, 10]],
    [[float("inf"), 1, 10, 1, 10, 10, 1, 10]],
    [[-float("inf"), 1, 10, 1, 10, 10, 1, 10]],
    [[4e8, 1, 10, 1, 10, 10, 1, 10]],
    [[1, 1, 4.5e9, 1, 10, 10]],
    {"size": [50000, 60000], "counts": [0, 3_000_000_000]},
    {"size": [40000, 40000], "counts": "0" * 10},
]


def test_osprey_reports_hostile_masks_and_image_sizes_and_keeps_the_rest(tmp_path):
    write_image(tmp_path / "coco" / "1.jpg", 30, 40)
    good = {"file_name": "1.jpg", "height": 30, "width": 40, "annotation": [{"segmentation": [poly_rect(1, 1, 10, 10)]}],
            "description": ["<region1>: A box."]}
    data = [good]
    for seg in HOSTILE_SEGMENTATIONS:
        data.append({**good, "annotation": [{"segmentation": seg}]})
    for h in (float("inf"), -30, float("nan"), 1e300, [30], True):
        data.append({**good, "height": h})
    data.append(good)
    ann = tmp_path / "osprey_description.json"
    ann.write_text(json.dumps(data))  # Python's json writes NaN/Infinity, and reads them back
    out = tmp_path / "o.jsonl"
    proc = run_cli_isolated("osprey", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["id"] for r in read_jsonl(out)] == ["osprey-osprey_description-0-0", f"osprey-osprey_description-{len(data) - 1}-0"]
    n_bad = len(data) - 2
    assert f"{n_bad} problem(s)" in proc.stdout
    for i in range(1, 1 + len(HOSTILE_SEGMENTATIONS)):
        assert f"osprey_description.json[{i}].annotation[0]" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_refcoco_reports_hostile_masks_image_sizes_and_entries(tmp_path):
    root = tmp_path / "refer"
    bad_anns = [
        {"id": 900 + k, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5], "segmentation": seg}
        for k, seg in enumerate(HOSTILE_SEGMENTATIONS)
    ]
    refs = [
        {"ref_id": 0, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "val",
         "sentences": [{"sent_id": 0, "sent": "left man", "raw": "left man"}]},
    ] + [
        {"ref_id": 10 + k, "ann_id": a["id"], "image_id": 1, "category_id": 1, "split": "val",
         "sentences": [{"sent_id": 10 + k, "sent": "bad", "raw": "bad"}]}
        for k, a in enumerate(bad_anns)
    ] + [
        {"ref_id": 50, "ann_id": 301, "image_id": 3, "category_id": 1, "split": "val", "sentences": [{"sent_id": 50, "sent": "x"}]},
        {"ref_id": 51, "ann_id": 102, "image_id": 1, "category_id": 2, "split": ["val"], "sentences": [{"sent_id": 51, "sent": "y"}]},
        {"ref_id": 52, "ann_id": 201, "image_id": 2, "category_id": 1, "split": "val", "sentences": [{"sent_id": 52, "sent": "person"}]},
    ]
    size_ann = {"id": 301, "image_id": 3, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 5, 5], "segmentation": [poly_rect(1, 1, 5, 5)]}
    refer_fixture(root, refs=refs, extra_anns=bad_anns + [size_ann])
    inst_path = root / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    inst["images"].append({"id": 3, "file_name": "COCO_train2014_000000000002.jpg", "height": float("inf"), "width": -4})
    inst["images"] += [7, {"file_name": "no id"}, {"id": [1], "height": 1}]
    na = len(inst["annotations"])
    inst["annotations"] += ["x", {"image_id": 1}, None]
    inst_path.write_text(json.dumps(inst))
    out = tmp_path / "refcoco.jsonl"
    proc = run_cli_isolated("refcoco", "--root", str(root), "--out", str(out), "--split", "val")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["meta"]["ref_id"] for r in read_jsonl(out)] == [0, 52]
    text = proc.stdout
    for a in bad_anns:
        assert f"[annotations id={a['id']}]" in text
    assert "instances.json[images][3]" in text and "instances.json[images][4]: no 'id'" in text
    assert f"instances.json[annotations][{na}]" in text and f"instances.json[annotations][{na + 1}]: no 'id'" in text
    assert f"instances.json[annotations][{na + 2}]" in text and "instances.json[images][5]" in text
    assert "[annotations id=301]" in text and "image size" in text  # the image with an infinite / negative size
    assert "Traceback" not in proc.stderr


def test_validate_reports_hostile_masks_per_line(tmp_path):
    write_image(tmp_path / "img.png", 20, 30)

    def rec(i, mask):
        return {"id": f"r{i}", "image": "img.png", "task": "res",
                "messages": [{"role": "user", "content": "Please segment: it."}, {"role": "assistant", "content": "[SEG]"}],
                "regions": [], "targets": [{"masks": [mask], "boxes": [[1, 1, 5, 5]]}]}

    lines = [json.dumps(rec(0, [poly_rect(1, 1, 4, 4)]))]
    lines += [json.dumps(rec(i + 1, seg if isinstance(seg, dict) else seg)) for i, seg in enumerate(HOSTILE_SEGMENTATIONS)]
    lines.append(json.dumps(rec(99, [poly_rect(2, 2, 4, 4)])))
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = run_cli_isolated("validate", str(path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"{len(lines)} record(s) in 1 file(s): 2 valid" in proc.stdout
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# Tracebacks: deep nesting, non-finite sizes, malformed entries
# --------------------------------------------------------------------------------------------------


def caption_line(i: int, caption: str = "A red box.") -> str:
    m = np.zeros((20, 30), bool)
    m[3:9, 4:20] = True
    return json.dumps({"id": f"cap-{i}", "image": "a.png", "task": "region_caption",
                       "messages": [{"role": "user", "content": "Describe <region> in detail."}, {"role": "assistant", "content": caption}],
                       "regions": [{"mask": rle_of(m), "box": [4, 3, 20, 9]}], "targets": [], "meta": {"source": "dam"}})


def test_validate_and_dlres_report_deep_nesting_and_bad_utf8_lines(tmp_path, capsys):
    write_image(tmp_path / "a.png", 20, 30)
    deep = '{"id": "deep", "meta": ' + "[" * 50_000 + "]" * 50_000 + "}"
    lines = [caption_line(0).encode(), deep.encode(), caption_line(2, "A blue bOx.").encode().replace(b"bOx", b"b\xf6x"),
             caption_line(3, "x\\ud800y").encode().replace(b"\\\\ud800", b"\\ud800"), caption_line(4).encode()]
    assert b"x\\ud800y" in lines[3] and b"\xf6" in lines[2]
    src = tmp_path / "caps.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["validate", str(src), "--no-images"]) == 1
    text = capsys.readouterr().out
    assert "2 record(s) in 1 file(s): 2 valid" in text  # the bad lines are reported, not counted as records
    assert f"{src}:2: JSON nested deeper than" in text and f"{src}:3: invalid UTF-8" in text and f"{src}:4: a lone UTF-16 surrogate" in text
    out = tmp_path / "dlres.jsonl"
    assert main(["dlres", "--src", str(src), "--out", str(out)]) == 0
    assert [r["meta"]["src_id"] for r in read_jsonl(out)] == ["cap-0", "cap-4"]
    text = capsys.readouterr().out
    assert "3 problem(s)" in text and f"{src}:2" in text and f"{src}:3" in text and f"{src}:4" in text


def deep_refs_pickle(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def shared_sentence_refs_pickle(depth: int = 40) -> bytes:
    """refs = [{"ref_id": 0, …, "sentences": [{"sent": L}]}] with L = [l39, l39], l_i = [l_{i-1}, l_{i-1}]:
    a few hundred bytes whose sentence, printed, never ends."""
    ref = {"ref_id": 0, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "val", "sentences": [{"sent_id": 0, "sent": "PLACEHOLDER"}]}
    data = pickle.dumps([ref], protocol=2)
    chain = bytearray(b"]r\x00\x10\x00\x00")  # LONG_BINPUT 4096: clear of the memo indexes pickle.dumps used
    for i in range(1, depth + 1):
        chain += b"0]r" + (4096 + i).to_bytes(4, "little") + b"(j" + (4095 + i).to_bytes(4, "little") + b"j" + (4095 + i).to_bytes(4, "little") + b"e"
    placeholder = b"X\x0b\x00\x00\x00PLACEHOLDER"
    assert data.count(placeholder) == 1
    return data.replace(placeholder, bytes(chain))


@pytest.mark.parametrize(
    "content, words",
    [
        (deep_refs_pickle(5000), "deeper than 100 levels"),
        (b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.", "bytearray(1073741824)"),
        (shared_sentence_refs_pickle(), "objects"),
    ],
)
def test_hostile_refs_pickles_are_a_one_line_error_naming_the_file(tmp_path, content, words):
    root = tmp_path / "refer"
    refer_fixture(root)
    (root / "refcoco" / "refs(unc).p").write_bytes(content)
    proc = run_cli_isolated("refcoco", "--root", str(root), "--out", str(tmp_path / "o.jsonl"), timeout=30, extra_mb=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "\n" not in err and "refs(unc).p" in err and words in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_grefs_json_too_deep_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "refer"
    refer_fixture(root, dataset="grefcoco", refs_name="grefs(unc).json", as_json=True)
    (root / "grefcoco" / "grefs(unc).json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["grefcoco", "--root", str(root), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "grefs(unc).json" in err and "nested too deeply" in err


def test_muse_and_lvis_report_non_finite_image_sizes_and_bad_boxes(tmp_path, capsys):
    write_image(tmp_path / "coco" / "train2014" / "1.jpg", 30, 40)
    write_image(tmp_path / "coco" / "val2017" / "1.jpg", 30, 40)
    obj = {"segmentation": [poly_rect(1, 1, 10, 10)], "bbox": [1, 1, 10, 10], "category_name": "box"}
    good = {"file_name": "1.jpg", "height": 30, "width": 40, "questions": ["Where?"], "answers": [[obj]]}
    muse = [good, {**good, "height": float("inf")}, {**good, "width": -1}, {**good, "answers": [[{**obj, "bbox": [float("nan"), 1, 2, 2]}]]},
            {**good, "answers": [["not an object"]]}, "not an entry", good]
    ann = tmp_path / "muse_val.json"
    ann.write_text(json.dumps(muse))
    out = tmp_path / "muse.jsonl"
    assert main(["muse", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["muse-val-0-0", "muse-val-6-0"]
    assert "5 problem(s)" in capsys.readouterr().out
    lvis = {
        "images": [{"id": 1, "height": 30, "width": 40, "coco_url": "x/val2017/1.jpg"},
                   {"id": 2, "height": float("inf"), "width": 40, "coco_url": "x/val2017/1.jpg"}, "junk", {"height": 3}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "segmentation": [poly_rect(1, 1, 9, 9)]},
                        {"id": 11, "image_id": 2, "category_id": 3, "segmentation": [poly_rect(1, 1, 9, 9)]}, 5, {"id": 12}],
        "categories": [{"id": 3, "name": "teddy_bear"}, None],
    }
    ann = tmp_path / "lvis_v1_val.json"
    ann.write_text(json.dumps(lvis))
    out = tmp_path / "roc.jsonl"
    assert main(["lvis-roc", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["lvis-roc-1-10"]
    text = capsys.readouterr().out
    assert "6 problem(s)" in text and "image size" in text


# --------------------------------------------------------------------------------------------------
# Invalid UTF-8 / lone surrogates in whole-file JSON
# --------------------------------------------------------------------------------------------------


def test_invalid_utf8_in_a_whole_file_json_is_a_one_line_error_naming_file_and_byte(tmp_path, capsys):
    ann = tmp_path / "osprey_conversation.json"
    data = b'[{"file_name": "caf\xe9.jpg"}]'
    ann.write_bytes(data)
    offset = data.index(b"\xe9")
    assert main(["osprey", "--ann", str(ann), "--image-root", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(ann) in err and f"invalid UTF-8 at byte {offset} (line 1)" in err


def test_a_lone_surrogate_in_a_whole_file_json_costs_one_record(tmp_path, capsys):
    write_image(tmp_path / "coco" / "1.jpg", 30, 40)
    item = {"file_name": "1.jpg", "height": 30, "width": 40, "annotation": [{"segmentation": [poly_rect(1, 1, 10, 10)]}],
            "description": ["<region1>: A box."]}
    text = json.dumps([item, {**item, "description": ["<region1>: A b\\ud800x."]}, item])  # the escape stays in the file
    ann = tmp_path / "osprey_description.json"
    ann.write_text(text.replace("\\\\ud800", "\\ud800"))
    out = tmp_path / "o.jsonl"
    assert main(["osprey", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["osprey-osprey_description-0-0", "osprey-osprey_description-2-0"]
    report = capsys.readouterr().out
    assert "1 problem(s)" in report and "record 'osprey-osprey_description-1-0'" in report and "surrogate" in report


# --------------------------------------------------------------------------------------------------
# Found by tests/fuzz (mutated real-format files): each once a crash, a lost record or an invalid output
# --------------------------------------------------------------------------------------------------


def test_dam_keeps_the_sample_before_a_member_that_claims_gigabytes(tmp_path):
    src = tmp_path / "dam" / "S"
    src.mkdir(parents=True)
    with tarfile.open(src / "x.tar", "w") as tf:
        add_file(tf, "s1.jpg", png_bytes(20, 30))
        add_file(tf, "s1.pickle", regions_pickle())
        info = tarfile.TarInfo("s2.png")
        info.size = 10_000_000_000  # a header that claims 10 GB; the data is not there
        tf.addfile(info)
    res = dam.build(dam.DamOptions(root=tmp_path / "dam", out=tmp_path / "o.jsonl"))
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["dam-S-s1-0"]
    text = "\n".join(str(e) for e in res.report.problems)
    assert "x.tar['s2.png']: member of 10000000000 bytes is over the" in text


def test_dlres_checks_each_mask_and_its_image_size_without_decoding(tmp_path, capsys):
    write_image(tmp_path / "a.png", 20, 30)
    good = json.loads(caption_line(0))
    bad = []
    for change in (
        lambda r: r["regions"][0]["mask"].update(size=[30, 20]),  # not the image's size
        lambda r: r["regions"][0]["mask"].update(counts="0000zz"),  # corrupt run lengths
        lambda r: r["regions"][0]["mask"].update(counts=[0, 100, -100, 600]),  # negative run
        lambda r: r["regions"][0].update(box=[4, 3, 20, 10**400]),  # an integer too big for a float
    ):
        rec = json.loads(caption_line(len(bad) + 1))
        change(rec)
        bad.append(rec)
    last = json.loads(caption_line(9))
    src = tmp_path / "caps.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [good, *bad, last]) + "\n")
    out = tmp_path / "d.jsonl"
    assert main(["dlres", "--src", str(src), "--out", str(out)]) == 0
    assert [r["meta"]["src_id"] for r in read_jsonl(out)] == ["cap-0", "cap-9"]
    text = capsys.readouterr().out
    assert "4 problem(s)" in text and "differs from the image size" in text and "Traceback" not in text
    for k in range(2, 6):
        assert f"caps.jsonl:{k}" in text


def test_refer_ids_stay_unique_and_printable(tmp_path, capsys):
    root = tmp_path / "refer"
    fx = refer_fixture(root)
    refs = [dict(r) for r in fx["refs"]]
    refs[0]["ref_id"] = 10**5000  # cannot be printed (Python's int-to-str limit)
    refs[1] = {**refs[1], "sentences": [{"sent_id": True, "sent": "a"}, {"sent_id": True, "sent": "b"}]}
    refs.append({**refs[2], "ref_id": 3})  # the same sentence ids again: duplicate record ids
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    out = tmp_path / "o.jsonl"
    assert main(["refcoco", "--root", str(root), "--out", str(out)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["refcoco-unc-testA-3"]
    text = capsys.readouterr().out
    assert "4 problem(s)" in text and "refs(unc).p[ref_id=1]: sentence without an integer or string 'sent_id'" in text
    assert "refs(unc).p[ref_id=3][sent_id=3]: id 'refcoco-unc-testA-3' is already used by an earlier record" in text
    assert "refs(unc).p[0][sent_id=0] (record 'refcoco-unc-train-0'): cannot be written as JSON" in text  # its meta.ref_id


def test_osprey_image_name_too_long_and_descriptions_that_are_not_text(tmp_path, capsys):
    write_image(tmp_path / "coco" / "1.jpg", 30, 40)
    item = {"file_name": "1.jpg", "height": 30, "width": 40, "annotation": [{"segmentation": [poly_rect(1, 1, 10, 10)]}],
            "description": ["<region1>: A box."]}
    data = [item, {**item, "file_name": "x" * 5000 + ".jpg"}, {**item, "description": [["<region1>: A box."]]},
            {**item, "description": ["<region1>: A box next to <region2>."]}, item]
    ann = tmp_path / "osprey_description.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "o.jsonl"
    assert main(["osprey", "--ann", str(ann), "--image-root", str(tmp_path / "coco"), "--out", str(out)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["osprey-osprey_description-0-0", "osprey-osprey_description-4-0"]
    text = capsys.readouterr().out
    assert "3 problem(s)" in text and "[1]: image not found" in text and "[2]: 'description' must be a list of strings" in text
    assert "[3].description[0]: messages[1] (assistant) contains a <region> placeholder" in text


def test_refcoco_reports_an_image_whose_file_has_another_size_than_stated(tmp_path, capsys):
    """Masks are rasterised at the annotation's height/width: a file of another size would give records whose
    masks do not fit their image (found by the long fuzz run; `fclm-data validate` then refused them)."""
    root = tmp_path / "refer"
    refer_fixture(root)
    inst = root / "refcoco" / "instances.json"
    data = json.loads(inst.read_text())
    data["images"][0]["width"] = 61  # the file is 40×60
    inst.write_text(json.dumps(data))
    out = tmp_path / "o.jsonl"
    assert main(["refcoco", "--root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--out", str(out)]) == 0
    err = capsys.readouterr()
    assert "the annotation says the image is 40×61 (H×W)" in err.out + err.err
    records = read_jsonl(out)
    assert records and all("000000000001" not in r["image"] for r in records)  # the other image's records are kept
    assert main(["validate", str(out)]) == 0
