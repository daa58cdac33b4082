"""Corrupt compressed RLE is caught before decoding (fclm.masks.rle_run_lengths)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fclm.masks import decode_mask, decode_rle, encode_mask, rle_run_lengths


def runs_of(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.nonzero(np.diff(flat))[0] + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] == 1 else runs


def test_run_lengths_match_the_mask():
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = rng.integers(1, 90, 2)
        m = rng.random((h, w)) < rng.random()
        if t % 3 == 0:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):, rng.integers(0, w):] = True
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_run_lengths(r["counts"]).tolist() == runs_of(m)
        assert np.array_equal(decode_rle(encode_mask(m)), m)


@pytest.mark.parametrize("counts", ["", "0", "zz", "\x7f", "1a", "01"])
def test_corrupt_strings_raise(counts):
    with pytest.raises(ValueError, match="corrupt RLE"):
        decode_rle({"size": [20, 30], "counts": counts})


def test_huge_size_with_short_counts_is_refused_before_decoding():
    rle = encode_mask(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="pixel limit"):  # refused on its size alone, before its counts are read
        decode_rle({"size": [200_000, 200_000], "counts": rle["counts"]})
    with pytest.raises(ValueError, match="expected H\\*W"):
        decode_rle({"size": [10_000, 10_000], "counts": rle["counts"]})


@pytest.mark.parametrize("polygon", [
    [[0, 0, float("nan"), 0, 5, 5]], [[0, 0, float("inf"), 0, 5, 5]], [[0, 0, 1e9, 0, 1e9, 1e9]], [[0, 0, -3e9, 0, 5, 5]],
    [[0, 0, 100, 0, 0, 100, 100, 100] * 3000],  # inside the bound but a 1.4M-px zigzag perimeter
    [[0, 0, True, 0, 5, 5]], [["1", 0, 5, 0, 5, 5]],
])
def test_hostile_polygons_are_errors_not_crashes(polygon):
    # pycocotools' 32-bit rasteriser segfaults or exhausts memory on these: they must never reach it
    with pytest.raises(ValueError, match="polygon 0"):
        decode_mask(polygon, 120, 120)


@pytest.mark.parametrize("rle", [
    {"size": [60000, 60000], "counts": [3600000000]},
    {"size": [100000, 100000], "counts": [10000000000]},
    {"size": [2**31, 2**31], "counts": "0"},
])
def test_huge_declared_sizes_are_refused_before_decoding(rle):
    with pytest.raises(ValueError, match="differs from image size"):
        decode_mask(rle, 40, 50)
    with pytest.raises(ValueError, match="pixel limit"):
        decode_mask(rle)
