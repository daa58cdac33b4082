"""FCLMCollator: image paths, report-and-skip of bad records, strict mode, DataLoader use."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fclm.config import preset
from fclm.data.collator import FCLMCollator
from fclm.io import RecordError
from fclm.masks import encode_mask, mask_to_box
from fclm.processor import BATCH_KEYS, FCLMProcessor
from fclm.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def proc() -> FCLMProcessor:
    return FCLMProcessor.from_config(preset("tiny"), tokenizer=build_tiny_tokenizer(1024))


@pytest.fixture()
def files(tmp_path):
    """An image folder with two good images and one corrupt file."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(root / "b.jpg")
    (root / "bad.png").write_bytes(b"definitely not an image")
    return root


def record(rid: str, image: str, h: int, w: int, **extra) -> dict:
    m = np.zeros((h, w), dtype=bool)
    m[5:25, 10:30] = True
    rle = encode_mask(m)
    return {
        "id": rid, "image": image, "task": "res",
        "messages": [{"role": "user", "content": "Segment <region>."}, {"role": "assistant", "content": "[SEG]"}],
        "regions": [{"mask": rle, "box": mask_to_box(m), "target_index": 0}],
        "targets": [{"masks": [rle], "boxes": [mask_to_box(m)]}],
        "meta": {}, **extra,
    }


def test_paths_relative_absolute_and_image_path_key(proc, files):
    col = FCLMCollator(proc, image_root=files)
    batch = col([
        record("rel", "a.png", 60, 80),
        record("abs", str(files / "b.jpg"), 50, 50),
        record("key", "ignored/elsewhere.png", 60, 80, _image_path=str(files / "a.png")),
    ])
    assert set(batch) == set(BATCH_KEYS)
    assert batch["ids"] == ["rel", "abs", "key"]
    assert batch["original_hw"].tolist() == [[60, 80], [50, 50], [60, 80]]
    assert batch["image_keys"][0] == batch["image_keys"][2] != batch["image_keys"][1]
    assert col.skipped == 0
    # The same records through the processor directly give the same batch.
    direct = proc([record("rel", "a.png", 60, 80)], [Image.open(files / "a.png").convert("RGB")])
    assert torch.equal(direct["input_ids"][0], batch["input_ids"][0, : direct["input_ids"].shape[1]])
    assert torch.equal(direct["sam_images"][0], batch["sam_images"][0])


def test_bad_records_are_reported_and_skipped(proc, files, caplog):
    col = FCLMCollator(proc, image_root=files)
    records = [
        record("good", "a.png", 60, 80),
        record("corrupt", "bad.png", 60, 80),
        record("missing", "nope.png", 60, 80),
        record("wrong-size", "b.jpg", 60, 80),  # masks are 60×80, the image 50×50
        record("count", "a.png", 60, 80, targets=[]),
        record("good2", "b.jpg", 50, 50),
    ]
    with caplog.at_level(logging.WARNING):
        batch = col(records)
    assert batch["ids"] == ["good", "good2"]
    assert col.skipped == 4
    reasons = {e.where.split("'")[1]: e.problem for e in col.report.problems}
    assert set(reasons) == {"corrupt", "missing", "wrong-size", "count"}
    assert "cannot read image" in reasons["corrupt"] and "bad.png" in reasons["corrupt"]
    assert "not found" in reasons["missing"]
    assert "[60, 80]" in reasons["wrong-size"] and "[50, 50]" in reasons["wrong-size"]
    assert "1 [SEG] token(s)" in reasons["count"] and "0 target(s)" in reasons["count"]
    assert "corrupt" in caplog.text  # each skip is logged with the record id


def test_strict_raises_at_the_first_bad_record(proc, files):
    col = FCLMCollator(proc, image_root=files, strict=True)
    with pytest.raises(RecordError, match=r"record 'corrupt'.*bad\.png"):
        col([record("good", "a.png", 60, 80), record("corrupt", "bad.png", 60, 80)])


def test_all_failed_batch_raises_with_reasons(proc, files):
    col = FCLMCollator(proc, image_root=files)
    with pytest.raises(ValueError, match=r"every record of the batch failed \(2\)(.|\n)*'x'(.|\n)*'y'"):
        col([record("x", "bad.png", 60, 80), record("y", "nope.png", 60, 80)])


def test_dataloader_with_jsonl_dataset(proc, files, tmp_path):
    from fclm.data.dataset import JsonlDataset

    path = files / "data.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            name, (h, w) = ("a.png", (60, 80)) if i % 2 == 0 else ("b.jpg", (50, 50))
            f.write(json.dumps(record(f"s{i}", name, h, w)) + "\n")
    ds = JsonlDataset(path)  # resolves ``image`` against the JSONL file's folder
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=FCLMCollator(proc), num_workers=0)
    batches = list(loader)
    assert [b["ids"] for b in batches] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    for b in batches:
        assert b["region_batch_index"].tolist() == list(range(len(b["ids"])))
        assert b["latent_pairs"].tolist() == [[i, i] for i in range(len(b["ids"]))]
