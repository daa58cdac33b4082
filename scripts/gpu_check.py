"""The GPU check's program (``scripts/gpu_check.sh`` prepares the environment and runs it).

    python scripts/gpu_check.py                          # fclm-3b, random bf16 weights, on cuda
    python scripts/gpu_check.py --device cpu --tiny --steps 3 --questions 3    # the same code path, tiny, on CPU

1. builds ``fclm-3b`` from configuration alone (Qwen2.5-VL-3B architecture, SAM ViT-H at 1024 px, the
   real vocabulary; random weights, bf16; flash-attn when importable on CUDA, else SDPA);
2. stage 2's trainability (LoRA r 16 on the LLM + new token rows), gradient checkpointing, AdamW;
   SAM embeddings of the generated images computed once (timed), as the training cache provides them;
3. ``--steps`` optimizer steps (bf16 autocast, trainable weights in float32) on generated DL-RES
   records (a ``<region>`` in the prompt, a ``[SEG]`` in the answer), the first ``--warmup`` untimed;
   prints samples/s, MFU and peak memory next to the memory plan's prediction;
4. ``FCLMPredictor`` grounding latency: one image set once, ``--questions`` questions, p50 and p90
   (the random LLM is rigged to answer ``[SEG]`` so that the SAM head runs: ``fclm.testing``).

MFU = achieved model FLOPs / the GPU's peak dense bf16 FLOPs. Model FLOPs per sample come from the
configs (``fclm.training.plan.step_flops``): per token, the LLM's forward is 2·N (N = 2.77e9 matrix
parameters of Qwen2.5-VL-3B's decoder; + 4·T·h per layer of attention + 2·h·V for lm_head) and its
backward under LoRA another 2·N (input gradients only: the frozen weights get none, so 4·N per token,
not full fine-tuning's 6·N); plus the frozen vision tower's forward. Recomputation by gradient
checkpointing is not counted (model FLOPs, not hardware FLOPs). The SAM encoder is excluded (cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0,
    "L40S": 362.0, "L40": 181.0, "A10": 125.0, "L4": 121.0, "A6000": 155.0, "4090": 165.0, "3090": 71.0,
}
"""Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by a substring of ``torch.cuda.get_device_name()``."""


def _peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FCLM GPU check: fclm-3b with random weights (see module docstring)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of fclm-3b (a CPU run of this script)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-pixels", type=int, default=448 * 448, help="Qwen image area of the generated images")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from fclm.config import LossConfig
    from fclm.model import build_fclm
    from fclm.model.backbone import enable_gradient_checkpointing
    from fclm.training.config import STAGE_LOSS_WEIGHTS, STAGE_POLICIES
    from fclm.training.loop import build_criterion, move_to_device
    from fclm.training.plan import step_flops, step_memory
    from fclm.training.scale import peak_rss_bytes, random_model_config, reset_peak_rss, scale_images, scale_records
    from fclm.training.trainability import apply_trainability

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    import transformers

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {name}")
    torch.manual_seed(0)
    side = int(args.image_pixels ** 0.5)
    preset_name = "tiny" if args.tiny else "fclm-3b"
    cfg = random_model_config(preset_name, image_pixels=None if args.tiny else side * side)
    size = (112, 112) if args.tiny else (side, side)
    t0 = time.perf_counter()
    with torch.device(device):  # random weights materialise on the device directly (fclm.model.backbone)
        model = build_fclm(cfg)
    policy = STAGE_POLICIES[2]
    n_trainable = apply_trainability(model, policy)
    enable_gradient_checkpointing(model.backbone)
    model.to(device=device, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 master weights for the trainable parameters (mixed precision)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    attn = model.qwen.config._attn_implementation
    print(f"built {preset_name} in {build_s:.1f} s: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, "
          f"{n_trainable / 1e6:.1f}M trainable, attention {attn}, bf16")

    # generated data; SAM embeddings once (the training cache's job), timed
    batches = []
    sam_s = 0.0
    for i in range(2):
        batch = model.processor(scale_records(args.batch_size, size, seed=i), scale_images(args.batch_size, size, seed=i))
        batch = move_to_device(batch, device)
        t0 = time.perf_counter()
        with torch.no_grad():
            batch["sam_image_embeddings"] = model.sam.encode(batch["sam_images"])
            batch["region_crop_embeddings"] = model.sam.encode(batch["region_crops"])
        if cuda:
            torch.cuda.synchronize()
        sam_s += time.perf_counter() - t0
        batches.append(batch)
    sam_images = 2 * args.batch_size * 2
    print(f"SAM image encoder: {sam_s / sam_images * 1000:.0f} ms per {model.sam.img_size}-px frame ({sam_images} frames)")

    criterion = build_criterion(LossConfig(weights=dict(STAGE_LOSS_WEIGHTS[2])), model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    losses, timed = [], 0.0
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = model(batch)
            parts = criterion(outputs, batch)
            total = criterion.weighted_total(parts)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed += time.perf_counter() - t0
        losses.append(total.item())
    timed_steps = max(1, args.steps - args.warmup)
    samples_s = timed_steps * args.batch_size / timed if timed > 0 else float("nan")
    tokens = int(batches[0]["attention_mask"].sum()) // args.batch_size
    flops = step_flops(cfg, tokens=tokens, image_pixels=size[0] * size[1], regions=1, sam_encodes=0)
    flops_per_sample = sum(flops.values())
    peak = _peak_flops(name, args.peak_tflops)
    mfu = flops_per_sample * samples_s / peak if peak else None
    peak_mem = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    plan = step_memory(cfg, policy, tokens=tokens, image_pixels=size[0] * size[1], batch_size=args.batch_size,
                       gradient_checkpointing=True, sam_encodes=0, zero="zero0", gpus=1)
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    print(f"train: {args.steps} stage-2 LoRA steps, batch {args.batch_size}, {tokens} tokens/sample, losses "
          f"{losses[0]:.3f} -> {losses[-1]:.3f} ({'finite' if finite else 'NOT FINITE'})")
    print(f"  {samples_s:.2f} samples/s, {timed / timed_steps * 1000:.0f} ms/step; model FLOPs/sample "
          f"{flops_per_sample / 1e12:.2f} T (LLM {flops['llm'] / 1e12:.2f} T, vision {flops['vision_tower'] / 1e12:.2f} T); "
          f"MFU {'%.1f%%' % (100 * mfu) if mfu is not None else 'n/a (pass --peak-tflops)'}")
    print(f"  peak memory {peak_mem / 2**30:.2f} GiB ({'torch.cuda.max_memory_allocated' if cuda else 'peak RSS'}); "
          f"plan (zero0, same batch) {plan['total'] / 2**30:.2f} GiB incl. {plan['overhead'] / 2**30:.1f} GiB overhead")

    # FCLMPredictor grounding latency
    from fclm.inference import FCLMPredictor
    from fclm.testing import rig_seg_answers
    from fclm.training.trainability import merge_adapters

    model.eval()
    merge_adapters(model)  # LoRA and the new token rows into the weights, so that the rig below holds
    model.to(torch.bfloat16)
    rig_seg_answers(model)
    predictor = FCLMPredictor(model)
    image = scale_images(1, size, seed=7)[0]
    predictor.set_image(image)
    latencies, grounded = [], 0
    for i in range(args.questions):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        answer = predictor.ask(f"Please segment object number {i}.", max_new_tokens=8)
        if cuda:
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
        grounded += bool(answer.segments)
    p50 = statistics.median(latencies)
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    print(f"predictor: {args.questions} grounding questions on one image: p50 {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms; "
          f"{grounded}/{args.questions} answers with a mask")
    figures = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__, "preset": preset_name,
        "attention": attn, "build_s": build_s, "trainable": n_trainable, "steps": args.steps, "batch_size": args.batch_size,
        "tokens_per_sample": tokens, "losses": losses, "finite": finite, "samples_per_s": samples_s,
        "flops_per_sample": flops_per_sample, "mfu": mfu, "peak_memory_gib": peak_mem / 2**30,
        "plan_gib": plan["total"] / 2**30, "sam_ms_per_frame": sam_s / sam_images * 1000,
        "latency_p50_ms": p50 * 1000, "latency_p90_ms": p90 * 1000, "grounded": grounded,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if finite and grounded == args.questions else 1


if __name__ == "__main__":
    sys.exit(main())
