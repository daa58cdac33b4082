"""Shared fixtures: a tiny ShapesRef copy (training tests), tiny models for inference, clean global state.

Inference fixtures:
A random tiny LLM almost never generates ``[SEG]``. :func:`rig_seg_answers` edits three weight rows so
that it always answers exactly ``[SEG]<|im_end|>`` — through real generation, real hidden states and the
real heads — which lets tests and the CLIs exercise the grounding path end to end:

* the embedding of the prompt's last token (the ``\\n`` after ``assistant``) becomes ``-big · e`` and
  that of ``[SEG]`` becomes ``+big · e`` (a large residual dominates the last hidden state's direction);
* ``lm_head`` rows: ``[SEG]`` = ``-e``, ``<|im_end|>`` = ``+e``, every other row 0.
So after the prompt ``[SEG]`` wins, and after ``[SEG]`` ``<|im_end|>`` wins.
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


@pytest.fixture(autouse=True)
def _clean_state():
    """One torch thread (the CPU is shared), and accelerate / env / threads / denormal flushing restored after each test."""
    threads = torch.get_num_threads()
    env = dict(os.environ)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # programs run in-process set it; hypothesis refuses to run with it on
    os.environ.clear()
    os.environ.update(env)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def rig_seg_answers(model, scale: float = 200.0):
    """Make ``model`` answer ``[SEG]`` then stop, for any prompt (see module docstring)."""
    qwen = model.qwen
    ids = model.token_ids
    last = model.processor._text("assistant\n")[-1]
    emb = qwen.get_input_embeddings().weight
    g = torch.Generator().manual_seed(1)
    e = torch.randn(emb.shape[1], generator=g)
    e = e / e.norm()
    with torch.no_grad():
        emb[last] = -scale * e
        emb[ids["seg"]] = scale * e
        qwen.lm_head.weight.zero_()
        qwen.lm_head.weight[ids["seg"]] = -e
        qwen.lm_head.weight[ids["im_end"]] = e
    return model


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
