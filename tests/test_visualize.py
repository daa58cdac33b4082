"""fclm.visualize: segment tints and boxes, dashed region outlines, the legend strip, the PNG file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fclm.inference import Answer, FCLMPredictor, Instance, ResolvedRegion, Segment
from fclm.masks import mask_to_box
from fclm.visualize import FILL_ALPHA, MIN_WIDTH, overlay, save_overlay, segment_color

H, W = 40, 50


def _mask(y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y1:y2, x1:x2] = True
    return m


def _answer(segments: list[Segment], regions: list[ResolvedRegion] = (), text: str = "[SEG]") -> Answer:
    return Answer(text=text, segments=segments, regions=list(regions), finish_reason="stop",
                  prompt_tokens=12, completion_tokens=2, image_size=(H, W))


def _tinted(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (1 - FILL_ALPHA) * rgb.astype(float) + FILL_ALPHA * np.asarray(colour, float)


def _segments() -> tuple[np.ndarray, np.ndarray, list[Segment]]:
    a, b = _mask(10, 30, 5, 20), _mask(20, 38, 25, 45)
    return a, b, [Segment("red cup", "sam", [Instance(a, mask_to_box(a), 0.9)]),
                  Segment("", "sam", [Instance(b, mask_to_box(b), 0.4)])]


def test_segments_are_tinted_in_distinct_colours_and_boxed(image):
    a, b, segments = _segments()
    out = overlay(image, _answer(segments))
    s = out.width // W
    # upscaled by a whole factor to at least MIN_WIDTH, with the legend strip below
    assert out.width == W * s and s > 1 and out.width >= MIN_WIDTH and out.height > H * s
    px = np.asarray(out)
    src = np.asarray(image)
    for (y, x), k in (((20, 12), 0), ((29, 35), 1)):  # well inside segment k's mask
        got = px[y * s + s // 2, x * s + s // 2].astype(float)
        assert np.abs(got - _tinted(src[y, x], segment_color(k))).max() <= 1
    assert segment_color(0) != segment_color(1)
    # each instance's box is drawn in its segment's colour (the middle of its left side)
    for (x1, y1, x2, y2), k in ((mask_to_box(a), 0), (mask_to_box(b), 1)):
        assert tuple(px[int((y1 + y2) / 2 * s), int(x1 * s)]) == segment_color(k)
    # outside every mask and box the image is only upscaled
    assert tuple(px[2 * s + s // 2, 48 * s + s // 2]) == tuple(src[2, 48])


def test_input_regions_are_dashed_outlines_only(image):
    region = _mask(3, 15, 28, 46)
    answer = _answer([], [ResolvedRegion(region, "box", "sam", 0.9, {"box": [28, 3, 46, 15]})], text="A cat.")
    px = np.asarray(overlay(image, answer))
    s = px.shape[1] // W
    top_row = px[3 * s, 28 * s: 46 * s]  # the outline runs along the region's top edge
    white = (top_row == 255).all(axis=1)
    black = (top_row == 0).all(axis=1)
    assert (white | black).all() and white.any() and black.any()  # dashed: both colours, nothing else
    src = np.asarray(image)
    assert tuple(px[9 * s + s // 2, 37 * s + s // 2]) == tuple(src[9, 37])  # the inside is not filled
    # regions=False leaves them out
    plain = np.asarray(overlay(image, answer, regions=False))
    assert tuple(plain[3 * s, 30 * s]) == tuple(src[3, 30])


def test_an_answer_without_segments_renders_and_long_text_wraps(image):
    short = overlay(image, _answer([], text="A small picture."))
    s = short.width // W
    assert np.array_equal(np.asarray(short)[: H * s], np.asarray(image.resize((W * s, H * s), Image.NEAREST)))
    assert short.height > H * s  # the legend holds the answer text
    long = overlay(image, _answer([], text="word " * 200))
    assert long.width == short.width and long.height > short.height
    empty = overlay(image, _answer([Segment("nothing", "sam", [])], text=""))  # a [SEG] with no mask
    assert empty.height > H * s


def test_an_image_of_another_size_is_refused(image):
    with pytest.raises(ValueError, match="50×40 image, but the image is 30×20"):
        overlay(image.resize((30, 20)), _answer([]))


def test_save_overlay_of_a_model_answer_writes_a_png(seg_model, image, tmp_path):
    predictor = FCLMPredictor(seg_model)
    predictor.set_image(image)
    answer = predictor.ask("What is <region>?", regions=[{"box": [5, 5, 30, 30]}], max_new_tokens=4)
    assert answer.segments and answer.segments[0].instances  # the rigged model answers [SEG] with a mask
    path = save_overlay(tmp_path / "out" / "overlay.png", image, answer)
    assert sorted(p.name for p in path.parent.iterdir()) == ["overlay.png"]  # no temporary file left
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        px = np.asarray(saved.convert("RGB"))
    s = px.shape[1] // W
    assert px.shape[0] > H * s
    # the centre of a mask pixel carries the segment's tint: the edge lines (3 px at this scale) stay
    # within the outer band of each s×s block, away from its centre
    clean = answer.segments[0].union(H, W)
    x1, y1 = (int(v) for v in answer.segments[0].instances[0].box[:2])
    clean[: y1 + 3, : x1 + 3] = False  # the segment's number tag sits at its box's top-left corner
    ys, xs = np.nonzero(clean)
    assert len(ys)
    y, x = ys[len(ys) // 2], xs[len(xs) // 2]
    got = px[y * s + s // 2, x * s + s // 2].astype(float)
    assert np.abs(got - _tinted(np.asarray(image)[y, x], segment_color(0))).max() <= 1
