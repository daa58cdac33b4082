"""Resumable training checkpoints, written atomically, the newest ``keep_last`` kept.

A checkpoint is a folder ``<root>/step-00001234/`` holding

* the trainable weights: ``model.safetensors`` (plain / DDP runs), or DeepSpeed's own files under
  ``deepspeed/`` (ZeRO partitions of weights and optimizer state, frozen weights excluded);
* ``optimizer.pt`` (plain / DDP), ``scheduler.pt``;
* ``rng_state_<rank>.pt`` per process (python, numpy, torch, CUDA generators);
* ``trainer_state.json``: step, data position (the batch sampler's ``state_dict``), counters, and
  the run's config (``fclm-train export`` rebuilds the model from it).

Atomicity: everything is written into ``<root>/.tmp-step-…`` and the folder is renamed to its final
name only when every process has finished writing, so a checkpoint folder exists only if it is
complete; a run killed while saving leaves a ``.tmp-*`` folder that the next save removes.
``latest`` (a text file, replaced atomically) names the newest one.

Frozen weights are not saved: a resumed run rebuilds them the same way (from the pretrained files,
the stage-1 export, or the seed), and :func:`load_checkpoint` checks that the file holds exactly the
trainable parameters (missing / unexpected keys are an error).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fclm.io import write_json
from fclm.training.trainability import trainable_names, tracked_names

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^step-(\d{8})$")
STATE_NAME = "trainer_state.json"
MODEL_NAME = "model.safetensors"
DS_TAG = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME_RE.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``None`` if there is none)."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The state of every random generator a training step uses, as tensors and plain data
    (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_keys(expected: list[str], found: list[str], where: str) -> None:
    """After a non-strict load: the file must hold exactly the trainable parameters."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model's trainable parameters: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]} "
            "(was it written with another trainability policy or model config?)"
        )


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    root: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (call on every process); return its folder."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if _is_deepspeed(accelerator):
        model.save_checkpoint(str(tmp), tag=DS_TAG, exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        names = set(tracked_names(unwrapped))
        state = {k: v.detach().to("cpu").contiguous() for k, v in unwrapped.state_dict().items() if k in names}
        save_file(state, str(tmp / MODEL_NAME))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(capture_rng(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / STATE_NAME, {**trainer_state, "step": step, "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (a resumed run that re-reached it)
            shutil.rmtree(final)
        tmp.rename(final)
        with open(root / ".latest.tmp", "w") as f:
            f.write(final.name + "\n")
        (root / ".latest.tmp").replace(root / "latest")
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint ({STATE_NAME} missing)")
    return json.loads(state_file.read_text())


def load_trainable_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's trainable weights into an unwrapped model (plain or DeepSpeed files), keys checked."""
    path = Path(path)
    if (path / MODEL_NAME).is_file():
        state = load_file(str(path / MODEL_NAME))
        where = path / MODEL_NAME
    elif (path / DS_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG, exclude_frozen_parameters=True)
        # DeepSpeed adds the module's buffers; only those training updates are restored, the rest are rebuilt.
        fixed = {n for n, _ in model.named_buffers()} - set(tracked_names(model))
        state = {k: v for k, v in state.items() if k not in fixed}
        where = path / DS_TAG
    else:
        raise CheckpointError(f"{path} holds no model weights ({MODEL_NAME} or {DS_TAG}/)")
    check_keys(tracked_names(model), list(state), str(where))
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


def load_checkpoint(accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, path: str | Path) -> dict[str, Any]:
    """Restore model (trainable weights), optimizer, scheduler and this process's RNG from ``path``.

    Returns the trainer state (step, data position, counters). Call on every process.
    """
    path = Path(path)
    state = read_trainer_state(path)
    if state.get("world_size", accelerator.num_processes) != accelerator.num_processes and _is_deepspeed(accelerator):
        logger.warning("%s was saved by %s processes, resuming on %s", path, state["world_size"], accelerator.num_processes)
    if _is_deepspeed(accelerator):
        # ZeRO-1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_<r>_… file per rank; both keep the module's keys.
        for name in ("mp_rank_00_model_states.pt", f"zero_pp_rank_{accelerator.process_index}_mp_rank_00_model_states.pt"):
            module_file = path / DS_TAG / name
            if module_file.is_file():
                saved = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
                buffers = {n for n, _ in model.module.named_buffers()}
                check_keys(trainable_names(model.module), [k for k in saved if k not in buffers], str(module_file))
                break
        else:
            raise CheckpointError(f"{path / DS_TAG}: no DeepSpeed model-states file")
        load_path, _ = model.load_checkpoint(
            str(path), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / DS_TAG}")
    else:
        load_trainable_weights(accelerator.unwrap_model(model), path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s missing: this process's random generators start fresh", rng_file)
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_trainable_weights",
    "read_trainer_state",
    "list_checkpoints",
    "latest_checkpoint",
    "capture_rng",
    "restore_rng",
    "check_keys",
]
