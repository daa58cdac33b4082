"""Shared fixtures: a tiny ShapesRef copy (training tests), tiny models for inference, clean global state.

Inference fixtures: ``tiny_model`` (random, from the tiny preset), ``seg_model`` (the same, rigged by
:func:`fclm.testing.rig_seg_answers` to always answer ``[SEG]``, so the grounding path runs end to end),
their exported directories (``tiny_model_dir``, ``seg_model_dir``) and a small random ``image``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ShapesRef (24 train / 4 val images) built with the real builder."""
    from data_builders.synthetic import ShapesRefOptions, build

    out = tmp_path_factory.mktemp("shapesref")
    build(ShapesRefOptions(out=out, n=24, n_val=4, seed=0))
    return out


_TORCH_LINEAR = torch.nn.functional.linear
"""torch's own ``F.linear``, taken before any test (or module-scoped fixture) can start DeepSpeed's zero.Init."""


@pytest.fixture(autouse=True)
def _clean_state():
    """One torch thread (the CPU is shared), and accelerate / env / threads / denormal flushing / ``F.linear`` restored after each test."""
    threads = torch.get_num_threads()
    env = dict(os.environ)
    linear = _TORCH_LINEAR  # DeepSpeed's zero.Init can leave its zero3_linear_wrap installed (also from module fixtures)
    torch.nn.functional.linear = linear
    torch.set_num_threads(1)
    yield
    torch.nn.functional.linear = linear
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # programs run in-process set it; hypothesis refuses to run with it on
    os.environ.clear()
    os.environ.update(env)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_image(h: int = 40, w: int = 50, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))



@pytest.fixture(scope="session")
def tiny_model():
    from fclm.config import preset
    from fclm.model import build_fclm

    torch.manual_seed(0)
    return build_fclm(preset("tiny")).eval()


@pytest.fixture(scope="session")
def new_seg_model():
    """A factory of fresh rigged tiny models (for tests that change a model, e.g. its dtype)."""
    from fclm.config import preset
    from fclm.model import build_fclm

    from fclm.testing import rig_seg_answers

    def make():
        torch.manual_seed(0)
        return rig_seg_answers(build_fclm(preset("tiny")).eval())

    return make


@pytest.fixture(scope="session")
def seg_model(new_seg_model):
    return new_seg_model()


@pytest.fixture(scope="session")
def seg_model_dir(seg_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg_model")
    seg_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_model")
    tiny_model.save_pretrained(out)
    return out


@pytest.fixture
def image() -> Image.Image:
    return make_image()
