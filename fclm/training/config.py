"""Typed options of one training run (``train/configs/*.yaml``), checked before any model is built.

A run is one YAML file plus ``key=value`` overrides (torchtune style)::

    stage: 1
    model: {preset: tiny}          # an FCLMConfig: a preset, then field overrides (stage 1)
    init_from: runs/stage1/export  # a stage-1 export (stage 2; the model comes from it)
    data: {train: [{path: data/res.jsonl, weight: 1.0}], batch_size: 8}
    optim: {lr: 1.0e-3, warmup_steps: 50}
    max_steps: 1000

:func:`load_train_config` parses the file with :func:`fclm.config.from_dict` (unknown keys and wrong
types raise :class:`fclm.config.ConfigError` naming the dotted key), fills the stage's defaults
(trainability per part, loss weights) and checks that every file it names exists — all before
anything heavy is imported or built.
"""

from __future__ import annotations

import copy
import json
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from fclm.config import ConfigError, FCLMConfig, LossConfig, apply_overrides, from_dict, model_config_from_dict, to_dict

PartMode = Literal["frozen", "full"]
"""Trainability of a part that cannot take LoRA."""

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "train" / "deepspeed"
"""Where the shipped DeepSpeed JSON files live (``deepspeed: zero2`` resolves to ``zero2.json`` there)."""

EXPORT_CONFIG_NAME = "fclm_config.json"
"""The file that marks a directory written by ``FCLM.save_pretrained`` (a stage-1 export)."""


@dataclass
class LoraOptions:
    """LoRA on the language model (peft). Only modules under ``language_model`` are targeted:
    the vision blocks also have ``gate_proj``/``up_proj``/``down_proj``."""

    r: int = 16
    """Rank of the update."""
    alpha: int = 32
    """Scale numerator (the update is scaled by ``alpha / r``)."""
    dropout: float = 0.05
    """Dropout on the LoRA input (uses the torch RNG, which checkpoints restore)."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers inside ``language_model`` that get an adapter."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")


@dataclass
class TrainabilityPolicy:
    """Which parts of FCLM a stage trains (``frozen`` / ``lora`` / ``full``), applied by
    :func:`fclm.training.trainability.apply_trainability`. Stage defaults: :data:`STAGE_POLICIES`."""

    vision_tower: PartMode = "frozen"
    """Qwen2.5-VL vision tower (``backbone.model.visual``)."""
    sam_image_encoder: PartMode = "frozen"
    """SAM image encoder; must stay frozen when the SAM embedding cache is on."""
    llm: Literal["frozen", "lora", "full"] = "lora"
    """The language model (``backbone.model.language_model`` and ``backbone.lm_head``)."""
    new_token_rows: bool = True
    """Train the rows of the input embeddings and ``lm_head`` of the tokens FCLM adds
    (``<mask>``, ``<pos>``, ``[SEG]``) via peft ``trainable_token_indices``, when ``llm`` is not ``full``."""
    lm_head: Literal["rows", "full"] = "rows"
    """With ``llm: lora``: ``rows`` trains only the new tokens' rows of ``lm_head`` (with ``new_token_rows``);
    ``full`` trains the whole output layer, as LISA does (``lm_head`` in its trainable modules). A random
    tiny backbone needs ``full`` to learn its answers in minutes; the input embeddings follow ``embed_tokens``."""
    embed_tokens: Literal["rows", "full"] = "rows"
    """With ``llm: lora``: ``rows`` trains only the new tokens' rows of the input embeddings (with
    ``new_token_rows``); ``full`` trains every row, so the words of an expression can move ``h[SEG]``
    (a random tiny backbone; docs/benchmarks.md, "Demo")."""
    region_extractor: PartMode = "full"
    """The Hybrid Region Extractor."""
    projectors: PartMode = "full"
    """``seg_projector``, ``pos_projector`` (and ``mask_projector``)."""
    sam_decoder: PartMode = "full"
    """SAM prompt encoder + mask decoder."""
    heads: PartMode = "full"
    """Grounding heads (parameters they share with SAM follow ``sam_decoder``)."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA options, used when ``llm`` is ``lora``."""


STAGE_POLICIES: dict[int, TrainabilityPolicy] = {
    1: TrainabilityPolicy(),
    2: TrainabilityPolicy(region_extractor="frozen", projectors="frozen", sam_decoder="frozen", heads="frozen"),
}
"""DESIGN.md §3: stage 1 trains extractor, projectors, decoder and heads with LoRA on the LLM;
stage 2 freezes them and tunes the LLM (LoRA + new token rows) only."""

STAGE_LOSS_WEIGHTS: dict[int, dict[str, float]] = {
    1: {"loss_ce": 1.0, "loss_mask_bce": 2.0, "loss_mask_dice": 1.0, "loss_self_recon": 1.0, "loss_latent": 0.0},
    2: {"loss_ce": 1.0, "loss_mask_bce": 2.0, "loss_mask_dice": 1.0, "loss_self_recon": 0.0, "loss_latent": 1.0},
}
"""Seed 002: stage 1 = CE + seg + self-reconstruction; stage 2 = CE + seg + latent consistency.
``loss.weights`` in a YAML updates these (it does not replace the whole table)."""


@dataclass
class DataSource:
    """One schema JSONL file of the training mixture."""

    path: str
    """The JSONL file (DESIGN.md §4); relative image paths resolve against its folder."""
    weight: float = 1.0
    """Share of the mixture (relative to the other files' weights)."""
    tasks: tuple[str, ...] | None = None
    """Keep only records of these tasks (``None``: all)."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@dataclass
class DataConfig:
    """Training data: a weighted mixture of JSONL files, length-grouped batches."""

    train: list[DataSource] = field(default_factory=list)
    """The files of the mixture (at least one)."""
    root: str | None = None
    """Folder that relative ``train[*].path`` are resolved against (default: the current directory);
    e.g. ``data.root=/data/shapesref`` points a shipped YAML at another copy of the data."""
    batch_size: int = 8
    """Samples per process per micro-batch."""
    epoch_size: int | None = None
    """Draws per epoch from the mixture (default: the total number of records)."""
    group_by_length: bool = True
    """Length-grouped batches (less padding); else plain random batches."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process)."""
    strict: bool = False
    """Raise at the first invalid record instead of reporting and skipping it."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a cosine / linear / constant schedule."""

    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up, down to ``lr · min_lr_ratio`` at ``max_steps``."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multiplier per trainable part (names of ``trainability``: ``vision_tower``, ``llm``,
    ``projectors``, …), e.g. ``{vision_tower: 0.1}``; parts not named train at ``lr``."""
    fused: bool = False
    """torch's fused AdamW (CPU and CUDA): one kernel over all tensors instead of torch's default (a loop
    per tensor on CPU, foreach on GPU). The demo's stage-1 optimizer step on CPU takes 2 ms instead of 8
    (``scripts/bench/train_parts.py``). Off by default: the demo's figures were measured with torch's
    default, and a fused run moves some of them as much as a second seed does (docs/benchmarks.md,
    "Stability")."""

    def __post_init__(self) -> None:
        if any(not v > 0 for v in self.lr_scale.values()):
            raise ValueError(f"optim.lr_scale values must be > 0, got {self.lr_scale}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.grad_accum < 1 or self.grad_clip < 0:
            raise ValueError("need warmup_steps >= 0, grad_accum >= 1, grad_clip >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1]")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints (model trainable weights, optimizer, scheduler, RNG, data position)."""

    every: int = 500
    """Save every this many optimizer steps (and at the end)."""
    keep_last: int = 2
    """Keep only the newest this many checkpoints."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint in ``dir`` if any; ``never``; or a checkpoint folder."""
    dir: str | None = None
    """Folder of checkpoints (default ``<output_dir>/checkpoints``)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1")


@dataclass
class LoggingConfig:
    """What the main process reports."""

    every: int = 10
    """Log every this many optimizer steps (and the first and last)."""
    progress_bar: bool = True
    """A tqdm bar on the main process."""
    tensorboard: bool = True
    """Scalars under ``<output_dir>/tensorboard``."""
    wandb: bool = False
    """Also log to Weights & Biases (only if ``wandb`` is installed)."""
    wandb_project: str = "fclm"


@dataclass
class ReconWarmupConfig:
    """Self-reconstruction steps run before the main steps, without the LLM (:mod:`fclm.training.warmup`):
    the position branch, pos projector and SAM decoder learn to decode ``<pos>`` back into its region."""

    steps: int = 0
    """Warm-up steps (0: none). Skipped when the run resumes from a checkpoint."""
    batch_size: int = 32
    """Regions per warm-up step."""
    lr: float | None = None
    """Learning rate (``None``: ``optim.lr``); linear ramp over the first 5 % of the steps, then ``schedule``."""
    schedule: str = "constant"
    """After the ramp: ``constant``, or ``cosine`` (a half cosine towards 0 at the last step; worse for the
    demo's warm-up, docs/benchmarks.md "What the warm-up reaches")."""
    max_regions: int = 4000
    """Regions collected (and SAM-encoded) once from the run's files, the first ones of each file in turn."""
    files: list[str] = field(default_factory=list)
    """JSONL files to take the regions from (relative to ``data.root`` as ``data.train``); empty: the run's
    ``data.train`` files of positive weight. For a run whose own data has no regions (e.g. a RES-only phase)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.max_regions < 1:
            raise ValueError("recon_warmup: need steps >= 0, batch_size >= 1, max_regions >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ValueError("recon_warmup.lr must be > 0")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"recon_warmup.schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclass
class SamCacheConfig:
    """On-disk cache of SAM image-encoder embeddings (the encoder is frozen in both stages)."""

    enabled: bool = True
    """Look embeddings up by ``image_keys`` / ``region_crop_keys``; compute and store the missing ones."""
    dir: str = "runs/cache/sam"
    """Cache root; a sub-folder per encoder (keyed by a hash of its weights) keeps caches of different encoders apart."""


@dataclass
class TrainConfig:
    """One training run."""

    stage: int = 1
    """1: CE + seg + self-reconstruction, extractor/projectors/decoder trained; 2: from a stage-1
    export, those frozen, + latent loss on DL-RES pairs (seed 002)."""
    output_dir: str = "runs/train"
    """Checkpoints, logs (``metrics.jsonl``, ``train.log``, ``tensorboard/``) and the export go here."""
    model: FCLMConfig | None = None
    """The model to build (stage 1); ``None`` with ``init_from`` set (the export holds the config)."""
    init_from: str | None = None
    """A directory written by ``FCLM.save_pretrained`` (e.g. ``fclm-train export``); required for stage 2."""
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and seed 002's ablations (self-reconstruction source, latent loss kind)."""
    trainability: TrainabilityPolicy = field(default_factory=TrainabilityPolicy)
    """Per-part policy; defaults come from the stage (:data:`STAGE_POLICIES`)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: int = 1000
    """Optimizer steps of the run (the data cycles through epochs as needed)."""
    seed: int = 0
    """Seeds model init, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a GPU that supports it, else fp32 (CPU)."""
    deepspeed: str | None = None
    """DeepSpeed JSON: a path, or a name in ``train/deepspeed/`` (``zero2``, ``zero3``, ``zero2_offload``,
    ``zero3_offload``); ``None``: plain accelerate (DDP when launched on several processes)."""
    cpu_threads: int | None = None
    """torch intra-op threads when training on CPU (``None``: torch's default). On a CPU shared with
    other jobs, 1 thread was ~15× faster than 2 here (OpenMP threads spin-wait for each other)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward, per decoder layer of the LLM and per block of the vision tower
    (large models; the shipped 3B/7B configs turn it on; ``docs/scale.md`` has the time and memory)."""
    compile: bool = False
    """``torch.compile`` each decoder layer of the LLM (regional compilation: one compiled layer reused by
    all); needs a working inductor back end (a C++ compiler on CPU, triton on GPU)."""
    max_skipped_steps: int = 10
    """NaN/inf guard: a micro-batch whose loss is not finite on any process is skipped; the run stops
    with an error once this many have been skipped."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sam_cache: SamCacheConfig = field(default_factory=SamCacheConfig)
    recon_warmup: ReconWarmupConfig = field(default_factory=ReconWarmupConfig)
    """Self-reconstruction warm-up before the main steps (stage 1; off by default)."""
    export_at_end: bool = True
    """Write ``<output_dir>/export`` (merged LoRA, loadable with ``FCLM.from_pretrained``) after the last step."""

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_skipped_steps < 0:
            raise ValueError("max_skipped_steps must be >= 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return Path(self.output_dir) / "export"


def resolve_deepspeed(value: str) -> Path:
    """``zero2`` → ``train/deepspeed/zero2.json``; any other value is a path. Raises if it does not exist."""
    path = Path(value)
    if not path.suffix and not path.exists():
        path = DEEPSPEED_DIR / f"{value}.json"
    if not path.is_file():
        raise ConfigError(f"deepspeed: file not found: {value} (shipped: {sorted(p.stem for p in DEEPSPEED_DIR.glob('*.json'))})")
    return path


def _check_files(cfg: TrainConfig) -> None:
    """Every file the config names must exist (before any model is built)."""
    if not cfg.data.train:
        raise ConfigError("data.train: needs at least one {path, weight} entry")
    for i, src in enumerate(cfg.data.train):
        if not Path(src.path).is_file():
            raise ConfigError(f"data.train[{i}].path: file not found: {src.path}")
    for i, f in enumerate(cfg.recon_warmup.files):
        if not Path(f).is_file():
            raise ConfigError(f"recon_warmup.files[{i}]: file not found: {f}")
    if cfg.stage == 2 and cfg.init_from is None:
        raise ConfigError("init_from: stage 2 starts from a stage-1 export; set init_from=<stage-1 output_dir>/export")
    if cfg.init_from is not None:
        marker = Path(cfg.init_from) / EXPORT_CONFIG_NAME
        if not marker.is_file():
            raise ConfigError(f"init_from: {cfg.init_from} is not an FCLM export ({marker} not found)")
        if cfg.model is not None:
            raise ConfigError("model: leave it out with init_from (the model and its config come from the export)")
    elif cfg.model is None:
        raise ConfigError("model: give a model (e.g. {preset: tiny}) or init_from")
    if cfg.model is not None:
        if cfg.model.backbone.name_or_path is not None and Path(cfg.model.backbone.name_or_path).is_absolute():
            if not Path(cfg.model.backbone.name_or_path).exists():
                raise ConfigError(f"model.backbone.name_or_path: not found: {cfg.model.backbone.name_or_path}")
        if cfg.model.sam.checkpoint is not None and not Path(cfg.model.sam.checkpoint).is_file():
            raise ConfigError(f"model.sam.checkpoint: file not found: {cfg.model.sam.checkpoint}")
    if cfg.deepspeed is not None:
        resolve_deepspeed(cfg.deepspeed)
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).is_dir():
        raise ConfigError(f"checkpoint.resume: not a checkpoint folder: {cfg.checkpoint.resume}")
    if cfg.sam_cache.enabled and cfg.trainability.sam_image_encoder != "frozen":
        raise ConfigError("sam_cache.enabled: the SAM embedding cache needs trainability.sam_image_encoder=frozen")
    weights = cfg.loss.weights
    if cfg.loss.self_recon_source in ("mask", "both") and cfg.model is not None:
        if not getattr(cfg.model, "decode_mask_tokens", True):
            raise ConfigError(
                "loss.self_recon_source: decoding <mask> needs model.decode_mask_tokens=true"
            )
    if any(v < 0 for v in weights.values()):
        raise ConfigError(f"loss.weights: weights must be >= 0, got {weights}")


def enabled_heads(cfg: TrainConfig) -> tuple[str, ...]:
    """The heads the run's model routes to: ``model.heads.enabled``, or the ``init_from`` export's."""
    if cfg.model is not None:
        return tuple(cfg.model.heads.enabled)
    if cfg.init_from is not None:
        marker = Path(cfg.init_from) / EXPORT_CONFIG_NAME
        if marker.is_file():
            try:
                heads = json.loads(marker.read_text())["config"].get("heads") or {}
                return tuple(heads.get("enabled") or ("sam",))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"init_from: {marker} is not a readable FCLM config ({e})") from None
    return ("sam",)


def loss_names(heads: Sequence[str]) -> tuple[str, ...]:
    """Every loss name a model routing to ``heads`` produces (the model-wide ones and the heads' declared ones)."""
    from fclm.losses import CORE_LOSS_NAMES
    from fclm.model.heads import head_loss_weights

    try:
        declared = head_loss_weights(heads)
    except ValueError as e:
        raise ConfigError(f"model.heads.enabled: {e}") from None
    return (CORE_LOSS_NAMES[0], *declared, *CORE_LOSS_NAMES[1:])


def train_config_from_dict(data: dict, *, check_files: bool = True) -> TrainConfig:
    """Plain data (a parsed YAML with overrides applied) → :class:`TrainConfig`, stage defaults filled in.

    Raises :class:`fclm.config.ConfigError` naming the dotted key (or the missing file).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a training config is a mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    stage = data.get("stage", 1)
    if stage not in STAGE_POLICIES:
        raise ConfigError(f"stage: must be 1 or 2, got {stage!r}")
    model = data.pop("model", None)
    if model is not None:
        if not isinstance(model, dict):
            raise ConfigError(f"model: expected a mapping, got {type(model).__name__}")
        try:
            data["model"] = model_config_from_dict(model, prefix="model")
        except ValueError as e:  # an unknown preset name
            raise ConfigError(f"model: {e}") from None
        if getattr(data["model"], "decode_mask_tokens", None) is not None and "decode_mask_tokens" not in model:
            loss = data.get("loss") or {}
            source = loss.get("self_recon_source", "pos") if isinstance(loss, dict) else "pos"
            data["model"] = dataclasses.replace(data["model"], decode_mask_tokens=source in ("mask", "both"))
    loss = data.get("loss") or {}
    if not isinstance(loss, dict):
        raise ConfigError(f"loss: expected a mapping, got {type(loss).__name__}")
    weights = loss.get("weights") or {}
    if not isinstance(weights, dict):
        raise ConfigError(f"loss.weights: expected a mapping, got {type(weights).__name__}")
    data["loss"] = {**loss, "weights": dict(weights)}
    policy = data.pop("trainability", None) or {}
    cfg = from_dict(TrainConfig, data)
    # Stage defaults fill in the names the routed heads declare (a user's value wins); the defaults of
    # heads the model does not route to are left out rather than reported as unknown.
    heads = enabled_heads(cfg)
    known = loss_names(heads)
    unknown = [k for k in cfg.loss.weights if k not in known]
    if unknown:
        raise ConfigError(
            f"loss.weights: unknown loss name(s) {', '.join('loss.weights.' + k for k in unknown)}: neither the model "
            f"nor a routed head (heads.enabled: {', '.join(heads)}) declares them (known: {', '.join(known)})"
        )
    cfg.loss.weights = {**{k: v for k, v in STAGE_LOSS_WEIGHTS[stage].items() if k in known}, **cfg.loss.weights}
    cfg.trainability = from_dict(TrainabilityPolicy, policy, prefix="trainability", base=copy.deepcopy(STAGE_POLICIES[stage]))
    if cfg.data.root is not None:
        for src in cfg.data.train:
            src.path = str(Path(cfg.data.root) / src.path)
        cfg.recon_warmup.files = [str(Path(cfg.data.root) / f) for f in cfg.recon_warmup.files]
        cfg.data.root = None  # resolved: a saved config reads back the same
    if check_files:
        _check_files(cfg)
    return cfg


def load_train_config(path: str | Path, overrides: Sequence[str] = (), *, check_files: bool = True) -> TrainConfig:
    """Read a YAML training config, apply ``key=value`` overrides, parse and check it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    apply_overrides(data, overrides)
    try:
        return train_config_from_dict(data, check_files=check_files)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data for ``config.yaml`` in the output folder (round-trips through :func:`train_config_from_dict`)."""
    return to_dict(cfg)


__all__ = [
    "TrainConfig",
    "DataConfig",
    "DataSource",
    "OptimConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "SamCacheConfig",
    "ReconWarmupConfig",
    "TrainabilityPolicy",
    "LoraOptions",
    "STAGE_POLICIES",
    "STAGE_LOSS_WEIGHTS",
    "load_train_config",
    "train_config_from_dict",
    "train_config_to_dict",
    "resolve_deepspeed",
]
