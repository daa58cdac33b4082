"""Where a demo stage-1 step goes: batch encoding, forward + backward, and the AdamW step per implementation.

    python scripts/bench/train_parts.py [--threads 1] [--steps 30] [--out runs/bench/train_parts]

The model, trainability and data mixture of ``train/configs/demo_stage1.yaml`` (tiny preset, LoRA r8,
whole ``lm_head`` and ``embed_tokens``, warm SAM embedding cache) on ShapesRef (200 images, built once).
Each step, in one process and in this order so that load from other jobs falls on all parts alike:

1. the collator encodes the next batch of 8 records (image decoding, Qwen and SAM preprocessing, masks,
   tokens): the work a DataLoader worker (``data.num_workers``) takes off the training process;
2. forward + loss + backward (+ gradient clipping);
3. the optimizer step three times on the same gradients: ``fused=True`` (``optim.fused: true``),
   ``foreach=True`` and ``foreach=False`` (torch's per-tensor loop, its CPU default), each with its own state.

Prints medians over ``--steps`` steps after 3 warm-up steps, as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "train_parts")
    args = ap.parse_args(argv)

    import torch

    from data_builders.__main__ import main as data_main
    from fclm.losses import FCLMCriterion
    from fclm.training.building import build_model, prepare_for_training
    from fclm.training.config import load_train_config
    from fclm.training.loop import build_data, move_to_device
    from fclm.training.sam_cache import open_cache_for

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    data = args.out / "shapesref"
    if not (data / "train_res.jsonl").exists():
        assert data_main(["synthetic", "--n", "200", "--n-val", "4", "--seed", "0", "--out", str(data)]) == 0
    cfg = load_train_config(ROOT / "train" / "configs" / "demo_stage1.yaml",
                            [f"data.root={data}", f"sam_cache.dir={args.out / 'sam_cache'}", f"output_dir={args.out / 'run'}",
                             "recon_warmup.steps=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    prepare_for_training(model, cfg)
    model.train()
    criterion = FCLMCriterion(cfg.loss)
    cache = open_cache_for(model, cfg.sam_cache.dir)
    _, loader = build_data(cfg, model.processor, rank=0, world_size=1)
    sampler_batches = iter(loader.batch_sampler)
    collate, dataset = loader.collate_fn, loader.dataset
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {
        "AdamW fused=True (optim.fused: true)": torch.optim.AdamW(params, lr=1e-6, fused=True),
        "AdamW foreach=True": torch.optim.AdamW(params, lr=1e-6, foreach=True),
        "AdamW foreach=False (torch's CPU default)": torch.optim.AdamW(params, lr=1e-6, foreach=False),
    }
    times: dict[str, list[float]] = {"encode batch (collator)": [], "forward + backward": [], **{k: [] for k in optimizers}}
    for step in range(args.steps + 3):
        t = time.perf_counter()
        batch = collate([dataset[i] for i in next(sampler_batches)])
        t_enc = time.perf_counter() - t
        batch = move_to_device(batch, torch.device("cpu"))
        cache.fill_batch(batch, model.sam.encode)  # warm after the first pass over these images
        t = time.perf_counter()
        losses = criterion(model(batch), batch)
        criterion.weighted_total(losses).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        t_fb = time.perf_counter() - t
        step_times = {}
        for name, opt in optimizers.items():
            t = time.perf_counter()
            opt.step()
            step_times[name] = time.perf_counter() - t
        for p in params:
            p.grad = None
        if step >= 3:
            times["encode batch (collator)"].append(t_enc)
            times["forward + backward"].append(t_fb)
            for name, s in step_times.items():
                times[name].append(s)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    fused, loop = med["AdamW fused=True (optim.fused: true)"], med["AdamW foreach=False (torch's CPU default)"]
    base = med["encode batch (collator)"] + med["forward + backward"] + loop
    print(f"\n{len(params)} trainable tensors, {sum(p.numel() for p in params):,} parameters; {args.threads} thread(s); "
          f"median of {args.steps} steps of batch {cfg.data.batch_size}\n")
    print("| part of a step | median ms | share of a step (encode + fwd/bwd + per-tensor AdamW) |")
    print("|---|---:|---:|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.0%} |")
    print(f"\nfused AdamW saves {loop - fused:.1f} ms a step ({(loop - fused) / base:.0%}); a data worker takes "
          f"{med['encode batch (collator)']:.1f} ms ({med['encode batch (collator)'] / base:.0%}) off the training process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
