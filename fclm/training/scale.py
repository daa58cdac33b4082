"""Real-size checks without weights: the presets built with random weights, one measured training step.

Used by ``tests/scale/`` (the 3B step on CPU), ``scripts/bench/scale_step.py`` (``docs/benchmarks.md``,
"Real scale") and ``scripts/gpu_check.py``:

* :func:`random_model_config` — a preset (``fclm-3b``, ``fclm-7b``, or ``tiny``/``small``) with random
  weights and no files: ``backbone.random_init``, no SAM checkpoint, Qwen image size of the caller's choice.
* :func:`scale_records` — generated records with a ``<region>`` in the prompt and a ``[SEG]`` in the answer
  (a stage-2 DL-RES pair), so that every part runs: vision tower, SAM encoder (image and region crop),
  region extractor, LLM, seg projector and head, latent loss.
* :func:`measure_step` — one forward + backward with wall time per part (forward hooks), the
  process's peak resident memory (``VmHWM``, reset before the step) and, with ``track_allocations``,
  the peak of the live tensor bytes (:func:`allocator_trace`: the CPU analogue of
  ``torch.cuda.max_memory_allocated``, which is what the plan predicts for a GPU) with what was live then.

Two memory figures, because they answer different questions: the resident peak is what the process
needs from the machine (it also holds freed-but-resident heap pages, the allocator's own overhead and
host objects); the allocator peak counts tensor storages only, allocated minus freed, as a GPU's caching
allocator reports them. On this CPU the bf16 products run in float32 (:mod:`fclm.training.bf16_cpu`);
their transient float32 copies exist only here, so :func:`allocator_trace` marks them as *CPU-only*
(allocated inside a product of :class:`LabelledFloat32Matmuls` or in its linear's backward, except the
16-bit result a GPU would also allocate) and also reports the peak of the timeline without them.
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
from fclm.training.bf16_cpu import Float32Matmuls

__all__ = [
    "random_model_config", "scale_records", "scale_images", "measure_step", "StepMeasurement",
    "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "PART_MODULES", "AllocatorTrace", "allocator_trace",
    "tensor_bytes", "LabelledFloat32Matmuls", "CPU_ONLY_RANGE",
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


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensor storages in ``objects``: modules (parameters, buffers, gradients),
    tensors, and dicts / lists / tuples of them (a batch). The allocated bytes a step starts from."""
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            if t.device.type == "meta":
                return
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(t, nn.Module):
            for p in t.parameters():
                add(p)
                add(p.grad)
            for b in t.buffers():
                add(b)
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    for obj in objects:
        add(obj)
    return sum(storages.values())


CPU_ONLY_RANGE = "bf16_cpu::product"
"""Profiler range around each 16-bit product that :class:`LabelledFloat32Matmuls` computes in float32."""


def _is_cpu_product_backward(name: str) -> bool:
    return name.startswith("_Linear32Backward")


class LabelledFloat32Matmuls(Float32Matmuls):
    """:class:`~fclm.training.bf16_cpu.Float32Matmuls` with each intercepted product inside a profiler range
    :data:`CPU_ONLY_RANGE`, so that :func:`allocator_trace` can tell its float32 copies (CPU-only) apart."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # the products the parent computes in float32 (float32 ones run unchanged, as on a GPU)
        if self.intercepts(func, args, kwargs or {}) is not None:
            with torch.autograd.profiler.record_function(CPU_ONLY_RANGE):
                return super().__torch_function__(func, types, args, kwargs)
        return super().__torch_function__(func, types, args, kwargs)


@dataclass
class AllocatorTrace:
    """Tensor allocations of the CPU allocator during a region (:func:`allocator_trace`), in bytes.

    ``peak_bytes`` is the peak of allocated minus freed since the region began (storages that existed
    before it are not counted, nor their frees); ``reporter_peak_bytes`` the same peak from the
    allocator's own running total, a cross-check. ``live_at_peak``: what was allocated and not yet freed
    at the peak, grouped by site (module | autograd node or ``forward`` | outermost aten op, layer
    indices replaced by ``N``), largest first: ``{"site", "bytes", "count", "largest", "cpu_only"}``.
    """

    peak_bytes: int = 0
    reporter_peak_bytes: int = 0
    end_bytes: int = 0
    allocations: int = 0
    allocated_bytes: int = 0
    peak_site: str = ""
    cpu_only_at_peak_bytes: int = 0
    """Of ``peak_bytes``: the CPU-only float32 copies of the bf16 products live at the peak."""
    peak_without_cpu_only_bytes: int = 0
    """Peak of the same timeline with the CPU-only allocations left out (what a GPU would hold)."""
    peak_without_cpu_only_site: str = ""
    events: int = 0
    """Profiler events recorded (its buffers take a few hundred bytes each while it runs)."""
    live_at_peak: list[dict[str, Any]] = field(default_factory=list)
    live_at_peak_without_cpu_only: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def _module_ranges(model: nn.Module | None) -> Iterator[None]:
    """A profiler range ``module::<path>`` around every module's forward (recomputations included)."""
    if model is None:
        yield
        return
    handles = []
    stack: list[Any] = []

    def pre(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            rf = torch.autograd.profiler.record_function(f"module::{name}")
            rf.__enter__()
            stack.append(rf)
        return hook

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name or "<model>")))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while stack:
            stack.pop().__exit__(None, None, None)


_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")
_PEFT_PATH = re.compile(r"(base_model\.model\.|\.base_layer|\.default(?=\.|$))")


def _short_module(path: str) -> str:
    return _LAYER_INDEX.sub(".N", _PEFT_PATH.sub("", path))


def _allocation_records(prof: Any, trace: AllocatorTrace) -> list[tuple[int, int, int, int, str, bool]]:
    """(time ns, allocation id, bytes (negative: free), allocator total after, site, cpu_only) per CPU
    allocation event of a finished ``torch.profiler.profile``, in time order; counts the events in ``trace``."""
    from torch._C._profiler import _EventType

    records = []
    # (event, module, autograd node, outermost aten op of the innermost range, cpu_only, downcast)
    todo: list[tuple[Any, str, str, str, bool, bool]] = [
        (e, "", "forward", "", False, False) for e in prof.profiler.kineto_results.experimental_event_tree()]
    while todo:
        e, module, node, op, cpu, down = todo.pop()
        trace.events += 1
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type != "cpu":
                continue
            site = f"{_short_module(module) or '-'} | {node} | {op or '-'}"
            records.append((e.start_time_ns, f.allocation_id, f.alloc_size, f.total_allocated, site, cpu and not down))
            continue
        name = e.name
        if name.startswith("module::"):
            module, op = name[len("module::"):], ""
        elif name.startswith("autograd::engine::evaluate_function: "):
            node, op = name.split(": ", 1)[1], ""
            cpu = cpu or _is_cpu_product_backward(node)
        elif name == CPU_ONLY_RANGE:
            cpu, op = True, ""
        elif name.startswith("aten::"):
            if not op:
                shapes = []
                if e.tag == _EventType.TorchOp:
                    shapes = [list(i.sizes) for i in e.extra_fields.inputs if type(i).__name__ == "_TensorMetadata"]
                op = name + (str(shapes).replace(" ", "") if shapes else "")
            if cpu and name == "aten::_to_copy" and e.tag == _EventType.TorchOp:
                inputs = e.extra_fields.inputs
                # a float32 → 16-bit copy is the product's result, which a GPU allocates too
                down = bool(inputs) and getattr(inputs[0], "dtype", None) == torch.float32
        todo.extend((c, module, node, op, cpu, down) for c in e.children)
    records.sort(key=lambda r: r[0])
    # a free belongs to the class of its allocation
    cpu_only = {r[1] for r in records if r[2] > 0 and r[5]}
    return [r if r[2] > 0 else (*r[:5], r[1] in cpu_only) for r in records]


def _peak(records: list[tuple[int, int, int, int, str, bool]], top: int) -> tuple[int, str, list[dict[str, Any]], int]:
    """Peak of the running sum of ``records``, its site, the live allocations then (grouped), CPU-only bytes."""
    total = peak = 0
    peak_index = -1
    for i, r in enumerate(records):
        total += r[2]
        if total > peak:
            peak, peak_index = total, i
    live: dict[int, tuple[int, str, bool]] = {}
    for r in records[: peak_index + 1]:
        if r[2] > 0:
            live[r[1]] = (r[2], r[4], r[5])
        else:
            live.pop(r[1], None)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for size, site, cpu in live.values():
        g = groups.setdefault((site, cpu), {"site": site, "bytes": 0, "count": 0, "largest": 0, "cpu_only": cpu})
        g["bytes"] += size
        g["count"] += 1
        g["largest"] = max(g["largest"], size)
    ranked = sorted(groups.values(), key=lambda g: -g["bytes"])[:top]
    cpu_only = sum(size for size, _, cpu in live.values() if cpu)
    site = records[peak_index][4] if peak_index >= 0 else ""
    return peak, site, ranked, cpu_only


@contextlib.contextmanager
def allocator_trace(model: nn.Module | None = None, *, top: int = 20) -> Iterator[AllocatorTrace]:
    """Trace the CPU allocator's tensor allocations and frees inside the block; the returned
    :class:`AllocatorTrace` is filled when the block ends.

    ``torch.profiler.profile(activities=[CPU], profile_memory=True, record_shapes=True)`` reports every
    allocation and free of the CPU allocator with its size and the op that made it; the peak is that of the
    running sum in time order, relative to the start. With ``model``, each module's forward is a profiler
    range, so the live allocations are named by module (backward ones by autograd node). Frees of storages
    allocated before the block are not reported (the peak can only be overstated by them), and memory
    allocated outside torch's allocator (a library's own scratch buffers) is not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    trace = AllocatorTrace()
    with _module_ranges(model), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                        record_shapes=True) as prof:
        yield trace
    records = _allocation_records(prof, trace)
    if not records:
        return
    trace.allocations = sum(1 for r in records if r[2] > 0)
    trace.allocated_bytes = sum(r[2] for r in records if r[2] > 0)
    trace.end_bytes = sum(r[2] for r in records)
    start_total = records[0][3] - records[0][2]
    trace.reporter_peak_bytes = max(0, max(r[3] for r in records) - start_total)
    trace.peak_bytes, trace.peak_site, trace.live_at_peak, trace.cpu_only_at_peak_bytes = _peak(records, top)
    gpu_like = [r for r in records if not r[5]]
    trace.peak_without_cpu_only_bytes, trace.peak_without_cpu_only_site, trace.live_at_peak_without_cpu_only, _ = (
        _peak(gpu_like, top))


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
            if getattr(node, "backbone", None) is None:
                return None
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
    allocator: AllocatorTrace | None = None
    """With ``track_allocations``: the tensor allocations of the step (peak relative to its start)."""

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


def measure_step(model: nn.Module, batch: dict, criterion: Any, *, count_saved: bool = False,
                 track_allocations: bool = False) -> StepMeasurement:
    """Forward + losses + backward on ``batch`` (no optimizer step), timed per part, peak RSS measured.

    The caller sets train mode, trainability and any compute context (e.g. :class:`LabelledFloat32Matmuls`).
    ``count_saved`` also counts the bytes autograd saves for backward; ``track_allocations`` traces the
    allocator over the whole step (:func:`allocator_trace`; the profiler slows the step a little and its
    event buffers add a little resident memory).
    """
    parts: dict[str, float] = {}
    saved = {"bytes": 0}
    reset_peak_rss()
    rss_before = rss_bytes()
    with (allocator_trace(model) if track_allocations else contextlib.nullcontext()) as trace:
        t0 = time.perf_counter()
        with _timed_parts(model, parts), (_count_saved(saved) if count_saved else contextlib.nullcontext()):
            outputs = model(batch)
            t1 = time.perf_counter()
            losses = criterion(outputs, batch)
            total = criterion.weighted_total(losses)
        t2 = time.perf_counter()
        total.backward()
        t3 = time.perf_counter()
        peak_rss = peak_rss_bytes()  # before the profiler stops and its events are read
        del outputs
    return StepMeasurement(
        losses={k: float(v.detach()) for k, v in losses.items()},
        total_loss=float(total.detach()),
        forward_seconds=t1 - t0,
        loss_seconds=t2 - t1,
        backward_seconds=t3 - t2,
        part_seconds=parts,
        peak_rss_bytes=peak_rss,
        rss_before_bytes=rss_before,
        tokens=int(batch["attention_mask"].sum()),
        saved_activation_bytes=saved["bytes"],
        allocator=trace,
    )


def _gib_group(g: dict[str, Any]) -> dict[str, Any]:
    return {"site": g["site"], "gib": g["bytes"] / 2**30, "count": g["count"], "largest_mib": g["largest"] / 2**20,
            "cpu_only": g["cpu_only"]}


def run_cpu_scale_step(
    preset_name: str = "fclm-3b",
    *,
    image_pixels: int = 224 * 224,
    gradient_checkpointing: tuple[bool, ...] = (True,),
    trace_allocations: bool = True,
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
    resident memory and the plan's prediction for the same setting (:func:`fclm.training.plan.step_memory`).
    With ``trace_allocations`` each step runs a second time (same seed, same losses) under
    :func:`allocator_trace`: ``alloc_peak_gib`` (tensor bytes at the step's start — the model and the batch —
    plus the step's allocator peak: what ``torch.cuda.max_memory_allocated`` reports on a GPU),
    ``cpu_only_gib`` (the float32 copies of the bf16 products live at that peak, which a GPU does not
    make), ``alloc_peak_without_cpu_only_gib`` (the peak of the timeline without them) and what was live.
    """
    from fclm.config import LossConfig
    from fclm.model import build_fclm
    from fclm.model.backbone import enable_gradient_checkpointing
    from fclm.processor import FCLMProcessor  # imported before count_parameters' meta-device build
    from fclm.training.config import STAGE_LOSS_WEIGHTS, STAGE_POLICIES
    from fclm.training.loop import build_criterion
    from fclm.training.plan import GIB, count_parameters, step_flops, step_memory
    from fclm.training.trainability import apply_trainability

    torch.manual_seed(0)
    cfg = random_model_config(preset_name, image_pixels=image_pixels)
    policy = STAGE_POLICIES[2]
    counts = count_parameters(cfg, policy)
    # The processor (151k-token vocabulary as Python objects) is host memory a GPU plan does not hold:
    # build it before the baseline, so that the measurement covers the model's tensors and the step.
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
    with LabelledFloat32Matmuls():
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
            enable_gradient_checkpointing(model.backbone,
                                          context_fn=lambda: (contextlib.nullcontext(), LabelledFloat32Matmuls()))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same LoRA dropout masks in both runs of the step
        with LabelledFloat32Matmuls():
            m = measure_step(model, batch, criterion, count_saved=True)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: p.grad is not None and bool(torch.isfinite(p.grad).all()) for n, p in trainable.items()}
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        flops = step_flops(cfg, tokens=m.tokens, image_pixels=image_pixels, regions=n_regions, sam_encodes=1)
        plan = step_memory(cfg, policy, tokens=m.tokens, image_pixels=image_pixels, batch_size=1, regions=n_regions,
                           gradient_checkpointing=gc, sam_encodes=0, optimizer=False, counts=counts)
        step: dict[str, Any] = {
            "gradient_checkpointing": gc, "tokens": m.tokens, "losses": m.losses, "total_loss": m.total_loss,
            "trainable_with_finite_grad": sum(grads.values()), "trainable_tensors": len(grads),
            "trainable_without_grad": [n for n, ok in grads.items() if not ok][:10],
            "frozen_with_grad": frozen_with_grad[:10],
            "forward_s": m.forward_seconds, "loss_s": m.loss_seconds, "backward_s": m.backward_seconds,
            "step_s": m.step_seconds, "part_forward_s": m.part_seconds,
            "flops": flops, "saved_activation_gib": m.saved_activation_bytes / GIB,
            "peak_gib": (m.peak_rss_bytes - base_rss) / GIB, "plan_gib": plan["total"] / GIB,
            "rss_before_step_gib": (m.rss_before_bytes - base_rss) / GIB,
            "plan": {k: v / GIB for k, v in plan.items()},
        }
        if trace_allocations:
            # the same step again under the profiler (kept apart so that its event buffers and time stay out of
            # the resident peak and the timings above)
            model.zero_grad(set_to_none=True)
            before = tensor_bytes(model, batch)
            torch.manual_seed(1)
            with LabelledFloat32Matmuls():
                traced = measure_step(model, batch, criterion, track_allocations=True)
            trace = traced.allocator
            step.update({
                "traced_total_loss": traced.total_loss,
                "traced_peak_rss_gib": (traced.peak_rss_bytes - base_rss) / GIB,
                "traced_step_s": traced.step_seconds,
                "profiler_events": trace.events,
                "alloc_before_step_gib": before / GIB,
                "alloc_step_peak_gib": trace.peak_bytes / GIB,
                "alloc_peak_gib": (before + trace.peak_bytes) / GIB,
                "cpu_only_gib": trace.cpu_only_at_peak_bytes / GIB,
                "alloc_peak_without_cpu_only_gib": (before + trace.peak_without_cpu_only_bytes) / GIB,
                "alloc_peak_site": trace.peak_site,
                "alloc_peak_without_cpu_only_site": trace.peak_without_cpu_only_site,
                "alloc_step_end_gib": trace.end_bytes / GIB,
                "live_at_peak": [_gib_group(g) for g in trace.live_at_peak],
                "live_at_peak_without_cpu_only": [_gib_group(g) for g in trace.live_at_peak_without_cpu_only],
            })
        steps.append(step)
    result["steps"] = steps
    return result
