"""``fclm-train`` — train, cache SAM embeddings, export.

    fclm-train CONFIG.yaml [key=value …]             train (stage and everything else from the YAML)
    fclm-train cache-sam CONFIG.yaml [key=value …]   fill the SAM embedding cache for the run's data
    fclm-train export CKPT --out DIR                 checkpoint (or run folder) → FCLM.from_pretrained dir
    fclm-train plan CONFIG.yaml [--gpus N] [--gpu-mem GiB] [key=value …]
                                                     memory per GPU for each ZeRO set-up (docs/scale.md)

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
import ast
import dataclasses
import inspect
import logging
import os
import re
import socket
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("fclm.train")

PROG = "fclm-train"
USAGE = f"""usage: {PROG} CONFIG.yaml [key=value ...]
       {PROG} cache-sam CONFIG.yaml [key=value ...]
       {PROG} export CHECKPOINT --out DIR
       {PROG} plan CONFIG.yaml [--gpus N] [--gpu-mem GiB] [--tokens T] [key=value ...]
       {PROG} [cache-sam] --help"""

EXAMPLES = f"""examples:
  {PROG} train/configs/demo_stage1.yaml                         train stage 1 (tiny model, ShapesRef)
  {PROG} train/configs/stage1.yaml data.batch_size=4 optim.lr=1e-4 max_steps=200
  {PROG} train/configs/stage2.yaml init_from=runs/stage1/export  stage 2 from a stage-1 export
  {PROG} cache-sam train/configs/stage1.yaml                    fill the SAM embedding cache first
  {PROG} export runs/stage1 --out runs/stage1/export             newest checkpoint -> model folder
  {PROG} plan train/configs/stage1.yaml --gpus 8 --gpu-mem 80     memory plan per ZeRO set-up
  torchrun --nproc_per_node 4 -m train train/configs/stage1.yaml deepspeed=zero2"""


def _error(message: str) -> int:
    """One ``fclm-train: error: …`` line on stderr; exit status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse with the program's one error prefix (``fclm-train: error:``) for every subcommand."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


# --------------------------------------------------------------------------------------------------
# --help: the config keys, read from the typed dataclasses (fclm/training/config.py, fclm/config.py).
# --------------------------------------------------------------------------------------------------


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (attribute docstrings, read from the source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


_SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bEq)(?<!\bvs)\.\s")


def _first_sentence(doc: str, limit: int = 110) -> str:
    end = _SENTENCE_END.search(doc)
    doc = doc if end is None else doc[: end.start() + 1]
    return doc if len(doc) <= limit else doc[: limit - 1].rstrip() + "…"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join("…" if a is Ellipsis else _type_name(a) for a in args)
        return f"list[{inner}]"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _is_dataclass_type(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for a in typing.get_args(tp):  # FCLMConfig | None
        if dataclasses.is_dataclass(a) and isinstance(a, type):
            return a
    return None


def _config_key_lines(cls: type, prefix: str, defaults: Any, per_stage: dict[int, Any] | None = None) -> list[str]:
    """One line per key of dataclass ``cls`` (recursing into nested dataclasses), with type, default
    (``per_stage``: the defaults of each stage, shown when they differ) and docstring."""
    from fclm.config import PRESETS
    from fclm.training.config import STAGE_LOSS_WEIGHTS, STAGE_POLICIES

    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        sub = _is_dataclass_type(tp)
        value = getattr(defaults, f.name, None)
        stages = {s: getattr(p, f.name) for s, p in per_stage.items()} if per_stage else None
        if key == "trainability":
            stages = dict(STAGE_POLICIES)
        if sub is not None and typing.get_origin(tp) not in (list, tuple):
            doc = docs.get(f.name) or (sub.__doc__ or "").strip().split("\n")[0]
            lines.append(f"  {key}: {_first_sentence(doc)}")
            if key == "model":
                lines.append(f"  model.preset ({'|'.join(PRESETS)}; default null): start from this preset, then apply the model.* keys")
            lines += _config_key_lines(sub, key + ".", value if dataclasses.is_dataclass(value) else sub(), stages)
            continue
        if key == "loss.weights":
            stages = dict(STAGE_LOSS_WEIGHTS)
        if stages and len({repr(v) for v in stages.values()}) > 1:
            default = "; ".join(f"stage {s}: {_fmt(v)}" for s, v in stages.items())
        else:
            default = _fmt(value)
        doc = _first_sentence(docs.get(f.name, ""))
        lines.append(f"  {key} ({_type_name(tp)}; default {default})" + (f": {doc}" if doc else ""))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if item is not None and dataclasses.is_dataclass(item):
            item_docs, item_hints = _field_docs(item), typing.get_type_hints(item)
            for g in dataclasses.fields(item):
                required = g.default is dataclasses.MISSING and g.default_factory is dataclasses.MISSING
                idoc = _first_sentence(item_docs.get(g.name, ""))
                lines.append(f"  {key}[].{g.name} ({_type_name(item_hints[g.name])}; {'required' if required else 'default ' + _fmt(g.default)})"
                             + (f": {idoc}" if idoc else ""))
    return lines


def config_help() -> str:
    """Every key of a training config (dotted, as ``key=value`` overrides take them) with its type,
    default and the first sentence of its docstring, read from the dataclasses of
    ``fclm/training/config.py`` and ``fclm/config.py`` (so it cannot go stale)."""
    from fclm.training.config import TrainConfig

    head = "config keys (in the YAML, or key=value after CONFIG.yaml; dots reach into sections):"
    return "\n".join([head, *_config_key_lines(TrainConfig, "", TrainConfig())])


def _help(cache_only: bool = False) -> str:
    if cache_only:
        usage = f"usage: {PROG} cache-sam CONFIG.yaml [key=value ...]"
        what = "Fill the SAM embedding cache (sam_cache.dir) for a run's data, then exit; same CONFIG.yaml and overrides as the run."
    else:
        usage, what = USAGE, "Train FCLM from a YAML config, fill the SAM embedding cache, or export a checkpoint."
    body = (__doc__ or "").strip().split("\n", 1)[1].strip()  # the module docstring without its title
    return f"{usage}\n\n{what}\n\n{body}\n\n{EXAMPLES}\n\n{config_help()}\n"


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

    if any(a in ("-h", "--help") for a in argv):
        print(_help(cache_only))
        return 0
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        what = "cache-sam needs" if cache_only else "give"
        return _error(f"{what} a CONFIG.yaml" + (f" (unknown option {argv[0]})" if argv else "") + f"; see {PROG} --help")
    try:
        cfg = load_train_config(argv[0], argv[1:])
    except ConfigError as e:
        return _error(str(e))
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
    parser = _Parser(prog=f"{PROG} export", description="checkpoint → FCLM.from_pretrained directory",
                     epilog=f"example:\n  {PROG} export runs/stage1 --out runs/stage1/export", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (step-…), or a run's output_dir / checkpoints folder")
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    args = parser.parse_args(argv)
    from fclm.training.checkpoint import CheckpointError
    from fclm.training.export import export_checkpoint

    _setup_logging(None, True)
    try:
        export_checkpoint(args.checkpoint, args.out)
    except CheckpointError as e:
        return _error(f"export: {e}")
    return 0


def _plan(argv: list[str]) -> int:
    parser = _Parser(
        prog=f"{PROG} plan",
        description="Memory per GPU of CONFIG.yaml's run for each ZeRO set-up (zero0, zero2, zero2_offload, zero3, "
        "zero3_offload), from the model's parameter counts (built on the meta device: no weights needed), "
        "DeepSpeed's estimators and the activations of the configured batch (fclm/training/plan.py, docs/scale.md).",
        epilog=f"examples:\n  {PROG} plan train/configs/stage1.yaml --gpus 8\n"
        f"  {PROG} plan train/configs/stage2.yaml model.preset=fclm-7b --gpu-mem 24   (no export yet: name the model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="a training YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the run is spread over (default 1)")
    parser.add_argument("--gpu-mem", type=float, default=None, help="memory of your GPU in GiB: adds a fit column")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per sample (default: image tokens at model.backbone.max_pixels + 256)")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be >= 1")
    from fclm.config import ConfigError, FCLMConfig, from_dict
    from fclm.training.config import EXPORT_CONFIG_NAME, load_train_config
    from fclm.training.plan import count_parameters, format_plan, zero_plans

    try:
        cfg = load_train_config(args.config, args.overrides, check_files=False)
        model_cfg = cfg.model
        if model_cfg is None and cfg.init_from is not None and (Path(cfg.init_from) / EXPORT_CONFIG_NAME).is_file():
            import json

            payload = json.loads((Path(cfg.init_from) / EXPORT_CONFIG_NAME).read_text())
            model_cfg = from_dict(FCLMConfig, payload["config"], prefix="init_from config")
        if model_cfg is None:
            raise ConfigError(f"init_from: {cfg.init_from} is not an export yet; name the model, e.g. model.preset=fclm-3b")
        counts = count_parameters(model_cfg, cfg.trainability)
        rows = zero_plans(cfg, model_cfg, gpus=args.gpus, tokens=args.tokens, counts=counts)
    except (ConfigError, ValueError) as e:
        return _error(f"plan: {e}")
    title = (f"memory plan: {args.config} (stage {cfg.stage}, llm {cfg.trainability.llm}, LoRA r {cfg.trainability.lora.r}, "
             f"batch {cfg.data.batch_size}/GPU, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
             f"SAM cache {'on' if cfg.sam_cache.enabled else 'off'}), GiB per GPU on {args.gpus} GPU(s)")
    print(format_plan(rows, counts, title=title, gpu_mem_gib=args.gpu_mem))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``fclm-train``); returns the exit status."""
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv and argv[0] == "export":
        try:
            return _export(argv[1:])
        except SystemExit as e:  # argparse: --help (0) or a usage error, already printed (2)
            return e.code if isinstance(e.code, int) else 2
    if argv and argv[0] == "plan":
        try:
            return _plan(argv[1:])
        except SystemExit as e:  # argparse: --help (0) or a usage error, already printed (2)
            return e.code if isinstance(e.code, int) else 2
    if argv and argv[0] == "cache-sam":
        return _train(argv[1:], cache_only=True)
    return _train(argv)


if __name__ == "__main__":
    sys.exit(main())
