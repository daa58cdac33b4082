"""Memory plan of a training run (``fclm-train plan CONFIG``): what each GPU holds per ZeRO stage, and FLOPs.

Parameter counts come from the model built on the meta device with the run's trainability applied
(:func:`count_parameters`: exact, no memory, seconds). Per GPU the plan adds:

* **model states** — frozen weights at their stored dtype (bf16 backbone and SAM encoder in the real
  presets), plus the trainable parameters through DeepSpeed's own estimators
  (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
  ``…stage3.estimate_zero3_model_states_mem_needs``, the functions behind the ``…_all_cold`` printers):
  16-bit weights (2 B) + 16-bit and fp32 gradients, fp32 master weights and Adam moments (18 B),
  the 18 B divided over the GPUs from ZeRO-2 on. The estimators assume every parameter trains; FCLM's
  frozen ones are added separately (2 B, partitioned only by ZeRO-3, on the CPU with parameter offload).
  ZeRO-0 is the stage-2 formula on one GPU (nothing partitioned).
* **activations** (per micro-batch, bf16), the analytic counts below, checked against what autograd
  really saves (``tests/training/test_plan.py`` counts the saved tensors of a real-width layer):

  - LLM, per decoder layer and token, without checkpointing: ``34·h + 6·kv + 11·I`` bytes (h hidden,
    kv = kv heads × head dim, I intermediate): the two RMSNorms (fp32 input + output), the LoRA dropout
    copies of every adapted projection's input, rotated q/k and v, the attention output, gate/up/SiLU/
    product of the MLP. With gradient checkpointing: the layer inputs (``2·h`` per layer and token) plus
    one layer recomputed in backward.
  - logits, the cross-entropy and ``lm_head``'s backward (:func:`logits_activation_bytes`; T tokens of the
    micro-batch, V vocabulary, h hidden), the larger of two moments, checked against the allocator on a
    real-width ``lm_head`` (``tests/training/test_plan.py``):

    · the loss's backward: ``14·T·V`` bytes — the bf16 logits (2), the float32 log-softmax the loss saves
      (4), the float32 gradients of the NLL and of the log-softmax (4 + 4); the loss's float32 copy of the
      logits is freed once the log-softmax is taken;
    · with LoRA and the new token rows, peft's trainable-token layer multiplies with a merged copy of
      ``lm_head`` (base rows + the new tokens' deltas, ``2·V·h`` bytes: 0.58 GiB for 3B), which autograd
      saves (present at the loss's backward too), and ``lm_head``'s backward computes the gradient of
      that whole merged matrix (another ``2·V·h``) before the new rows are picked from it — beside the
      logits and their bf16 gradient (``4·T·V``) and the gradient of the last hidden states (``2·T·h``).
      The embedding's merged copy (forward) and its dense gradient (end of backward), ``2·V·h`` each at
      moments with little else alive, stay below.
  - the frozen encoders save nothing for backward; their transient peak counts when they run in the
    step: SAM ViT-H's global attention (``3 × heads × N² × 2`` bytes per image: scores, scores + relative
    positions, softmax; N = 4096 tokens at 1024 px) — zero when the SAM embedding cache supplies the
    embeddings (``sam_cache.enabled``, the default) — and the vision tower's MLP (``6 × patches × I_v``).
    A trained vision tower adds its blocks' activations like the LLM's.
  The encoders run before the LLM, so the activation peak is the larger of the two phases.
* **overhead** — 1 GiB per GPU for the CUDA context, kernels and allocator slack (an assumption; a plan
  "fits" when the total stays under 90% of the GPU).

Token count per sample: image tokens (``max_pixels / (14·14·4)``) + ``text_tokens`` (default 256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fclm.config import FCLMConfig
from fclm.training.config import TrainabilityPolicy, TrainConfig

__all__ = [
    "ParameterCounts", "count_parameters", "llm_activation_bytes_per_token_layer", "logits_activation_bytes",
    "step_memory", "step_flops",
    "zero_plans", "ZERO_SETUPS", "GIB", "format_plan", "default_tokens", "HARDWARE", "OVERHEAD_BYTES",
]

GIB = 2**30
OVERHEAD_BYTES = 1 * GIB
"""CUDA context, kernels and allocator slack per GPU (an assumption, see the module docstring)."""
FIT_FRACTION = 0.9
"""A plan fits a GPU when its total stays under this share of the GPU's memory."""

ZERO_SETUPS: dict[str, dict[str, Any]] = {
    "zero0": dict(stage=0, offload_optimizer=False, offload_param=False),
    "zero2": dict(stage=2, offload_optimizer=False, offload_param=False),
    "zero2_offload": dict(stage=2, offload_optimizer=True, offload_param=False),
    "zero3": dict(stage=3, offload_optimizer=False, offload_param=False),
    "zero3_offload": dict(stage=3, offload_optimizer=True, offload_param=True),
}
"""The set-ups a plan compares; the non-zero0 names are the shipped ``train/deepspeed/*.json``."""

HARDWARE: tuple[tuple[str, int, float], ...] = (("1×24 GB", 1, 24.0), ("1×80 GB", 1, 80.0), ("8×80 GB", 8, 80.0))
"""(label, GPUs, GiB per GPU): a "24 GB" card (RTX 3090/4090, A10, L4) has 24 GiB, an "80 GB" one 80 GiB."""

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

QUANTIZED_BYTES = {"4bit": 4.127 / 8, "8bit": 1.0 + 4 / 4096}
"""Bytes per quantised weight: NF4 with double quantisation (4 bits + an 8-bit absmax per 64 weights + a
float32 scale per 256 absmax blocks), LLM.int8 (1 byte + a float32 scale per row of ~4096)."""


@dataclass
class ParameterCounts:
    """Parameters of a model under a trainability policy (tied weights counted once)."""

    total: int
    trainable: int
    frozen_bytes: int
    """Bytes of the frozen parameters at their stored dtype."""
    largest_layer: int
    """Largest single module's own parameters (ZeRO-3 gathers one at a time)."""
    parts: dict[str, int]
    """Parameters per part: ``backbone``, ``vision_tower``, ``sam_image_encoder``, ``other``."""


def count_parameters(cfg: FCLMConfig, policy: TrainabilityPolicy | None = None) -> ParameterCounts:
    """Build ``cfg`` on the meta device (nothing allocated), apply ``policy`` (LoRA adapters included), count.

    The backbone is built from ``cfg.backbone.arch`` (random weights; the architecture is what counts),
    so a checkpoint path need not exist.
    """
    from fclm.config import from_dict
    from fclm.model import build_fclm
    from fclm.training.trainability import apply_trainability

    from pathlib import Path

    quantization = cfg.backbone.quantization
    data: dict[str, Any] = {"sam": {"checkpoint": None}, "backbone": {"quantization": "none"}}
    b = cfg.backbone
    if b.arch is None and b.name_or_path is not None:
        config_json = Path(b.name_or_path) / "config.json"
        if not config_json.is_file():
            raise ValueError(f"model.backbone.arch: the plan needs the architecture; {config_json} does not exist "
                             "(set model.backbone.arch, e.g. qwen2_5_vl_3b, or a local checkpoint)")
        data["backbone"]["arch"] = str(config_json)
    if b.arch is not None or b.name_or_path is not None:
        data["backbone"]["random_init"] = True
    cfg = from_dict(FCLMConfig, data, prefix="model", base=cfg)
    with torch.device("meta"):
        model = build_fclm(cfg)
        if policy is not None:
            apply_trainability(model, policy)
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in unique if not p.requires_grad)
    if quantization != "none":  # the LLM's decoder linear weights are stored in 4 / 8 bits
        per_param = QUANTIZED_BYTES[quantization]
        for m in model.qwen.model.language_model.layers.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, torch.nn.Linear) and w is not None and not w.requires_grad:
                frozen_bytes -= int(w.numel() * (w.element_size() - per_param))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    qwen = model.qwen
    visual = sum(p.numel() for p in qwen.model.visual.parameters())
    backbone = sum({id(p): p.numel() for p in qwen.parameters()}.values())
    sam_encoder = sum(p.numel() for p in model.sam.image_encoder.parameters())
    parts = {"backbone": backbone, "vision_tower": visual, "sam_image_encoder": sam_encoder,
             "other": total - backbone - sam_encoder}
    return ParameterCounts(total, trainable, frozen_bytes, largest, parts)


# --------------------------------------------------------------------------------------------------
# sizes read from the config
# --------------------------------------------------------------------------------------------------


def _dims(cfg: FCLMConfig) -> dict[str, int]:
    """LLM / vision / SAM widths of ``cfg`` (the published architecture when ``backbone.arch`` is set)."""
    b = cfg.backbone
    if b.arch is not None:
        from fclm.model.backbone import arch_config

        c = arch_config(b.arch)
        t, v = c.text_config, c.vision_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        d = dict(h=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                 kv=t.num_key_value_heads * head_dim, inter=t.intermediate_size, vocab=t.vocab_size,
                 vh=v.hidden_size, vdepth=v.depth, vinter=v.intermediate_size, vfull=len(v.fullatt_block_indexes),
                 patch=v.patch_size, merge=v.spatial_merge_size, window=v.window_size)
    else:
        head_dim = b.text_hidden_size // b.text_heads
        d = dict(h=b.text_hidden_size, layers=b.text_layers, heads=b.text_heads, kv=b.text_kv_heads * head_dim,
                 inter=b.text_intermediate_size, vocab=b.tiny_vocab_size, vh=b.vision_hidden_size,
                 vdepth=b.vision_depth, vinter=b.vision_intermediate_size, vfull=len(b.fullatt_block_indexes),
                 patch=b.patch_size, merge=b.spatial_merge_size, window=b.window_size)
    s = cfg.sam
    d.update(sam_dim=s.encoder_embed_dim, sam_depth=s.encoder_depth, sam_heads=s.encoder_num_heads,
             sam_global=len(s.encoder_global_attn_indexes), sam_tokens=s.embedding_size**2,
             sam_window=s.encoder_window_size, sam_out=s.prompt_embed_dim, sam_patch=s.patch_size)
    return d


def default_tokens(cfg: FCLMConfig, text_tokens: int = 256) -> int:
    """Tokens of one sample at the largest image: ``max_pixels / (patch² · merge²)`` image tokens + text."""
    d = _dims(cfg)
    return cfg.backbone.max_pixels // (d["patch"] ** 2 * d["merge"] ** 2) + text_tokens


def llm_activation_bytes_per_token_layer(h: int, kv: int, inter: int, lora: bool = True) -> int:
    """Bytes one decoder layer saves for backward per token, bf16 (module docstring); without LoRA the
    dropout copies of the projections' inputs (``9·h + 3·h + 6·h`` of the ``34·h``, ``3·I``) are absent."""
    if lora:
        return 34 * h + 6 * kv + 11 * inter
    return 16 * h + 6 * kv + 8 * inter


def logits_activation_bytes(tokens: int, vocab: int, hidden: int, *, token_rows: bool) -> int:
    """Peak bytes of the logits and the cross-entropy (and ``lm_head``'s backward) for ``tokens`` tokens
    (all samples of the micro-batch), bf16 model, float32 loss (module docstring). ``token_rows``: peft's
    trainable-token layer wraps ``lm_head`` (LoRA + new token rows), so a merged ``V×h`` copy is saved
    and its gradient computed."""
    loss_backward = 14 * tokens * vocab
    if not token_rows:
        return loss_backward
    merged = 2 * vocab * hidden
    lm_head_backward = 4 * tokens * vocab + 2 * merged + 2 * tokens * hidden
    return max(loss_backward + merged, lm_head_backward)


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def step_flops(cfg: FCLMConfig, *, tokens: int, image_pixels: int, regions: int = 1, sam_encodes: int = 1,
               llm_backward: float = 1.0) -> dict[str, float]:
    """Matrix-product FLOPs of one sample's training step, per part (forward; the LLM also backward).

    ``llm_backward``: backward cost of the LLM in forward units (1.0 with frozen weights under LoRA: input
    gradients only; 2.0 when its weights train). Encoders are frozen (forward only). ``sam_encodes``:
    SAM image-encoder passes (the image, plus one per region crop; 0 with the embedding cache).
    """
    d = _dims(cfg)
    h, L, kv, inter, V = d["h"], d["layers"], d["kv"], d["inter"], d["vocab"]
    T = tokens
    llm_params = L * (h * (h + kv) + h * kv + h * h + 3 * h * inter)  # q + k,v + o + gate/up/down
    llm_fwd = 2 * T * llm_params + L * 4 * T * T * h + 2 * T * h * V
    # vision tower: patches, windowed attention (window_size px / patch per side) and full-attention blocks
    P = image_pixels // d["patch"] ** 2
    vh, vinter = d["vh"], d["vinter"]
    win = min(P, (d["window"] // d["patch"]) ** 2)
    vision = P * (2 * d["vdepth"] * (4 * vh * vh + 3 * vh * vinter)
                  + 4 * vh * ((d["vdepth"] - d["vfull"]) * win + d["vfull"] * P))
    vision += 2 * P * (3 * 2 * d["patch"] ** 2) * vh  # patch embedding
    m2 = vh * d["merge"] ** 2
    vision += 2 * (P // d["merge"] ** 2) * (m2 * m2 + m2 * h)  # merger MLP
    # SAM ViT image encoder
    N, sd = d["sam_tokens"], d["sam_dim"]
    swin = min(N, d["sam_window"] ** 2) if d["sam_window"] else N
    sam = N * (2 * d["sam_depth"] * (4 * sd * sd + 8 * sd * sd)
               + 4 * sd * ((d["sam_depth"] - d["sam_global"]) * swin + d["sam_global"] * N))
    sam += 2 * N * (3 * d["sam_patch"] ** 2) * sd + 2 * N * (sd * d["sam_out"] + 9 * d["sam_out"] ** 2)
    # heads: the SAM mask decoder over the 64×64 embedding, per [SEG] and per <pos> reconstruction. Per layer
    # the image side runs the token↔image attentions at width c/2 (k, v, q, out: 2·c² per position); the MLP
    # runs on the few prompt tokens only; the final attention and the two transposed convolutions add 2.5·c².
    c = cfg.sam.prompt_embed_dim
    decoder = 2 * N * c * c * (2 * cfg.sam.decoder_depth + 2.5)
    heads = decoder * (1 + regions)
    losses = 5.0 * T * V  # softmax + log + gather over the vocabulary (elementwise, not matrix products)
    return {
        "vision_tower": float(vision),
        "sam_encoder": float(sam * sam_encodes),
        "llm": float(llm_fwd * (1.0 + llm_backward)),
        "heads": float(heads * 2),
        "losses": float(losses),
    }


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def _trainable_states(n: int, largest: int, gpus: int, stage: int, offload_optimizer: bool, offload_param: bool) -> int:
    """GPU bytes of ``n`` trainable parameters' model states from DeepSpeed's estimators."""
    if n == 0:
        return 0
    try:
        import deepspeed  # noqa: F401
    except ImportError:  # a machine without DeepSpeed (the GPU check): the estimators' formulas, written out
        total = 1 if stage == 0 else gpus
        if stage == 3:
            return 0 if offload_optimizer else int(18 * n / total)
        return 2 * n + (0 if offload_optimizer else int(18 * n / total))
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, largest_bytes = estimate_zero3_model_states_mem_needs(
            n, min(largest, n), num_gpus_per_node=gpus, cpu_offload=offload_optimizer, cpu_offload_params=offload_param)
        return int(gpu - largest_bytes)  # the gathered largest layer is counted with the frozen weights
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=1 if stage == 0 else gpus,
                                                   cpu_offload=offload_optimizer)
    return int(gpu)


def step_memory(
    cfg: FCLMConfig,
    policy: TrainabilityPolicy,
    *,
    tokens: int | None = None,
    image_pixels: int | None = None,
    batch_size: int = 1,
    regions: int = 1,
    gradient_checkpointing: bool = True,
    sam_encodes: int = 0,
    optimizer: bool = True,
    zero: str = "zero0",
    gpus: int = 1,
    counts: ParameterCounts | None = None,
) -> dict[str, int]:
    """Bytes per GPU of one training step: ``weights``, ``gradients_and_optimizer``, ``activations``,
    ``overhead``, ``total`` (module docstring).

    ``optimizer=False``: a forward + backward without optimizer states (trainable weights and their
    fp32 gradients only), for comparison with a measured CPU step; no overhead then.
    """
    counts = counts or count_parameters(cfg, policy)
    setup = ZERO_SETUPS[zero]
    d = _dims(cfg)
    tokens = tokens if tokens is not None else default_tokens(cfg)
    image_pixels = image_pixels if image_pixels is not None else cfg.backbone.max_pixels
    frozen = counts.frozen_bytes
    if setup["stage"] == 3:
        frozen = 0 if setup["offload_param"] else frozen // gpus
        frozen += 2 * counts.largest_layer  # one gathered layer at a time
    n_train = counts.trainable
    if optimizer:
        states = _trainable_states(n_train, counts.largest_layer, gpus, setup["stage"], setup["offload_optimizer"],
                                   setup["offload_param"])
    else:
        states = 8 * n_train  # fp32 weights + fp32 gradients
    # activations per micro-batch
    lora = policy.llm == "lora"
    per_layer = llm_activation_bytes_per_token_layer(d["h"], d["kv"], d["inter"], lora=lora)
    T = tokens * batch_size
    if policy.llm == "frozen":
        llm = 0
    elif gradient_checkpointing:
        llm = d["layers"] * T * 2 * d["h"] + per_layer * T
    else:
        llm = d["layers"] * T * per_layer
    # peft's trainable-token layer multiplies with a merged copy of the output matrix (base rows + the new
    # tokens' deltas): one V·h bf16 matrix saved, and its gradient in backward, per step whatever the batch
    token_rows = lora and policy.new_token_rows and policy.lm_head == "rows"
    logits = logits_activation_bytes(T, d["vocab"], d["h"], token_rows=token_rows)
    patches = image_pixels // d["patch"] ** 2
    vision = 6 * patches * d["vinter"] * batch_size
    if policy.vision_tower == "full":
        per_block = 34 * d["vh"] + 11 * d["vinter"]
        vision = patches * batch_size * (2 * d["vh"] * d["vdepth"] + per_block if gradient_checkpointing
                                         else per_block * d["vdepth"])
    sam = 3 * d["sam_heads"] * d["sam_tokens"] ** 2 * _BYTES[cfg.sam.encoder_dtype] * (1 if sam_encodes else 0)
    activations = max(sam + vision, llm + logits + vision)
    overhead = OVERHEAD_BYTES if optimizer else 0
    total = frozen + states + activations + overhead
    return {"weights": int(frozen), "gradients_and_optimizer": int(states), "activations": int(activations),
            "llm_activations": int(llm), "logits": int(logits), "sam_encoder_peak": int(sam),
            "overhead": int(overhead), "total": int(total)}


def zero_plans(tcfg: TrainConfig, model_cfg: FCLMConfig, *, gpus: int, tokens: int | None = None,
               counts: ParameterCounts | None = None) -> list[dict[str, Any]]:
    """One row per set-up of :data:`ZERO_SETUPS` for the run ``tcfg`` on ``gpus`` GPUs (bytes per GPU), with
    whether it fits each of :data:`HARDWARE` (at that hardware's GPU count)."""
    counts = counts or count_parameters(model_cfg, tcfg.trainability)
    sam_encodes = 0 if tcfg.sam_cache.enabled else 2
    rows = []
    for name in ZERO_SETUPS:
        kw = dict(tokens=tokens, batch_size=tcfg.data.batch_size, gradient_checkpointing=tcfg.gradient_checkpointing,
                  sam_encodes=sam_encodes, zero=name, counts=counts)
        per_gpu = {n: step_memory(model_cfg, tcfg.trainability, gpus=n, **kw) for n in sorted({1, gpus, 8})}
        rows.append({"setup": name, "gpus": gpus, "memory": per_gpu[gpus],
                     "fits": {label: per_gpu[n]["total"] <= FIT_FRACTION * gb * GIB for label, n, gb in HARDWARE}})
    return rows


def format_plan(rows: list[dict[str, Any]], counts: ParameterCounts, *, title: str, gpu_mem_gib: float | None = None) -> str:
    """The plan as a Markdown table (GiB per GPU) with the fit columns."""
    lines = [f"{title}",
             f"parameters: {counts.total:,} total, {counts.trainable:,} trainable "
             f"(backbone {counts.parts['backbone']:,}, SAM image encoder {counts.parts['sam_image_encoder']:,})",
             "",
             "| set-up | GPUs | weights | grads+optim | activations | overhead | total GiB/GPU | "
             + " | ".join(label for label, _, _ in HARDWARE) + (" | your GPU |" if gpu_mem_gib else " |"),
             "|---|---|---|---|---|---|---|" + "---|" * len(HARDWARE) + ("---|" if gpu_mem_gib else "")]
    for r in rows:
        m = {k: v / GIB for k, v in r["memory"].items()}
        fits = " | ".join("yes" if r["fits"][label] else "no" for label, _, _ in HARDWARE)
        mine = ""
        if gpu_mem_gib:
            mine = " | " + ("yes" if r["memory"]["total"] <= FIT_FRACTION * gpu_mem_gib * GIB else "no")
        lines.append(f"| {r['setup']} | {r['gpus']} | {m['weights']:.1f} | {m['gradients_and_optimizer']:.1f} | "
                     f"{m['activations']:.1f} | {m['overhead']:.1f} | {m['total']:.1f} | {fits}{mine} |")
    lines.append("")
    lines.append("fit columns: the total at that GPU count stays under 90% of the GPU; zero0 never partitions")
    return "\n".join(lines)
