"""Shared fixtures: a tiny ShapesRef copy (training tests), and clean global state around every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ShapesRef (24 train / 4 val images) built with the real builder."""
    from data_builders.synthetic import ShapesRefOptions, build

    out = tmp_path_factory.mktemp("shapesref")
    build(ShapesRefOptions(out=out, n=24, n_val=4, seed=0))
    return out


@pytest.fixture(autouse=True)
def _clean_state():
    """One torch thread (the CPU is shared), and accelerate / env / threads restored after each test."""
    threads = torch.get_num_threads()
    env = dict(os.environ)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
