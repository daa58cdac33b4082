"""ShapesRef: files, determinism, splits, and that every expression names exactly what its target holds."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from builder_fixtures import read_jsonl

from data_builders import synthetic
from data_builders.__main__ import main
from fclm.data.schema import count_seg_tokens, placeholder_region_indices, validate_record
from fclm.data.templates import gcg_phrases
from fclm.masks import decode_rle


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapesref")
    assert main(["synthetic", "--n", "40", "--n-val", "8", "--seed", "3", "--out", str(out), "--shard-size", "16"]) == 0
    return out


def objects_by_image(out: Path, split: str) -> dict[int, list[dict]]:
    """Each image's objects read back from the roc records: category, size, visible mask."""
    objs: dict[int, list[dict]] = defaultdict(list)
    for r in read_jsonl(out / f"{split}_roc.jsonl"):
        colour, shape = r["meta"]["category"].split("_")
        objs[r["meta"]["image_index"]].append(
            {"colour": colour, "shape": shape, "size": r["meta"]["size"], "mask": decode_rle(r["regions"][0]["mask"])}
        )
    return objs


def matches(expr: str, obj: dict) -> bool:
    """An independent reading of ShapesRef's expression grammar."""
    words = expr.split()
    assert words[0] in ("the", "all")
    if expr == "all shapes":
        return True
    if words[0] == "all":
        rest = words[1:]
        if rest[-1] == "shapes":
            return obj["colour"] == rest[0]
        return obj["shape"] + "s" == rest[0]
    rest = words[1:]
    size = rest.pop(0) if rest[0] in ("small", "large") else None
    colour, shape, where = rest[0], rest[1], rest[2:]
    if (obj["colour"], obj["shape"]) != (colour, shape) or (size and obj["size"] != size):
        return False
    if where:
        ys, xs = np.nonzero(obj["mask"])
        n = obj["mask"].shape[0]
        cx, cy = (xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n
        side = where[-1]
        return {"left": cx < 1 / 3, "right": cx > 2 / 3, "top": cy < 1 / 3, "bottom": cy > 2 / 3}[side]
    return True


def test_files_manifest_and_validity(shapes_dir):
    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        for task, name in manifest["files"][split].items():
            recs = read_jsonl(shapes_dir / name)
            assert len(recs) == manifest["splits"][split]["records"][task] > 0, (split, task)
            assert all(r["task"] == task for r in recs)
            for r in recs:
                assert validate_record(r, name, image_root=shapes_dir, check_images=True) == []
                assert count_seg_tokens(r["messages"]) == len(r["targets"])
                placeholder_region_indices(r)
    train_images = {r["image"] for r in read_jsonl(shapes_dir / "train_roc.jsonl")}
    val_images = {r["image"] for r in read_jsonl(shapes_dir / "val_roc.jsonl")}
    assert train_images and val_images and not train_images & val_images
    assert len(list((shapes_dir / "images").glob("*.png"))) == 48


def test_vocabulary_coverage(shapes_dir):
    objs = [o for v in objects_by_image(shapes_dir, "train").values() for o in v]
    assert {o["shape"] for o in objs} == set(synthetic.SHAPES)
    assert {o["colour"] for o in objs} == set(synthetic.COLOURS)
    assert {o["size"] for o in objs} == {"small", "large"}
    counts = Counter(len(v) for v in objects_by_image(shapes_dir, "train").values())
    assert max(counts) <= 6


def test_res_expressions_are_unique_and_match_their_target(shapes_dir):
    objs = objects_by_image(shapes_dir, "train")
    n = 0
    for r in read_jsonl(shapes_dir / "train_res.jsonl"):
        expr = r["meta"]["expression"]
        assert r["messages"][0]["content"] == f"Please segment: {expr}."
        hits = [o for o in objs[r["meta"]["image_index"]] if matches(expr, o)]
        assert len(hits) == 1, expr
        assert np.array_equal(hits[0]["mask"], decode_rle(r["targets"][0]["masks"][0]))
        n += 1
    assert n > 40


def test_res_difficulty_says_what_tells_the_target_apart(shapes_dir):
    objs = objects_by_image(shapes_dir, "train")
    seen = Counter()
    for r in read_jsonl(shapes_dir / "train_res.jsonl"):
        words = r["meta"]["expression"].split()
        colour = next(w for w in words if w in synthetic.COLOURS)
        shape = words[words.index(colour) + 1]
        others = objs[r["meta"]["image_index"]]
        same_colour = [o for o in others if o["colour"] == colour]
        same_kind = [o for o in same_colour if o["shape"] == shape]
        want = "colour_only" if len(same_colour) == 1 else "needs_shape" if len(same_kind) == 1 else "needs_size_or_position"
        assert r["meta"]["difficulty"] == want, r["meta"]
        assert (len(words) > 3) == (want == "needs_size_or_position")  # the expression names size or position
        seen[want] += 1
    assert set(seen) <= set(synthetic.DIFFICULTIES) and seen["colour_only"] and seen["needs_shape"]


def test_gres_targets_are_exactly_the_matching_objects(shapes_dir):
    objs = objects_by_image(shapes_dir, "train")
    kinds = Counter()
    for r in read_jsonl(shapes_dir / "train_gres.jsonl"):
        expr = r["meta"]["expression"]
        want = [o["mask"] for o in objs[r["meta"]["image_index"]] if matches(expr, o)]
        got = [decode_rle(m) for m in r["targets"][0]["masks"]]
        assert len(got) == len(want) and all(any(np.array_equal(g, w) for w in want) for g in got), expr
        kinds[r["meta"]["kind"]] += 1
        if r["meta"]["kind"] == "multi":
            assert len(got) >= 2
    assert kinds["none"] == 40 and kinds["multi"] > 10  # one no-target expression per image


def test_captions_gcg_roc_dlres(shapes_dir):
    caps = read_jsonl(shapes_dir / "train_region_caption.jsonl")
    assert any("partly hidden behind" in r["messages"][1]["content"] for r in caps)
    for r in caps:
        m = r["meta"]
        assert r["messages"][1]["content"].startswith(f"A {m['size']} {m['category'].replace('_', ' ')} ")
    for r in read_jsonl(shapes_dir / "train_roc.jsonl"):
        assert r["messages"][1]["content"] == r["meta"]["category"].replace("_", " ")
    for r in read_jsonl(shapes_dir / "train_gcg.jsonl"):
        text = r["messages"][1]["content"]
        assert gcg_phrases(text) == r["meta"]["phrases"] and len(r["targets"]) == len(r["meta"]["phrases"])
    dl = read_jsonl(shapes_dir / "train_dlres.jsonl")
    assert dl and all(r["meta"]["rewriter"] == "rule" and r["meta"]["expression"].startswith("the ") for r in dl)
    assert all(r["regions"][0]["in_prompt"] is False and r["regions"][0]["target_index"] == 0 for r in dl)
    # the dlres path really went through the Describe Anything layout
    assert list((shapes_dir / "dam" / "train" / "shapesref" / "images").glob("shard-*.tar"))
    assert (shapes_dir / "dam" / "train" / "shapesref" / "annotations.json").is_file()


def test_deterministic_per_seed(shapes_dir, tmp_path):
    again = tmp_path / "again"
    assert main(["synthetic", "--n", "40", "--n-val", "8", "--seed", "3", "--out", str(again), "--shard-size", "16"]) == 0
    for name in ("manifest.json", "train_res.jsonl", "val_gcg.jsonl", "train_dlres.jsonl", "images/train-000007.png"):
        assert (again / name).read_bytes() == (shapes_dir / name).read_bytes(), name
    other = tmp_path / "other"
    synthetic.build(synthetic.ShapesRefOptions(out=other, n=5, n_val=1, seed=4))
    assert (other / "images" / "train-000001.png").read_bytes() != (shapes_dir / "images" / "train-000001.png").read_bytes()


def test_rebuild_in_place_and_foreign_folder(tmp_path):
    out = tmp_path / "s"
    synthetic.build(synthetic.ShapesRefOptions(out=out, n=3, n_val=1, seed=0))
    synthetic.build(synthetic.ShapesRefOptions(out=out, n=3, n_val=1, seed=1))  # the seed-0 dam parts must not be reused
    fresh = tmp_path / "fresh"
    synthetic.build(synthetic.ShapesRefOptions(out=fresh, n=3, n_val=1, seed=1))
    assert (out / "train_dlres.jsonl").read_bytes() == (fresh / "train_dlres.jsonl").read_bytes()
    foreign = tmp_path / "f"
    (foreign / "dam" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no ShapesRef manifest"):
        synthetic.build(synthetic.ShapesRefOptions(out=foreign, n=1, n_val=1))
    assert (foreign / "dam" / "train").is_dir()
