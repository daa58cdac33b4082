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

A checkpoint folder may come from someone else, and unpickling can run any code a file names (a
crafted one ran a shell command). So nothing of it is unpickled with ``weights_only=False``: before
loading, every ``*.pt`` is checked with ``torch.load(weights_only=True)`` (DeepSpeed's files may also
hold the few harmless classes of :func:`deepspeed_safe_globals`) and a file that needs anything else
is refused with a :class:`CheckpointError` naming it; DeepSpeed's own loaders then run under
:func:`weights_only_loads`, which makes their ``torch.load(weights_only=False)`` calls restricted too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

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
# reading pickles: tensors and plain data only
# --------------------------------------------------------------------------------------------------


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed's checkpoint files pickle besides tensors and plain data (its optimizer-state files).

    Found by saving real checkpoints on CPU (ZeRO-2, ZeRO-3, ZeRO-2 with offload and DeepSpeed's optimizer
    block; fp32, bf16, fp16) and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``; the
    model-states files need none. ``tests/training/test_checkpoint_security.py`` checks the list still
    covers real ZeRO-2/3 files. Each is a plain record, harmless to rebuild: the restricted unpickler may
    only call its constructor with plain-data arguments or fill its ``__dict__`` (none defines
    ``__setstate__`` / ``__reduce__`` hooks that act), and nothing here is a function or can reach one.

    * ``ZeroStageEnum``: an ``int`` enum (stages 0–3); building one only looks the value up.
    * ``fragment_address``: a dataclass ``(numel, start)``, where a parameter lies in a flat partition.
    * ``LossScaler`` / ``DynamicLossScaler``: the loss-scale counters (static; fp16's dynamic one);
      their constructors only store the numbers (and a ``torch.dtype``) they are given.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _refusal(e: pickle.UnpicklingError) -> str:
    """Why torch's restricted unpickler refused a file, in one line (its message advises weights_only=False)."""
    m = re.search(r"GLOBAL (\S+)", str(e))
    if m:
        return f"it would import {m.group(1)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (detail or lines or [type(e).__name__])[-1]


def safe_torch_load(file: str | Path, *, allowed: Sequence[type] = (), mmap: bool = False) -> Any:
    """``torch.load(file, weights_only=True)`` on CPU, also admitting the ``allowed`` classes.

    A file needing anything else (a pickle that imports ``os.system``, …) raises :class:`CheckpointError`
    naming it: nothing in it has run. ``mmap``: map the tensors instead of reading them (zip files only).
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused: {_refusal(e)} (only tensors and plain data are loaded)") from None
    except (RuntimeError, ValueError, EOFError) as e:  # corrupt, truncated, a TorchScript archive, …
        raise CheckpointError(f"{file}: not a readable torch file ({type(e).__name__}: {e})") from e


def _is_zip(file: Path) -> bool:
    """torch.save's zip format (the default, DeepSpeed's too): the only one ``mmap`` can read."""
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def verify_checkpoint_files(path: str | Path) -> None:
    """Check every ``*.pt`` under checkpoint ``path`` with the restricted loader before anything loads one.

    Files under ``deepspeed/`` may also hold :func:`deepspeed_safe_globals`. Tensors are memory-mapped,
    not read, so checking even large ZeRO partitions costs only their pickles. Raises
    :class:`CheckpointError` naming the first refused file.
    """
    path = Path(path)
    for file in sorted(path.rglob("*.pt")):
        in_deepspeed = file.relative_to(path).parts[0] == DS_TAG
        safe_torch_load(file, allowed=deepspeed_safe_globals() if in_deepspeed else (), mmap=_is_zip(file))


_FORCE_WO, _FORCE_NO_WO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads(where: str | Path) -> Iterator[None]:
    """While DeepSpeed reads checkpoint files (``where``): its own ``torch.load(weights_only=False)`` calls
    (engine resume, ``zero_to_fp32``) become restricted loads too, admitting :func:`deepspeed_safe_globals`.

    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at every ``torch.load`` and then ignores
    ``weights_only=False``. :func:`verify_checkpoint_files` has already checked the files (and named a bad
    one); this covers a file swapped in between and any DeepSpeed loader not audited here.
    """
    saved = {k: os.environ.pop(k, None) for k in (_FORCE_WO, _FORCE_NO_WO)}  # both set is an error in torch
    os.environ[_FORCE_WO] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refused: {_refusal(e)} (only tensors and plain data are loaded)") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    """Load a checkpoint's trainable weights into an unwrapped model (plain or DeepSpeed files), keys checked.

    Every pickle of the checkpoint is checked first (:func:`verify_checkpoint_files`), even those not read here:
    a checkpoint holding a crafted file is refused as a whole.
    """
    verify_checkpoint_files(path)
    _load_trainable_weights(model, Path(path))


def _load_trainable_weights(model: nn.Module, path: Path) -> None:
    """:func:`load_trainable_weights` of a checkpoint whose files are verified."""
    if (path / MODEL_NAME).is_file():
        state = load_file(str(path / MODEL_NAME))
        where = path / MODEL_NAME
    elif (path / DS_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads(path / DS_TAG):  # zero_to_fp32 calls torch.load(weights_only=False)
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
    verify_checkpoint_files(path)  # before this function or DeepSpeed unpickles any file of it
    if state.get("world_size", accelerator.num_processes) != accelerator.num_processes and _is_deepspeed(accelerator):
        logger.warning("%s was saved by %s processes, resuming on %s", path, state["world_size"], accelerator.num_processes)
    if _is_deepspeed(accelerator):
        # ZeRO-1/2 write mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_<r>_… file per rank; both keep the module's keys.
        for name in ("mp_rank_00_model_states.pt", f"zero_pp_rank_{accelerator.process_index}_mp_rank_00_model_states.pt"):
            module_file = path / DS_TAG / name
            if module_file.is_file():
                saved = safe_torch_load(module_file, allowed=deepspeed_safe_globals())["module"]
                buffers = {n for n, _ in model.module.named_buffers()}
                check_keys(trainable_names(model.module), [k for k in saved if k not in buffers], str(module_file))
                break
        else:
            raise CheckpointError(f"{path / DS_TAG}: no DeepSpeed model-states file")
        with weights_only_loads(path / DS_TAG):  # DeepSpeed's checkpoint engine calls torch.load(weights_only=False)
            load_path, _ = model.load_checkpoint(
                str(path), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / DS_TAG}")
    else:
        _load_trainable_weights(accelerator.unwrap_model(model), path)
        optimizer.load_state_dict(safe_torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(safe_torch_load(path / "scheduler.pt"))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        restore_rng(safe_torch_load(rng_file))
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
    "safe_torch_load",
    "verify_checkpoint_files",
    "deepspeed_safe_globals",
    "weights_only_loads",
]
