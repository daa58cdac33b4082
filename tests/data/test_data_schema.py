"""The record schema: what validate_record accepts and each problem it names; placeholder mapping."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fclm.data.schema import (
    TASKS,
    check_record,
    make_record,
    placeholder_region_indices,
    region_entry,
    target_entry,
    validate_record,
    xywh_to_xyxy,
)
from fclm.masks import encode_mask


def rle(h=20, w=30, y=(2, 9), x=(3, 12)):
    m = np.zeros((h, w), bool)
    m[y[0] : y[1], x[0] : x[1]] = True
    return encode_mask(m)


def base(**kw) -> dict:
    rec = make_record(
        id="a", image="img.png", task="res",
        messages=[{"role": "user", "content": "Please segment: x."}, {"role": "assistant", "content": "[SEG]"}],
        targets=[target_entry([rle()], [[3, 2, 12, 9]])],
    )
    rec.update(kw)
    return rec


def test_valid_records_of_every_shape_pass(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "img.png")
    region = region_entry(rle(), [3, 2, 12, 9])
    recs = [
        base(),
        base(task="gres", targets=[target_entry()]),  # no target
        base(task="gres", targets=[target_entry([rle(), rle(y=(10, 15))], [[3, 2, 12, 9], [3, 10, 12, 15]])]),
        base(task="region_caption", messages=[{"role": "user", "content": "Describe <region> in detail."},
                                              {"role": "assistant", "content": "a box"}], regions=[region], targets=[]),
        base(task="dlres", regions=[region_entry(rle(), [3, 2, 12, 9], target_index=0, in_prompt=False)]),
        base(task="conversation", messages=[
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "There are 2 regions: region1 <region1>, region2 <region2>. Is region1 left of region2?"},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And <region2>?"},
            {"role": "assistant", "content": "No."}], regions=[region, region], targets=[]),
        base(targets=[{"masks": [[[3, 2, 12, 2, 12, 9, 3, 9]]], "boxes": [[3, 2, 12, 9]]}]),  # polygon mask
    ]
    for r in recs:
        assert validate_record(r, "f:1", image_root=tmp_path, check_images=True) == [], r["task"]
    assert set(TASKS) >= {r["task"] for r in recs}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("targets"), "missing key(s): targets"),
        (lambda r: r.update(task="segment"), "unknown task 'segment'"),
        (lambda r: r.update(id=""), "'id' must be a non-empty string"),
        (lambda r: r.update(messages=[{"role": "bot", "content": "x"}]), "messages[0] must be"),
        (lambda r: r.update(messages=[{"role": "user", "content": "x"}]), "no assistant turn"),
        (lambda r: r["messages"][1].update(content="[SEG] [SEG]"), "2 [SEG] token(s) in the assistant turns but 1 target(s)"),
        (lambda r: r["messages"][1].update(content="<region> [SEG]"), "(assistant) contains a <region> placeholder"),
        (lambda r: r["targets"].append(target_entry()), "1 [SEG] token(s) in the assistant turns but 2 target(s)"),
        (lambda r: r["targets"][0].update(masks=[rle()], boxes=[]), "has 1 mask(s) but 0 box(es)"),
        (lambda r: r["targets"][0].update(masks=[{"size": [20, 30], "counts": "0000zz"}]), "bad RLE"),
        (lambda r: r["targets"][0].update(masks=[{"size": [20, 30], "counts": "N<"}]), "bad RLE"),
        (lambda r: r["targets"][0].update(masks=[rle(y=(0, 0))]), "is empty"),
        (lambda r: r["targets"][0].update(masks=[[[1, 1, 5, 5]]]), "polygon 0 has 2 points"),
        (lambda r: r["targets"][0].update(masks=[rle(10, 10)]), "has size [10, 10] but the image is [20, 30]"),
        (lambda r: r["targets"][0].update(boxes=[[12, 2, 3, 9]]), "x2 < x1"),
        (lambda r: r["targets"][0].update(boxes=[[3, 2, 40, 9]]), "ends outside the 30x20"),
        (lambda r: r["targets"][0].update(boxes=[[3, 2, 12]]), "must be 4 finite numbers"),
        (lambda r: r.update(regions=[region_entry(rle(), [3, 2, 12, 9])]), "1 prompt region(s) but no <region> placeholder"),
        (lambda r: r.update(regions=[region_entry(rle(), [3, 2, 12, 9], target_index=3, in_prompt=False)]), "target_index 3 is not"),
        (lambda r: r.update(regions=[{"mask": rle(), "box": [3, 2, 12, 9], "in_prompt": False}]), "in_prompt false but no target_index"),
    ],
)
def test_each_problem_is_named(tmp_path, change, message):
    Image.new("RGB", (30, 20)).save(tmp_path / "img.png")
    rec = base()
    change(rec)
    problems = validate_record(rec, "data.jsonl:7", image_root=tmp_path, check_images=True)
    assert problems and all(p.startswith("data.jsonl:7: ") for p in problems)
    assert any(message in p for p in problems), problems


def test_images_checked_only_when_asked(tmp_path):
    rec = base(image="missing.png")
    assert validate_record(rec, "w") == []
    assert "image not found" in validate_record(rec, "w", image_root=tmp_path, check_images=True)[0]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert "image does not open" in validate_record(base(image="bad.png"), "w", image_root=tmp_path, check_images=True)[0]


def test_without_decoding_sizes_and_structure_are_still_checked():
    rec = base()
    rec["targets"][0]["masks"].append(rle(10, 10))
    rec["targets"][0]["boxes"].append([0, 0, 1, 1])
    assert any("has size [10, 10]" in p for p in check_record(rec, decode_masks=False))
    rec = base(targets=[{"masks": [{"size": [20], "counts": "x"}], "boxes": [[0, 0, 1, 1]]}])
    assert any("bad RLE" in p for p in check_record(rec, decode_masks=False))


def test_placeholder_mapping():
    r = lambda: region_entry(rle(), [3, 2, 12, 9])  # noqa: E731
    latent = region_entry(rle(), [3, 2, 12, 9], target_index=0, in_prompt=False)
    rec = {"messages": [{"role": "user", "content": "<region> and <region>"}], "regions": [r(), latent, r()]}
    assert placeholder_region_indices(rec) == [0, 2]  # in_prompt=false regions are skipped
    rec = {"messages": [{"role": "user", "content": "<region2> then <region1>, again <region2>"}], "regions": [latent, r(), r()]}
    assert placeholder_region_indices(rec) == [2, 1, 2]
    with pytest.raises(ValueError, match="mix"):
        placeholder_region_indices({"messages": [{"role": "user", "content": "<region> <region1>"}], "regions": [r()]})
    with pytest.raises(ValueError, match="named by no"):
        placeholder_region_indices({"messages": [{"role": "user", "content": "<region1>"}], "regions": [r(), r()]})
    with pytest.raises(ValueError, match=r"<region3>"):
        placeholder_region_indices({"messages": [{"role": "user", "content": "<region1> <region3>"}], "regions": [r()]})
    # placeholders in assistant turns are not counted as prompts
    assert placeholder_region_indices({"messages": [{"role": "assistant", "content": "<region>"}], "regions": []}) == []


@pytest.mark.parametrize("digit", ["\u0661", "\u06f1", "\u0967", "\uff11", "\U0001d7d9", "\u00b9"])
def test_only_ascii_digits_number_a_region_placeholder(digit):
    """``<region١>`` (Arabic-Indic one, Devanagari, fullwidth, mathematical, superscript …) is plain text,
    not the first region: with ``\\d`` it was counted, and ``int()`` read it as 1."""
    r = region_entry(rle(), [3, 2, 12, 9])
    text = f"What is <region{digit}>?"
    assert placeholder_region_indices({"messages": [{"role": "user", "content": text}], "regions": []}) == []
    with pytest.raises(ValueError, match="no <region> placeholder"):
        placeholder_region_indices({"messages": [{"role": "user", "content": text}], "regions": [r]})
    rec = base(task="region_caption", messages=[{"role": "user", "content": text}, {"role": "assistant", "content": "x"}],
               regions=[r], targets=[])
    assert any("no <region> placeholder" in p for p in check_record(rec))
    ok = base(task="region_caption", messages=[{"role": "user", "content": f"<region1> is not <region{digit}>"},
                                               {"role": "assistant", "content": f"<region{digit}>"}], regions=[r], targets=[])
    assert check_record(ok) == []  # and in an assistant turn it is no placeholder either


def test_xywh_to_xyxy_refuses_non_finite_boxes():
    for bad in ([float("nan"), 0, 1, 1], [0, 0, float("inf"), 1], [1e308, 0, 1e308, 1]):
        with pytest.raises(ValueError, match="not finite"):
            xywh_to_xyxy(bad)


def test_constructors():
    assert xywh_to_xyxy([1, 2, 3, 4]) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="one box per mask"):
        target_entry([rle()], [])
    with pytest.raises(ValueError, match="unknown task"):
        make_record(id="x", image="y", task="nope", messages=[])
    assert list(make_record(id="x", image="y", task="res", messages=[], head="igvg")) == [
        "id", "image", "task", "head", "messages", "regions", "targets", "meta"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.lists(st.sampled_from(["id", "image", "task", "messages", "regions", "targets", "meta", 0, 1, "masks", "boxes",
                                      "mask", "box", "size", "counts", "role", "content", "target_index", "in_prompt"]),
                     min_size=1, max_size=4), value=_json)
def test_mutated_records_never_crash_the_checker(path, value):
    """Any value at any place in a record gives a list of problems, never an exception."""
    rec = base(regions=[region_entry(rle(), [3, 2, 12, 9], target_index=0, in_prompt=False)])
    node = rec
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    try:
        node[path[-1]] = copy.deepcopy(value)
    except (TypeError, IndexError):
        pass
    assert isinstance(check_record(rec), list)
    assert isinstance(check_record(rec, decode_masks=False), list)
