"""The training run: setup → train → cleanup (torchtune's recipe shape), on accelerate (+ DeepSpeed).

:func:`run_training` takes a parsed :class:`~fclm.training.config.TrainConfig` and a ready
``accelerate.Accelerator`` (the program ``python -m train`` makes it from the launcher's
environment; this module never reads the environment or starts distributed work itself).
:func:`train_steps` is the loop proper, DETR's ``train_one_epoch`` in size: forward, criterion,
weighted sum, finite check, backward, step, log, checkpoint. Everything else lives in named helpers:
:mod:`~fclm.training.trainability`, :mod:`~fclm.training.checkpoint`, :mod:`~fclm.training.sam_cache`,
:mod:`~fclm.training.tracking`, :mod:`~fclm.training.export`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import yaml

from fclm.training.building import build_model, prepare_for_training, weights_fingerprint
from fclm.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fclm.training.config import TrainConfig, resolve_deepspeed, train_config_to_dict
from fclm.training.sam_cache import SamEmbeddingCache, encoder_fingerprint, open_cache_for
from fclm.training.tracking import RunTracker
from fclm.training.trainability import apply_trainability

logger = logging.getLogger("fclm.train")


class NonFiniteLossError(RuntimeError):
    """Too many steps had a NaN/inf loss (``max_skipped_steps``)."""


@dataclass
class TrainResult:
    """What a finished run reports back (also written to ``<output_dir>/train_result.json``)."""

    steps: int
    skipped_steps: int
    trainable_parameters: int
    last_losses: dict[str, float]
    checkpoint: str | None
    export_dir: str | None
    sam_cache_hits: int = 0
    sam_cache_misses: int = 0
    seconds: float = 0.0


@dataclass
class TrainContext:
    """Everything :func:`train_steps` works on (built by :func:`setup`)."""

    cfg: TrainConfig
    accelerator: Any
    model: nn.Module
    criterion: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    loader: Any
    tracker: RunTracker
    cache: SamEmbeddingCache | None
    trainable_parameters: int
    state: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """``auto`` → ``bf16`` on a CUDA device that supports it, else ``no`` (fp32); accelerate's names."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def deepspeed_config(cfg: TrainConfig) -> dict | None:
    """The run's DeepSpeed JSON as a dict (``None`` without DeepSpeed)."""
    return json.loads(resolve_deepspeed(cfg.deepspeed).read_text()) if cfg.deepspeed else None


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside lists / dicts) to ``device``; anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s``: linear warm-up, then cosine / linear / constant decay."""
    o, total = cfg.optim, cfg.max_steps

    def fn(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1.0 - progress
        return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay

    return fn


def build_optimizer(cfg: TrainConfig, model: nn.Module, ds_config: dict | None) -> tuple[Any, Any]:
    """AdamW over the trainable parameters (no weight decay on biases / norms / token rows) + LambdaLR.

    The parameters of a part named in ``optim.lr_scale`` form their own groups at ``lr × scale`` (the
    schedule multiplies each group's own lr).

    With an ``optimizer`` block in the DeepSpeed JSON (the offload configs: DeepSpeed's CPU Adam),
    accelerate's ``DummyOptim`` / ``DummyScheduler`` hand the same settings to DeepSpeed.
    """
    o = cfg.optim
    scale_of = _lr_scales(model, o.lr_scale)
    buckets: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (p.ndim < 2 or "trainable_tokens" in name)
            buckets.setdefault((scale_of.get(id(p), 1.0), decays), []).append(p)
    groups = [
        {"params": params, "weight_decay": o.weight_decay if decays else 0.0, **({"lr": o.lr * scale} if scale != 1.0 else {})}
        for (scale, decays), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0][0], not kv[0][1]))
    ]
    if ds_config is not None and "optimizer" in ds_config:
        from accelerate.utils import DummyOptim, DummyScheduler

        optimizer = DummyOptim(groups, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
        fn = lr_lambda(cfg)
        scheduler = DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn))
        return optimizer, scheduler
    # fused=None, not False, when off: an explicit False would also turn off torch's foreach default on GPU
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=o.fused or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def _lr_scales(model: nn.Module, lr_scale: dict[str, float]) -> dict[int, float]:
    """``id(parameter) → optim.lr_scale`` of its trainability part, for the parts named there."""
    if not lr_scale:
        return {}
    from fclm.training.trainability import PART_ORDER, parameter_parts

    unknown = sorted(set(lr_scale) - set(PART_ORDER))
    if unknown:
        raise ValueError(f"optim.lr_scale names unknown parts {unknown}; known: {list(PART_ORDER)}")
    owner = parameter_parts(model)
    return {pid: lr_scale[part] for pid, part in owner.items() if part in lr_scale}


def build_data(cfg: TrainConfig, processor: Any, *, rank: int, world_size: int) -> tuple[Any, Any]:
    """Mixture of the JSONL files → (batch sampler, DataLoader) for this rank."""
    from fclm.data import JsonlDataset, LengthGroupedBatchSampler, MixtureDataset, RandomBatchSampler, estimate_tokens
    from fclm.data.collator import FCLMCollator

    d = cfg.data
    datasets = [JsonlDataset(src.path, strict=d.strict, tasks=src.tasks) for src in d.train]
    for src, ds in zip(d.train, datasets):
        logger.info("data %s: %d records (%d skipped), weight %g", src.path, len(ds), ds.report.count, src.weight)
    mixture = MixtureDataset(datasets, [src.weight for src in d.train], epoch_size=d.epoch_size)
    common = dict(seed=cfg.seed, rank=rank, world_size=world_size, drop_last=False)
    if d.group_by_length:
        sampler = LengthGroupedBatchSampler(mixture, d.batch_size, lengths=mixture.lengths(estimate_tokens), **common)
    else:
        sampler = RandomBatchSampler(mixture, d.batch_size, **common)
    loader = torch.utils.data.DataLoader(
        mixture, batch_sampler=sampler, collate_fn=FCLMCollator(processor), num_workers=d.num_workers,
        persistent_workers=False,
        # Its own generator: starting an iterator draws a worker seed, which must not advance the global
        # torch RNG (dropout), or a resumed run would draw different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return sampler, loader


@contextlib.contextmanager
def _zero3_init_scope(accelerator: Any) -> Iterator[None]:
    """Under ZeRO-3 without ``zero3_init_flag`` (a random tiny backbone, built whole and partitioned when
    DeepSpeed wraps it), hide accelerate's DeepSpeed config from transformers and peft while the model
    is built and adapted, so that they treat the weights as the ordinary tensors they are."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero3_init_flag or not plugin.hf_ds_config.is_zero3():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _all_finite(value: torch.Tensor, accelerator: Any) -> bool:
    """``True`` when ``value`` is finite on every process (all processes must agree on skipping)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(value.detach()).all()) else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return float(bad.item()) == 0.0


# --------------------------------------------------------------------------------------------------
# setup → train → cleanup
# --------------------------------------------------------------------------------------------------


def build_criterion(loss_cfg: Any, model_cfg: Any) -> Any:
    """:class:`~fclm.losses.FCLMCriterion` over the criteria registered with the model's enabled heads."""
    from fclm.losses import FCLMCriterion
    from fclm.model.heads import build_head_criterion

    heads = {name: build_head_criterion(name, cfg=model_cfg) for name in model_cfg.heads.enabled}
    return FCLMCriterion(loss_cfg, heads)


def setup(cfg: TrainConfig, accelerator: Any) -> TrainContext:
    """Build the model, apply the trainability policy, data, optimizer; prepare; resume if asked."""
    from accelerate.utils import set_seed

    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)  # ENVIRONMENT.md: denormals made CPU steps 3–17× slower
        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False))
    set_seed(cfg.seed)
    with _zero3_init_scope(accelerator):
        model = build_model(cfg)
        n_trainable = apply_trainability(model, cfg.trainability)
    prepare_for_training(model, cfg)  # gradient checkpointing, torch.compile
    random_init = cfg.init_from is None and cfg.model is not None and (
        cfg.model.backbone.name_or_path is None or cfg.model.backbone.random_init)
    frozen_fp = weights_fingerprint(model) if random_init else None
    criterion = build_criterion(cfg.loss, model.config)  # the export's config for init_from runs
    # Fingerprint the SAM encoder while its weights are whole (before DeepSpeed partitions / converts them).
    sam_fingerprint = encoder_fingerprint(model.sam.image_encoder) if cfg.sam_cache.enabled else None
    if cfg.recon_warmup.steps and not _will_resume(cfg):
        _recon_warmup(cfg, accelerator, model, criterion, sam_fingerprint)
    sampler, loader = build_data(cfg, model.processor, rank=accelerator.process_index, world_size=accelerator.num_processes)
    ds_config = deepspeed_config(cfg)
    optimizer, scheduler = build_optimizer(cfg, model, ds_config)
    if ds_config is not None:
        live = accelerator.state.deepspeed_plugin.deepspeed_config
        # We do not hand our DataLoader to accelerate (the sampler shards itself), so set the micro-batch here.
        live["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        params = live.get("optimizer", {}).get("params", {})
        for key, value in (("betas", list(cfg.optim.betas)), ("eps", cfg.optim.eps)):
            if params.get(key) == "auto":  # accelerate fills lr and weight_decay only
                params[key] = value
    if ds_config is not None and "optimizer" in ds_config:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        # Our LambdaLR counts optimizer steps; accelerate's scheduler wrapper would step it once per process.
        model, optimizer = accelerator.prepare(model, optimizer)
    cache = None
    if sam_fingerprint is not None:
        encoder = accelerator.unwrap_model(model).sam.image_encoder
        cache = open_cache_for(accelerator.unwrap_model(model), cfg.sam_cache.dir, fingerprint=sam_fingerprint,
                               dtype=next(encoder.parameters()).dtype)
    state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "samples": 0, "frozen_fingerprint": frozen_fp}
    resume = cfg.checkpoint.resume
    path = latest_checkpoint(cfg.checkpoint_dir) if resume == "auto" else (None if resume == "never" else Path(resume))
    if path is not None:
        loaded = load_checkpoint(accelerator, model, optimizer, scheduler, path)
        if loaded.get("frozen_fingerprint") != frozen_fp:
            raise RuntimeError(
                f"{path} was trained on other frozen weights (fingerprint {loaded.get('frozen_fingerprint')} vs "
                f"{frozen_fp}): resume with the same model config and seed"
            )
        sampler.load_state_dict(loaded["sampler"])
        state.update({k: loaded[k] for k in ("step", "skipped_steps", "samples") if k in loaded})
    tracker = RunTracker(
        out,
        total_steps=cfg.max_steps,
        start_step=state["step"],
        every=cfg.logging.every,
        enabled=accelerator.is_main_process,
        progress_bar=cfg.logging.progress_bar,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        run_config=train_config_to_dict(cfg),
    )
    return TrainContext(cfg, accelerator, model, criterion, optimizer, scheduler, sampler, loader, tracker, cache, n_trainable, state)


def _will_resume(cfg: TrainConfig) -> bool:
    resume = cfg.checkpoint.resume
    return (latest_checkpoint(cfg.checkpoint_dir) is not None) if resume == "auto" else resume != "never"


def _recon_warmup(cfg: TrainConfig, accelerator: Any, model: nn.Module, criterion: Any, sam_fingerprint: str | None) -> None:
    """:func:`fclm.training.warmup.reconstruction_warmup` before the model is wrapped (on the run's device
    without DeepSpeed; on the CPU under DeepSpeed), through the SAM embedding cache when the run has one."""
    from fclm.training.warmup import reconstruction_warmup

    device = accelerator.device if cfg.deepspeed is None else torch.device("cpu")
    model.to(device)
    cache = open_cache_for(model, cfg.sam_cache.dir, fingerprint=sam_fingerprint) if sam_fingerprint and cfg.deepspeed is None else None

    def encode(batch: dict) -> torch.Tensor:
        batch = move_to_device(batch, device)
        if cache is not None:
            return cache.fill_batch(batch, model.sam.encode, crops=False)["sam_image_embeddings"]
        with torch.no_grad():
            return model.sam.encode(batch["sam_images"])

    reconstruction_warmup(model, cfg, encode=encode, criterion=criterion)


def _checkpoint(ctx: TrainContext, consumed: int) -> str:
    state = {**ctx.state, "sampler": ctx.sampler.state_dict(consumed=consumed), "config": train_config_to_dict(ctx.cfg)}
    path = save_checkpoint(
        ctx.accelerator, ctx.model, ctx.optimizer, ctx.scheduler, ctx.cfg.checkpoint_dir, ctx.state["step"], state,
        keep_last=ctx.cfg.checkpoint.keep_last,
    )
    return str(path)


def train_steps(ctx: TrainContext) -> dict[str, float]:
    """Run optimizer steps until ``max_steps``; return the last step's losses."""
    cfg, acc, model = ctx.cfg, ctx.accelerator, ctx.model
    encoder = acc.unwrap_model(model).sam.encode
    params = [p for p in model.parameters() if p.requires_grad]
    deepspeed = cfg.deepspeed is not None
    # With an optimizer block in the DeepSpeed JSON, DeepSpeed owns the scheduler and steps it.
    scheduler_in_engine = deepspeed and "optimizer" in (deepspeed_config(cfg) or {})
    state, last = ctx.state, {}
    model.train()
    consumed = ctx.sampler.state_dict()["position"]  # batches of this epoch already used (resume)
    while state["step"] < cfg.max_steps:
        for batch in ctx.loader:
            consumed += 1
            batch = move_to_device(batch, acc.device)
            if ctx.cache is not None:
                ctx.cache.fill_batch(batch, encoder)
            with acc.accumulate(model):
                outputs = model(batch)
                losses = ctx.criterion(outputs, batch)
                total = ctx.criterion.weighted_total(losses)
                if not _all_finite(total, acc):
                    state["skipped_steps"] += 1
                    ctx.tracker.log_event(state["step"], skipped_nonfinite=state["skipped_steps"], **{k: float(v) for k, v in losses.items()})
                    logger.warning("non-finite loss at step %d: skipped (%d so far)", state["step"] + 1, state["skipped_steps"])
                    if state["skipped_steps"] > cfg.max_skipped_steps:
                        raise NonFiniteLossError(f"{state['skipped_steps']} steps had a non-finite loss (max_skipped_steps={cfg.max_skipped_steps})")
                    continue
                lr = ctx.scheduler.get_last_lr()[0]  # the rate this step uses
                acc.backward(total)
                if acc.sync_gradients and cfg.optim.grad_clip > 0 and not deepspeed:
                    acc.clip_grad_norm_(params, cfg.optim.grad_clip)
                ctx.optimizer.step()
                if acc.sync_gradients and not scheduler_in_engine:
                    ctx.scheduler.step()
                ctx.optimizer.zero_grad(set_to_none=True)
            n = int(batch["input_ids"].shape[0])
            state["samples"] += n * acc.num_processes
            ctx.tracker.count(n, int(batch["attention_mask"].sum()))
            if not acc.sync_gradients:
                continue
            state["step"] += 1
            last = {k: float(v.detach()) for k, v in losses.items()} | {"total": float(total.detach())}
            ctx.tracker.log_step(state["step"], {**last, "lr": lr}, world_size=acc.num_processes)
            if state["step"] % cfg.checkpoint.every == 0 or state["step"] == cfg.max_steps:
                state["checkpoint"] = _checkpoint(ctx, consumed)
            if state["step"] >= cfg.max_steps:
                break
        else:  # the epoch ran out
            ctx.sampler.set_epoch(ctx.sampler.epoch + 1)
            consumed = 0
    return last


def run_training(cfg: TrainConfig, accelerator: Any) -> TrainResult:
    """setup → train → export → cleanup. Returns what the run did (also in ``<output_dir>/train_result.json``)."""
    t0 = time.perf_counter()
    ctx = setup(cfg, accelerator)
    try:
        last = train_steps(ctx) if ctx.state["step"] < cfg.max_steps else {}
    finally:
        ctx.tracker.close()
    accelerator.wait_for_everyone()
    ckpt = ctx.state.get("checkpoint")
    if ckpt is None:  # nothing left to train (a finished run resumed): its last checkpoint
        latest = latest_checkpoint(cfg.checkpoint_dir)
        ckpt = str(latest) if latest is not None else None
    result = TrainResult(
        steps=ctx.state["step"],
        skipped_steps=ctx.state["skipped_steps"],
        trainable_parameters=ctx.trainable_parameters,
        last_losses=last,
        checkpoint=ckpt,
        export_dir=None,
        sam_cache_hits=ctx.cache.hits if ctx.cache is not None else 0,
        sam_cache_misses=ctx.cache.misses if ctx.cache is not None else 0,
    )
    del ctx
    accelerator.free_memory()
    if cfg.export_at_end and ckpt is not None:
        from fclm.training.export import export_checkpoint

        if cfg.deepspeed is not None:  # the export rebuilds the model whole, on CPU: no ZeRO-3 partitioning
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        if accelerator.is_main_process:
            export_checkpoint(ckpt, cfg.export_dir)
        result.export_dir = str(cfg.export_dir)
        accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        (Path(cfg.output_dir) / "train_result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
        logger.info("done: %d steps (%d skipped) in %.1f s", result.steps, result.skipped_steps, result.seconds)
    return result


def cache_sam_embeddings(cfg: TrainConfig, accelerator: Any) -> dict[str, int]:
    """Fill the SAM embedding cache for every record of the run's files (``fclm-train cache-sam``).

    Every record once, whatever the mixture weights; each process encodes its own shard of the
    batches. The embeddings get the dtype the training run will produce (bf16 / fp16 when DeepSpeed
    converts the weights), so the run finds them. Returns this process's hit / miss counts.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from fclm.data import JsonlDataset, MixtureDataset, RandomBatchSampler
    from fclm.data.collator import FCLMCollator

    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)
        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
    set_seed(cfg.seed)
    model = build_model(cfg)
    fingerprint = encoder_fingerprint(model.sam.image_encoder)
    precision = resolve_precision(cfg.precision)
    if cfg.deepspeed is not None and precision in ("bf16", "fp16"):
        model.sam.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    model.sam.to(accelerator.device)
    cache = open_cache_for(model, cfg.sam_cache.dir, fingerprint=fingerprint)
    records = MixtureDataset([JsonlDataset(src.path, strict=cfg.data.strict, tasks=src.tasks) for src in cfg.data.train])
    sampler = RandomBatchSampler(records, cfg.data.batch_size, shuffle=False, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(records, batch_sampler=sampler, collate_fn=FCLMCollator(model.processor),
                                         num_workers=cfg.data.num_workers)
    for batch in tqdm(loader, desc="cache-sam", disable=not accelerator.is_main_process):
        batch = move_to_device(batch, accelerator.device)
        cache.fill_batch(batch, model.sam.encode)
    accelerator.wait_for_everyone()
    logger.info("SAM cache %s: %d hits, %d computed (this process)", cache.dir, cache.hits, cache.misses)
    return {"hits": cache.hits, "misses": cache.misses}


__all__ = ["run_training", "cache_sam_embeddings", "setup", "train_steps", "TrainResult", "TrainContext", "NonFiniteLossError", "lr_lambda", "move_to_device"]
