"""JsonlDataset (file and HF copy) and MixtureDataset."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data

from fclm.data.dataset import WHERE_KEY, JsonlDataset, MixtureDataset
from fclm.data.sampling import RandomBatchSampler
from fclm.data.schema import make_record, region_entry, target_entry
from fclm.io import RecordError
from fclm.masks import encode_mask


def mask():
    m = np.zeros((20, 30), bool)
    m[2:9, 3:12] = True
    return encode_mask(m)


def rec(i: int, task: str = "res", **kw) -> dict:
    if task == "roc":
        r = make_record(id=f"r{i}", image=f"img{i}.png", task="roc",
                        messages=[{"role": "user", "content": "What is <region>?"}, {"role": "assistant", "content": "cat"}],
                        regions=[region_entry(mask(), [3, 2, 12, 9])], meta={"source": "t", "k": i})
    else:
        r = make_record(id=f"r{i}", image=f"img{i}.png", task=task,
                        messages=[{"role": "user", "content": f"Please segment: thing {i}."}, {"role": "assistant", "content": "[SEG]"}],
                        targets=[target_entry([mask()], [[3, 2, 12, 9]])], meta={"source": "t"})
    r.update(kw)
    return r


def write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_valid_records_are_kept_and_bad_ones_reported(tmp_path):
    lines = [rec(0), rec(1, task="roc"), '{"id": "cut", "ima', {**rec(3), "task": "nope"}, rec(4, messages=[{"role": "user", "content": "x"},
             {"role": "assistant", "content": "[SEG] [SEG]"}]), "", rec(6, image="/abs/img.png")]
    path = write(tmp_path / "sub" / "d.jsonl", lines)
    ds = JsonlDataset(path)
    assert len(ds) == 3 and ds.report.count == 3
    assert [str(e.where) for e in ds.report.problems] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "unknown task 'nope'" in str(ds.report.problems[1])
    first = ds[0]
    assert first["id"] == "r0" and first[WHERE_KEY] == f"{path}:1"
    assert first["image"] == str(tmp_path / "sub" / "img0.png")  # relative to the JSONL file's folder
    assert ds[2]["image"] == "/abs/img.png" and ds.where(2) == f"{path}:7"
    assert ds.raw(1) == rec(1, task="roc")
    assert JsonlDataset(path, image_root=tmp_path)[0]["image"] == str(tmp_path / "img0.png")
    assert [ds2["id"] for ds2 in JsonlDataset(path, tasks=["roc"])] == ["r1"]
    with pytest.raises(RecordError, match=r"d\.jsonl:3: malformed JSON"):
        JsonlDataset(path, strict=True)


def test_images_checked_on_request(tmp_path):
    path = write(tmp_path / "d.jsonl", [rec(0)])
    assert len(JsonlDataset(path)) == 1
    ds = JsonlDataset(path, check_images=True)
    assert len(ds) == 0 and "image not found" in str(ds.report.problems[0])


def test_hf_copy_gives_the_same_records(tmp_path):
    import datasets  # a dependency (pyproject.toml): the HF copy path is always tested
    records = [rec(i, task="roc" if i % 2 else "res") for i in range(6)]
    records[2]["regions"] = [region_entry(mask(), [3, 2, 12, 9], target_index=0, in_prompt=False)]
    path = write(tmp_path / "d.jsonl", records)
    from_file = JsonlDataset(path)
    hf = datasets.Dataset.from_list(records)
    from_hf = JsonlDataset.from_hf(hf, tmp_path, name="copy")
    assert len(from_hf) == len(from_file) == 6 and from_hf.report.count == 0
    for i in range(6):
        a, b = from_file[i], from_hf[i]
        assert b[WHERE_KEY] == f"copy[{i}]"
        a.pop(WHERE_KEY), b.pop(WHERE_KEY)
        assert a == b
    # complex columns may also be stored as JSON strings; bad rows are reported by row
    rows = [{k: (json.dumps(v) if k in ("messages", "regions", "targets", "meta") else v) for k, v in r.items()} for r in records]
    rows[2]["targets"] = "[]"
    ds = JsonlDataset.from_hf(rows, tmp_path, name="rows")
    assert len(ds) == 5 and "rows[2]" in str(ds.report.problems[0])
    assert ds[0] == {**from_file[0], WHERE_KEY: "rows[0]"}


def worker_ids(batch):
    return [r["id"] for r in batch]


def test_dataloader_with_workers(tmp_path):
    path = write(tmp_path / "d.jsonl", [rec(i) for i in range(10)])
    ds = JsonlDataset(path)
    ds[0]  # opens a handle in this process; it must not travel to the workers
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3] == ds[3]
    sampler = RandomBatchSampler(ds, 3, seed=1)
    want = [[f"r{i}" for i in b] for b in sampler]
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=worker_ids)
        assert list(loader) == want


def test_mixture_weights_and_epochs():
    a, b = list(range(10)), list(range(100, 104))
    mix = MixtureDataset([a, b], weights=[1, 1], epoch_size=20)
    assert len(mix) == 14 and mix.quotas == [10, 10]
    assert mix[11] == 101 and mix.locate(11) == (1, 1)
    e0, e0_again, e1 = mix.epoch_indices(0, 0), mix.epoch_indices(0, 0), mix.epoch_indices(0, 1)
    assert np.array_equal(e0, e0_again) and not np.array_equal(e0, e1)
    counts = Counter(e0.tolist())
    assert all(counts[i] == 1 for i in range(10))  # dataset a: every record once
    assert sorted(counts[i] for i in range(10, 14)) == [2, 2, 3, 3]  # dataset b upsampled by whole permutations
    # without weights: every record once
    plain = MixtureDataset([a, b])
    assert sorted(plain.epoch_indices(3, 0).tolist()) == list(range(14))
    # down-sampling draws a different subset each epoch
    small = MixtureDataset([a, b], weights=[1, 0], epoch_size=5)
    assert small.quotas == [5, 0]
    assert set(small.epoch_indices(0, 0).tolist()) != set(small.epoch_indices(0, 1).tolist())
    with pytest.raises(ValueError, match="no records"):
        MixtureDataset([a, []], weights=[1, 1])
    with pytest.raises(ValueError, match="weight"):
        MixtureDataset([a, b], weights=[1])


def test_mixture_of_files(tmp_path):
    a = write(tmp_path / "a.jsonl", [rec(i) for i in range(4)])
    b = write(tmp_path / "b.jsonl", [rec(i, task="roc") for i in range(10, 12)] + ['{"broken'])
    mix = MixtureDataset.from_files([(a, 1.0), (b, 3.0)], epoch_size=8)
    assert mix.quotas == [2, 6] and len(mix) == 6
    assert mix[4]["id"] == "r10" and mix[4][WHERE_KEY] == f"{b}:1"
    assert mix.datasets[1].report.count == 1
    assert len(MixtureDataset.from_files([a, b]).epoch_indices(0, 0)) == 6
    with pytest.raises(ValueError, match="every file or for none"):
        MixtureDataset.from_files([(a, 1.0), b])
