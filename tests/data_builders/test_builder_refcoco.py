"""refcoco builder on a tiny refer-format fixture: masks, boxes, splits, bad input, strict mode."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from builder_fixtures import Boom, coco_decode, read_jsonl, refer_fixture

from data_builders.__main__ import main
from fclm.data.schema import resolve_image_path, validate_record
from fclm.masks import decode_rle


@pytest.fixture
def refer_root(tmp_path):
    return tmp_path / "refer"


def run(refer_root, out, *extra):
    return main(["refcoco", "--root", str(refer_root), "--out", str(out), *extra])


def test_records_match_pycocotools_decodes(refer_root, tmp_path, capsys):
    fx = refer_fixture(refer_root)
    out = tmp_path / "out" / "refcoco.jsonl"
    assert run(refer_root, out) == 0
    recs = read_jsonl(out)
    assert len(recs) == 4  # one record per sentence
    by_sent = {r["meta"]["sent_id"]: r for r in recs}
    for ref in fx["refs"]:
        ann = fx["anns"][ref["ann_id"]]
        img = fx["images"][ref["image_id"]]
        want = coco_decode(ann["segmentation"], img["height"], img["width"])
        for sent in ref["sentences"]:
            r = by_sent[sent["sent_id"]]
            assert r["task"] == "res"
            assert r["messages"] == [
                {"role": "user", "content": f"Please segment: {sent['sent']}."},
                {"role": "assistant", "content": "[SEG]"},
            ]
            (target,) = r["targets"]
            assert np.array_equal(decode_rle(target["masks"][0]), want)
            x, y, w, h = ann["bbox"]
            assert target["boxes"] == [[x, y, x + w, y + h]]
            assert r["meta"]["ref_id"] == ref["ref_id"] and r["meta"]["split"] == ref["split"]
            # the image path is relative to the output folder and points at the real file
            assert not r["image"].startswith("/")
            assert resolve_image_path(r["image"], out.parent).resolve() == (fx["img_dir"] / img["file_name"]).resolve()
            assert validate_record(r, "x", image_root=out.parent, check_images=True) == []
    assert by_sent[2]["meta"]["category"] == "car_(automobile)"
    assert len({r["id"] for r in recs}) == 4
    assert "wrote 4 record(s)" in capsys.readouterr().out


def test_split_filter_and_rec_task(refer_root, tmp_path):
    refer_fixture(refer_root)
    out = tmp_path / "val.jsonl"
    assert run(refer_root, out, "--split", "val,testA", "--task", "rec", "--text", "raw") == 0
    recs = read_jsonl(out)
    assert sorted(r["meta"]["split"] for r in recs) == ["testA", "val"]
    assert all(r["task"] == "rec" for r in recs)
    assert {r["messages"][0]["content"] for r in recs} == {"Please segment: red car.", "Please segment: person."}


def test_bad_polygon_and_missing_image_are_reported_and_skipped(refer_root, tmp_path, capsys):
    fx_refs = [
        {"ref_id": 0, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "train", "sentences": [{"sent_id": 0, "sent": "a"}]},
        {"ref_id": 7, "ann_id": 999, "image_id": 1, "category_id": 1, "split": "train", "sentences": [{"sent_id": 9, "sent": "b"}]},
        {"ref_id": 8, "ann_id": 301, "image_id": 3, "category_id": 1, "split": "train", "sentences": [{"sent_id": 10, "sent": "c"}]},
    ]
    bad_ann = {"id": 999, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 2, 2], "segmentation": [[1, 1, 2, 2]]}
    img3_ann = {"id": 301, "image_id": 3, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 4, 4], "segmentation": [[1, 1, 5, 1, 5, 5]]}
    refer_fixture(refer_root, refs=fx_refs, extra_anns=[bad_ann, img3_ann])
    # image 3 is listed in instances.json but its file is missing
    inst_path = refer_root / "refcoco" / "instances.json"
    inst = json.load(open(inst_path))
    inst["images"].append({"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": 10, "width": 10})
    json.dump(inst, open(inst_path, "w"))
    out = tmp_path / "o.jsonl"
    assert run(refer_root, out) == 0
    recs = read_jsonl(out)
    assert [r["meta"]["ref_id"] for r in recs] == [0]
    text = capsys.readouterr().out
    assert "2 problem(s)" in text
    assert "instances.json[annotations id=999]" in text and "at least 3" in text
    assert "refs(unc).p[ref_id=8]" in text and "image not found" in text
    # --strict fails at the first of them, and leaves no output file behind
    out2 = tmp_path / "strict.jsonl"
    assert run(refer_root, out2, "--strict") == 2
    assert "annotations id=999" in capsys.readouterr().err
    assert not out2.exists()
    # without checking images the missing file is no longer a problem
    assert run(refer_root, tmp_path / "nocheck.jsonl", "--no-check-images") == 0
    assert len(read_jsonl(tmp_path / "nocheck.jsonl")) == 2


def test_pickle_that_loads_a_class_is_refused(refer_root, tmp_path, capsys):
    refer_fixture(refer_root)
    marker = tmp_path / "pwned"
    with open(refer_root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump([{"ref_id": 0, "evil": Boom(str(marker))}], f)
    assert run(refer_root, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err
    assert "refs(unc).p" in err and "pathlib" in err and "only plain containers" in err
    assert not marker.exists()


def test_missing_refs_file_names_what_was_tried(refer_root, tmp_path, capsys):
    refer_fixture(refer_root)
    assert main(["refcoco", "--root", str(refer_root), "--split-by", "umd", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "refs(umd).p" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["refcoco+", "refcocog"])
def test_other_dataset_folders(refer_root, tmp_path, dataset):
    refer_fixture(refer_root, dataset=dataset, refs_name="refs(umd).p")
    out = tmp_path / "o.jsonl"
    assert main(["refcoco", "--root", str(refer_root), "--dataset", dataset, "--split-by", "umd", "--out", str(out)]) == 0
    recs = read_jsonl(out)
    assert len(recs) == 4 and all(r["id"].startswith(f"{dataset}-umd-") for r in recs)
