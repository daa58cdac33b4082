"""Corrupt compressed RLE is caught before decoding (fclm.masks.rle_run_lengths)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fclm.masks import decode_rle, encode_mask, rle_run_lengths


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
    with pytest.raises(ValueError, match="expected H\\*W"):
        decode_rle({"size": [200_000, 200_000], "counts": rle["counts"]})
