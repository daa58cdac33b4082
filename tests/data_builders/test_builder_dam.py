"""dam builder: streamed webdataset shards, restricted pickles, bad members, resume, strict mode."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from builder_fixtures import Boom, read_jsonl, rle_of, uncompressed_rle
from PIL import Image

from data_builders import dam
from data_builders.__main__ import main
from fclm.data.schema import resolve_image_path, validate_record
from fclm.io import RecordError
from fclm.masks import decode_rle


def png_bytes(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_shard(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def make_dam(root, marker):
    """Two sources; source A has good samples and every kind of bad member; source B one good shard."""
    a, b = root / "SrcA", root / "SrcB"
    m1, m2 = box_mask(20, 30, 2, 10, 3, 12), box_mask(20, 30, 5, 18, 15, 29)
    good1 = [{"caption": "A red box. It is shiny.", "mask_rle": rle_of(m1)}, {"caption": "A blue box.", "mask_rle": uncompressed_rle(m2)}]
    bad_regions = [
        {"caption": "fine", "mask_rle": rle_of(m1)},
        {"caption": "wrong size", "mask_rle": rle_of(box_mask(10, 10, 1, 5, 1, 5))},
        {"caption": "corrupt", "mask_rle": {"size": [20, 30], "counts": "zz"}},
        {"caption": "", "mask_rle": rle_of(m1)},
    ]
    write_shard(a / "images" / "shard-000000.tar", [
        ("s1.jpg", png_bytes(20, 30, 1)), ("s1.pickle", pickle.dumps(good1)),
        ("s2.jpg", png_bytes(20, 30, 2)),  # no pickle
        ("s3.jpg", png_bytes(20, 30, 3)), ("s3.pickle", pickle.dumps([Boom(str(marker))])),  # loads a class
        ("s4.jpg", png_bytes(20, 30, 4)), ("s4.pickle", pickle.dumps(bad_regions)),
    ])
    write_shard(a / "images" / "shard-000001.tar", [("s5.png", png_bytes(20, 30, 5)), ("s5.pickle", pickle.dumps({"regions": good1[:1]}))])
    write_shard(b / "shard-000000.tar", [("t1.jpg", png_bytes(20, 30, 6)), ("t1.pickle", pickle.dumps(good1[1:]))])
    annotations = {"s1": good1, "s2": good1[:1], "s4": bad_regions, "s5": good1[:1]}
    (a / "annotations.json").write_text(json.dumps(annotations))
    (b / "annotations.json").write_text(json.dumps({"t1": good1[1:]}))
    return m1, m2


def test_dam_records_problems_and_images(tmp_path):
    marker = tmp_path / "pwned"
    m1, m2 = make_dam(tmp_path / "dam", marker)
    out = tmp_path / "out" / "dam.jsonl"
    res = dam.build(dam.DamOptions(root=tmp_path / "dam", out=out))
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["dam-SrcA-s1-0", "dam-SrcA-s1-1", "dam-SrcA-s4-0", "dam-SrcA-s5-0", "dam-SrcB-t1-0"]
    for r in recs:
        assert r["task"] == "region_caption" and r["targets"] == []
        assert r["messages"][0]["content"] == "Describe <region> in detail."
        assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
        assert os.path.isfile(resolve_image_path(r["image"], out.parent))
    assert np.array_equal(decode_rle(recs[0]["regions"][0]["mask"]), m1)
    assert recs[0]["regions"][0]["box"] == [3.0, 2.0, 12.0, 10.0]
    assert np.array_equal(decode_rle(recs[1]["regions"][0]["mask"]), m2)  # uncompressed RLE was compressed
    assert isinstance(recs[1]["regions"][0]["mask"]["counts"], str)
    assert recs[0]["messages"][1]["content"] == "A red box. It is shiny."
    assert recs[3]["image"].endswith("SrcA/s5.png")
    wheres = [e.where for e in res.report.problems]
    probs = " | ".join(str(e) for e in res.report.problems)
    assert res.report.count == 5
    assert any(w.endswith("shard-000000.tar[s2]") for w in wheres) and "has no s2.pickle" in probs
    assert any(w.endswith("shard-000000.tar[s3].pickle") for w in wheres) and "only plain containers" in probs
    assert "regions[1]" in probs and "differs from the image size" in probs
    assert "regions[2]" in probs and "regions[3]" in probs and "no caption" in probs
    assert not marker.exists()
    assert res.counts == {"shards": 3, "resumed shards": 0}


def test_dam_resume_skips_finished_shards(tmp_path):
    make_dam(tmp_path / "dam", tmp_path / "m")
    out = tmp_path / "dam.jsonl"
    first = dam.build(dam.DamOptions(root=tmp_path / "dam", out=out))
    content = out.read_text()
    parts = tmp_path / "dam.jsonl.parts"
    kept = parts / "SrcA" / "shard-000000.jsonl"
    mtime = kept.stat().st_mtime_ns
    (parts / "SrcB" / "shard-000000.jsonl").unlink()  # as if the run was killed before that shard ended
    out.unlink()
    second = dam.build(dam.DamOptions(root=tmp_path / "dam", out=out))
    assert second.counts == {"shards": 3, "resumed shards": 2}
    assert kept.stat().st_mtime_ns == mtime
    assert out.read_text() == content
    assert second.report.count == first.report.count  # problems of resumed shards are still counted


def test_dam_strict_fails_without_output(tmp_path):
    make_dam(tmp_path / "dam", tmp_path / "m")
    out = tmp_path / "dam.jsonl"
    with pytest.raises(RecordError, match=r"s2\]: s2.jpg has no s2.pickle"):
        dam.build(dam.DamOptions(root=tmp_path / "dam", out=out, strict=True))
    assert not out.exists()
    assert main(["dam", "--root", str(tmp_path / "dam"), "--out", str(out), "--strict"]) == 2


def test_dam_regions_from_annotations_json(tmp_path):
    make_dam(tmp_path / "dam", tmp_path / "m")
    out = tmp_path / "a.jsonl"
    assert main(["dam", "--root", str(tmp_path / "dam"), "--out", str(out), "--regions-from", "annotations", "--sources", "SrcA"]) == 0
    ids = [r["id"] for r in read_jsonl(out)]
    # s2 now has regions (from annotations.json); s3 has no entry there and is reported
    assert ids == ["dam-SrcA-s1-0", "dam-SrcA-s1-1", "dam-SrcA-s2-0", "dam-SrcA-s4-0", "dam-SrcA-s5-0"]


def test_truncated_shard_keeps_earlier_samples(tmp_path):
    src = tmp_path / "dam" / "S"
    m = box_mask(20, 30, 2, 10, 3, 12)
    write_shard(src / "x.tar", [
        ("k0.jpg", png_bytes(20, 30, 0)), ("k0.pickle", pickle.dumps([{"caption": "c", "mask_rle": rle_of(m)}])),
        ("k1.jpg", png_bytes(20, 30, 9) * 50),
    ])
    data = (src / "x.tar").read_bytes()
    (src / "x.tar").write_bytes(data[: int(len(data) * 0.6)])  # cut inside k1.jpg
    res = dam.build(dam.DamOptions(root=tmp_path / "dam", out=tmp_path / "o.jsonl"))
    assert res.records == 1
    assert any("unreadable shard" in str(e) for e in res.report.problems)
