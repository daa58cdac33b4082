"""``fclm-train`` — train, cache SAM embeddings, export.

    fclm-train CONFIG.yaml [key=value …]             train (stage and everything else from the YAML)
    fclm-train cache-sam CONFIG.yaml [key=value …]   fill the SAM embedding cache for the run's data
    fclm-train export CKPT --out DIR                 checkpoint (or run folder) → FCLM.from_pretrained dir

Launchers (same arguments after the module name):

    python -m train CONFIG.yaml                                   1 process, CPU or GPU
    torchrun --nproc_per_node N -m train CONFIG.yaml              DDP (or DeepSpeed with deepspeed=zero2)
    accelerate launch --multi_gpu --num_processes N -m train CONFIG.yaml   (also on CPU: N gloo processes)
    deepspeed --num_gpus N --module train CONFIG.yaml deepspeed=zero2
    deepspeed --hostfile hostfile --module train CONFIG.yaml deepspeed=zero3   (several nodes)

On a machine without GPU every launcher runs on CPU over gloo (``deepspeed --num_gpus N`` starts N
CPU processes). With ``deepspeed=…`` but no launcher, a single process is set up here.

Limits: ZeRO-3 gathers each module's weights collectively, so every process must run the same
modules each step; FCLM skips the region extractor / SAM head for batches without regions / [SEG],
so ZeRO-3 on several processes can stall on mixed data (tested: ZeRO-3 in one process, ZeRO-2 on
two). The shipped 3B/7B configs use ZeRO-2. The NaN/inf guard skips a micro-batch's backward (with
grad_accum 1, the whole step); with grad_accum > 1 a skipped last micro-batch of a window carries the
window's gradients into the next update.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("fclm.train")

USAGE = __doc__


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N`` that ``deepspeed`` and old ``torch.distributed.launch`` append."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_logging(output_dir: str | None, is_main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output_dir is not None and is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_fclm", False):
            root.removeHandler(h)
            h.close()
    for h in handlers:
        h.setFormatter(fmt)
        h._fclm = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def make_accelerator(cfg):  # noqa: ANN001, ANN201 - accelerate types imported lazily
    """An ``accelerate.Accelerator`` for the run: DeepSpeed plugin from the JSON, gloo on CPU, precision."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs

    from fclm.training.loop import deepspeed_config, resolve_precision

    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    plugin = None
    ds = deepspeed_config(cfg)
    if ds is not None and "RANK" not in os.environ:  # plain `python -m train … deepspeed=…`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    distributed = ds is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # ENVIRONMENT.md: CPU processes talk over gloo
    if ds is not None:
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        # ZeRO-3: let from_pretrained partition pretrained weights as they load (a random tiny backbone
        # is partitioned when DeepSpeed wraps the model).
        pretrained = cfg.init_from is not None or (cfg.model is not None and cfg.model.backbone.name_or_path is not None)
        plugin = DeepSpeedPlugin(
            hf_ds_config=ds,
            gradient_accumulation_steps=cfg.optim.grad_accum,
            gradient_clipping=cfg.optim.grad_clip,
            zero3_init_flag=bool(stage == 3 and pretrained),
        )
    return Accelerator(
        # Without a GPU, accelerate only treats torchrun / accelerate-launch processes as one job (MULTI_CPU,
        # DDP over gloo) when told cpu=True; DeepSpeed sets up its own CPU process group.
        cpu=not torch.cuda.is_available() and ds is None,
        mixed_precision=resolve_precision(cfg.precision),
        gradient_accumulation_steps=cfg.optim.grad_accum,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )


def _train(argv: list[str], cache_only: bool = False) -> int:
    from fclm.config import ConfigError
    from fclm.training.config import load_train_config

    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cfg = load_train_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"fclm-train: config error: {e}", file=sys.stderr)
        return 2
    accelerator = make_accelerator(cfg)
    _setup_logging(cfg.output_dir, accelerator.is_main_process)
    if cache_only:
        from fclm.training.loop import cache_sam_embeddings

        cache_sam_embeddings(cfg, accelerator)
        return 0
    from fclm.training.loop import run_training

    result = run_training(cfg, accelerator)
    if accelerator.is_main_process:
        logger.info("trainable parameters: %d; checkpoint %s; export %s", result.trainable_parameters, result.checkpoint, result.export_dir)
    accelerator.end_training()
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fclm-train export", description="checkpoint → FCLM.from_pretrained directory")
    parser.add_argument("checkpoint", help="a checkpoint folder (step-…), or a run's output_dir / checkpoints folder")
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    args = parser.parse_args(argv)
    from fclm.training.checkpoint import CheckpointError
    from fclm.training.export import export_checkpoint

    _setup_logging(None, True)
    try:
        export_checkpoint(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"fclm-train export: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``fclm-train``); returns the exit status."""
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "export":
        return _export(argv[1:])
    if argv and argv[0] == "cache-sam":
        return _train(argv[1:], cache_only=True)
    return _train(argv)


if __name__ == "__main__":
    sys.exit(main())
