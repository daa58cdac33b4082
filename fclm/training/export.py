"""Checkpoint → a model directory that ``FCLM.from_pretrained`` loads (``fclm-train export CKPT --out DIR``).

The model is rebuilt exactly as the run built it (its config is in the checkpoint; random frozen
weights come back from the same seed, and a fingerprint check proves it), the trainable weights are
loaded (plain ``model.safetensors`` or DeepSpeed ZeRO partitions, consolidated on CPU), LoRA and the
new token rows are merged into the base weights, and ``FCLM.save_pretrained`` writes the backbone in
Hugging Face format, the extra modules, the config, tokenizer and processor. The directory is
written beside its final name and renamed into place, so a killed export leaves no half directory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from fclm.training.building import build_model, weights_fingerprint
from fclm.training.checkpoint import CheckpointError, latest_checkpoint, load_trainable_weights, read_trainer_state
from fclm.training.config import train_config_from_dict
from fclm.training.trainability import apply_trainability, merge_adapters

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's ``output_dir`` / ``checkpoints`` folder (its newest checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "trainer_state.json").is_file():
            return candidate
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path}: no complete checkpoint there (nor under {path / 'checkpoints'})")


def load_model_from_checkpoint(path: str | Path) -> torch.nn.Module:
    """The trained model of a checkpoint, with LoRA still separate (``merge_adapters`` folds it in)."""
    from accelerate.utils import set_seed

    ckpt = resolve_checkpoint(path)
    state = read_trainer_state(ckpt)
    if "config" not in state:
        raise CheckpointError(f"{ckpt}: trainer_state.json has no run config")
    cfg = train_config_from_dict(state["config"], check_files=False)
    set_seed(cfg.seed)  # as setup() did before building: random frozen weights come back identical
    model = build_model(cfg)
    apply_trainability(model, cfg.trainability)
    expected = state.get("frozen_fingerprint")
    if expected is not None and weights_fingerprint(model) != expected:
        raise CheckpointError(f"{ckpt}: the rebuilt frozen weights differ from the run's (fingerprint {expected})")
    load_trainable_weights(model, ckpt)
    return model


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write the merged model of checkpoint ``path`` to ``out`` (replacing it); return ``out``."""
    out = Path(out)
    model = load_model_from_checkpoint(path)
    merge_adapters(model)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("exported %s → %s", resolve_checkpoint(path), out)
    return out


__all__ = ["export_checkpoint", "load_model_from_checkpoint", "resolve_checkpoint"]
