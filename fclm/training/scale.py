"""Real-size checks without weights: the presets built with random weights, one measured training step.

Used by ``tests/scale/`` (the 3B step on CPU), ``scripts/bench/scale_step.py`` (``docs/benchmarks.md``,
"Real scale") and ``scripts/gpu_check.py``:

* :func:`random_model_config` — a preset (``fclm-3b``, ``fclm-7b``, or ``tiny``/``small``) with random
  weights and no files: ``backbone.random_init``, no SAM checkpoint, Qwen image size of the caller's choice.
* :func:`scale_records` — generated records with a ``<region>`` in the prompt and a ``[SEG]`` in the answer
  (a stage-2 DL-RES pair), so that every part runs: vision tower, SAM encoder (image and region crop),
  region extractor, LLM, seg projector and head, latent loss.
* :func:`measure_step` — one forward + backward with wall time per part (forward hooks) and the
  process's peak resident memory (``VmHWM``, reset before the step).
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from fclm.config import FCLMConfig, from_dict, preset

__all__ = [
    "random_model_config", "scale_records", "scale_images", "measure_step", "StepMeasurement",
    "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "PART_MODULES",
]


def random_model_config(name: str, *, image_pixels: int | None = None, **backbone: Any) -> FCLMConfig:
    """Preset ``name`` with random weights from configuration alone (no checkpoint, no SAM ``.pth``).

    ``image_pixels`` fixes the Qwen image area (min = max pixels); ``backbone`` overrides other
    ``model.backbone`` keys (e.g. ``attn_implementation``). Real presets keep SAM's 1024 px frame.
    """
    cfg = preset(name)
    data: dict[str, Any] = {"backbone": dict(backbone), "sam": {"checkpoint": None}}
    if cfg.backbone.arch is not None:
        data["backbone"]["random_init"] = True
    if image_pixels is not None:
        data["backbone"].update(min_pixels=image_pixels, max_pixels=image_pixels)
    return from_dict(FCLMConfig, data, prefix="model", base=cfg)


def scale_images(n: int, size: tuple[int, int] = (224, 224), seed: int = 0) -> list[Any]:
    """``n`` generated RGB images (PIL) of ``size`` (h, w)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for _ in range(n)]


def scale_records(n: int = 1, size: tuple[int, int] = (224, 224), seed: int = 0) -> list[dict]:
    """``n`` DL-RES records: "What is <region>? Please segment it." → "It is the object [SEG]."

    The region (a rectangle of ``size``) is in the prompt and is the ``[SEG]``'s target, so the record
    exercises the region extractor, the mask head and the latent pair.
    """
    from fclm.masks import encode_mask

    rng = np.random.default_rng(seed)
    h, w = size
    records = []
    for i in range(n):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + h // 3, x0 + w // 3
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        rle = encode_mask(mask)
        records.append({
            "id": f"scale-{i}",
            "messages": [
                {"role": "user", "content": "What is <region>? Please segment it."},
                {"role": "assistant", "content": "It is the object [SEG]."},
            ],
            "regions": [{"mask": rle, "box": [x0, y0, x1, y1], "target_index": 0}],
            "targets": [{"masks": [rle], "boxes": [[x0, y0, x1, y1]]}],
        })
    return records


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} (Linux only)")
    return int(match.group(1))


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``: freed tensors otherwise stay resident)
    and reset the peak (``VmHWM``) to the current resident memory (Linux ``clear_refs`` 5)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------------------------------
# one measured step
# --------------------------------------------------------------------------------------------------

PART_MODULES: dict[str, tuple[str, ...]] = {
    "vision_tower": ("backbone.model.visual",),
    "sam_encoder": ("sam.image_encoder",),
    "llm": ("backbone.model.language_model", "backbone.lm_head"),
    "heads": ("region_extractor", "seg_projector", "pos_projector", "mask_projector", "heads", "sam.mask_decoder"),
}
"""Forward time is attributed to these parts (dotted paths under the model; peft wrappers are looked through)."""


def _find(model: nn.Module, path: str) -> nn.Module | None:
    from fclm.model.fclm import _unwrap

    node: Any = model
    for part in path.split("."):
        if part == "backbone":
            node = _unwrap(node.backbone)
            continue
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


@contextlib.contextmanager
def _timed_parts(model: nn.Module, seconds: dict[str, float]) -> Iterator[None]:
    """Add each part's forward wall time to ``seconds[part]`` (outermost calls only; nested parts excluded
    from their parent: the SAM decoder inside a head counts once, under ``heads``)."""
    handles = []
    depth = {"n": 0}
    starts: dict[int, float] = {}

    def pre(part: str, key: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any = None) -> None:
            depth["n"] += 1
            if depth["n"] == 1:
                starts[key] = time.perf_counter()
        return hook

    def post(part: str, key: int) -> Any:
        def hook(module: nn.Module, args: Any, *rest: Any) -> None:
            if depth["n"] == 1 and key in starts:
                seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - starts.pop(key)
            depth["n"] -= 1
        return hook

    for part, paths in PART_MODULES.items():
        for path in paths:
            module = _find(model, path)
            if module is None:
                continue
            key = id(module)
            handles.append(module.register_forward_pre_hook(pre(part, key)))
            handles.append(module.register_forward_hook(post(part, key)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepMeasurement:
    """One forward + backward: losses, seconds per part, peak memory."""

    losses: dict[str, float]
    total_loss: float
    forward_seconds: float
    backward_seconds: float
    loss_seconds: float
    part_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    rss_before_bytes: int = 0
    tokens: int = 0
    saved_activation_bytes: int = 0

    @property
    def step_seconds(self) -> float:
        return self.forward_seconds + self.loss_seconds + self.backward_seconds


@contextlib.contextmanager
def _count_saved(counter: dict[str, int]) -> Iterator[None]:
    """Bytes of the distinct storages autograd saves for backward (the activations a plan must hold)."""
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or t.requires_grad and t.is_leaf:
            return t
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen and t.device.type != "meta":
                seen.add(key)
                counter["bytes"] += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def measure_step(model: nn.Module, batch: dict, criterion: Any, *, count_saved: bool = False) -> StepMeasurement:
    """Forward + losses + backward on ``batch`` (no optimizer step), timed per part, peak RSS measured.

    The caller sets train mode, trainability and any compute context (e.g. :class:`~fclm.training.bf16_cpu.Float32Matmuls`).
    ``count_saved`` also counts the bytes autograd saves for backward.
    """
    parts: dict[str, float] = {}
    saved = {"bytes": 0}
    reset_peak_rss()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    with _timed_parts(model, parts), (_count_saved(saved) if count_saved else contextlib.nullcontext()):
        outputs = model(batch)
        t1 = time.perf_counter()
        losses = criterion(outputs, batch)
        total = criterion.weighted_total(losses)
    t2 = time.perf_counter()
    total.backward()
    t3 = time.perf_counter()
    return StepMeasurement(
        losses={k: float(v.detach()) for k, v in losses.items()},
        total_loss=float(total.detach()),
        forward_seconds=t1 - t0,
        loss_seconds=t2 - t1,
        backward_seconds=t3 - t2,
        part_seconds=parts,
        peak_rss_bytes=peak_rss_bytes(),
        rss_before_bytes=rss_before,
        tokens=int(batch["attention_mask"].sum()),
        saved_activation_bytes=saved["bytes"],
    )


def run_cpu_scale_step(
    preset_name: str = "fclm-3b",
    *,
    image_pixels: int = 224 * 224,
    gradient_checkpointing: tuple[bool, ...] = (True,),
) -> dict[str, Any]:
    """Build ``preset_name`` with random bf16 weights, encode one sample's SAM frame, run stage-2 LoRA steps.

    The SAM image encoder runs once, at the real 1024 px frame, on the sample's image and region crop
    as the training cache fills it (``fclm-train``'s ``sam_cache``, on by default), timed; every step
    then takes those embeddings from the batch (``sam_image_embeddings``, ``region_crop_embeddings``),
    as training steps do once the cache is filled. The crop's slot holds the image's embedding (same
    shape and dtype as the encoder's output), so that the 5.6-TFLOP ViT-H pass runs once on this CPU.
    The whole model is cast to bf16 after the adapters are added, as DeepSpeed's bf16 mode does; bf16
    products run in float32 (:class:`~fclm.training.bf16_cpu.Float32Matmuls`). One step per entry of
    ``gradient_checkpointing`` (the same model, checkpointing switched on before the first ``True``).
    Returns build time and memory, the SAM pass, and per step: losses, which trainable parameters got
    finite gradients, time per part, the FLOP shares (:func:`fclm.training.plan.step_flops`), peak
    memory and the plan's prediction for the same setting (:func:`fclm.training.plan.step_memory`).
    """
    from fclm.config import LossConfig
    from fclm.model import build_fclm
    from fclm.model.backbone import enable_gradient_checkpointing
    from fclm.training.bf16_cpu import Float32Matmuls
    from fclm.training.config import STAGE_LOSS_WEIGHTS, STAGE_POLICIES
    from fclm.training.loop import build_criterion
    from fclm.training.plan import count_parameters, step_flops, step_memory
    from fclm.training.trainability import apply_trainability

    torch.manual_seed(0)
    cfg = random_model_config(preset_name, image_pixels=image_pixels)
    policy = STAGE_POLICIES[2]
    counts = count_parameters(cfg, policy)
    # The processor (151k-token vocabulary as Python objects) is host memory a GPU plan does not hold:
    # build it before the baseline, so that the measurement covers the model's tensors and the step.
    from fclm.processor import FCLMProcessor

    t0 = time.perf_counter()
    processor = FCLMProcessor.from_config(cfg)
    tokenizer_s = time.perf_counter() - t0
    reset_peak_rss()
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    model = build_fclm(cfg, processor=processor)
    build_s = time.perf_counter() - t0 + tokenizer_s
    result: dict[str, Any] = {
        "preset": preset_name, "image_pixels": image_pixels, "threads": torch.get_num_threads(),
        "build_seconds": build_s, "build_peak_gib": (peak_rss_bytes() - base_rss) / 2**30,
        "parameters": sum({id(p): p.numel() for p in model.parameters()}.values()),
        "backbone_dtype": str(model.qwen.dtype), "sam_encoder_dtype": str(model.sam.image_encoder.pos_embed.dtype),
    }
    result["trainable_parameters"] = apply_trainability(model, policy)
    model.to(torch.bfloat16)
    model.train()
    batch = model.processor(scale_records(1), scale_images(1))
    criterion = build_criterion(LossConfig(weights=dict(STAGE_LOSS_WEIGHTS[2])), model.config)
    reset_peak_rss()
    rss = rss_bytes()
    t0 = time.perf_counter()
    with Float32Matmuls():
        embeddings = model.sam.encode(batch["sam_images"])
    result["sam_encoder_seconds"] = time.perf_counter() - t0
    result["sam_encoder_peak_gib"] = (peak_rss_bytes() - rss) / 2**30
    result["sam_frame"] = list(batch["sam_images"].shape)
    result["sam_embedding"] = list(embeddings.shape)
    batch["sam_image_embeddings"] = embeddings
    n_regions = int(batch["region_masks"].shape[0])
    batch["region_crop_embeddings"] = embeddings[:1].expand(n_regions, -1, -1, -1).contiguous()
    steps = []
    for gc in gradient_checkpointing:
        if gc:  # the recomputation in backward must run its products the same way (same saved tensors)
            enable_gradient_checkpointing(model.backbone, context_fn=lambda: (contextlib.nullcontext(), Float32Matmuls()))
        model.zero_grad(set_to_none=True)
        with Float32Matmuls():
            m = measure_step(model, batch, criterion, count_saved=True)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: p.grad is not None and bool(torch.isfinite(p.grad).all()) for n, p in trainable.items()}
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        flops = step_flops(cfg, tokens=m.tokens, image_pixels=image_pixels, regions=n_regions, sam_encodes=1)
        plan = step_memory(cfg, policy, tokens=m.tokens, image_pixels=image_pixels, batch_size=1, regions=n_regions,
                           gradient_checkpointing=gc, sam_encodes=0, optimizer=False, counts=counts)
        steps.append({
            "gradient_checkpointing": gc, "tokens": m.tokens, "losses": m.losses, "total_loss": m.total_loss,
            "trainable_with_finite_grad": sum(grads.values()), "trainable_tensors": len(grads),
            "trainable_without_grad": [n for n, ok in grads.items() if not ok][:10],
            "frozen_with_grad": frozen_with_grad[:10],
            "forward_s": m.forward_seconds, "loss_s": m.loss_seconds, "backward_s": m.backward_seconds,
            "step_s": m.step_seconds, "part_forward_s": m.part_seconds,
            "flops": flops, "saved_activation_gib": m.saved_activation_bytes / 2**30,
            "peak_gib": (m.peak_rss_bytes - base_rss) / 2**30, "plan_gib": plan["total"] / 2**30,
            "rss_before_step_gib": (m.rss_before_bytes - base_rss) / 2**30,
            "plan": {k: v / 2**30 for k, v in plan.items()},
        })
    result["steps"] = steps
    return result
