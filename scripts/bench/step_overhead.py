"""Train-step time and peak memory: the bare Qwen2.5-VL backbone vs FCLM on the same batch.

    python scripts/bench/step_overhead.py [--presets tiny small] [--batch 4] [--steps 10]

For each preset, three runs, each in a fresh subprocess so that peak RSS is its own:
  backbone   HF Qwen2.5-VL forward + CE + backward (vision tower frozen, LLM trained)
  fclm       FCLM forward (SAM image encoder run on every step) + all losses + backward
  fclm-cache FCLM with the SAM image/crop embeddings given (the training SAM cache hits)
The batch: B images of coloured rectangles, each sample a referring-segmentation turn ([SEG]) and a
region-caption turn (<region>), so every FCLM part is on the path. Prints a table; the goal at the
``small`` preset is that FCLM's extras add at most 30% to the backbone step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image


def make_batch(model, batch_size: int, size: int, seed: int = 0) -> dict:
    from fclm.masks import encode_mask

    rng = np.random.default_rng(seed)
    records, images = [], []
    for i in range(batch_size):
        img = np.full((size, size, 3), 30, np.uint8)
        masks = []
        for _ in range(2):
            y0, x0 = rng.integers(0, size // 2, 2)
            h, w = rng.integers(size // 6, size // 2, 2)
            m = np.zeros((size, size), bool)
            m[y0 : y0 + h, x0 : x0 + w] = True
            img[m] = rng.integers(60, 255, 3)
            masks.append(m)
        images.append(Image.fromarray(img))
        records.append({
            "id": f"b{i}",
            "messages": [
                {"role": "user", "content": "Please segment: the first rectangle. Then describe <region> in detail."},
                {"role": "assistant", "content": "[SEG] It is a bright rectangle near the middle of the image."},
            ],
            "regions": [{"mask": encode_mask(masks[1])}],
            "targets": [{"masks": [encode_mask(masks[0])], "boxes": []}],
        })
    return model.processor(records, images)


def run_one(preset_name: str, mode: str, batch_size: int, steps: int) -> dict:
    from fclm.config import LossConfig, preset
    from fclm.losses import FCLMCriterion, causal_lm_loss
    from fclm.model import build_fclm

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    cfg = preset(preset_name)
    model = build_fclm(cfg)
    model.train()
    batch = make_batch(model, batch_size, size=int(cfg.backbone.max_pixels**0.5))
    params = [p for p in (model.qwen.parameters() if mode == "backbone" else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    criterion = FCLMCriterion(LossConfig())
    if mode == "fclm-cache":
        with torch.no_grad():
            batch["sam_image_embeddings"] = model.sam.encode(batch["sam_images"])
            batch["region_crop_embeddings"] = model.sam.encode(batch["region_crops"])

    def step() -> None:
        if mode == "backbone":
            logits = model.qwen(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False,
            ).logits
            loss = causal_lm_loss(logits, batch["labels"])
        else:
            outputs = model(batch)
            loss = criterion.weighted_total(criterion(outputs, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):  # warm-up
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "preset": preset_name, "mode": mode, "step_s": float(np.median(times)),
        "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - rss_before) / 1024,
        "tokens": int(batch["input_ids"].numel()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.batch, args.steps)))
        return
    rows = []
    for name in args.presets:
        for mode in ("backbone", "fclm", "fclm-cache"):
            cmd = [sys.executable, __file__, "--one", name, mode, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
    print("| preset | run | step (s) | × backbone | peak RSS (MB) | RSS growth in steps (MB) |")
    print("|---|---|---|---|---|---|")
    base = {r["preset"]: r for r in rows if r["mode"] == "backbone"}
    for r in rows:
        ratio = r["step_s"] / base[r["preset"]]["step_s"]
        print(f"| {r['preset']} | {r['mode']} | {r['step_s']:.3f} | {ratio:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
