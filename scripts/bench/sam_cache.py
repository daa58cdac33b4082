"""Training-step benchmark: the SAM embedding cache vs recomputing the encoder, and demo-stage throughput.

    python scripts/bench/sam_cache.py [--threads 1] [--steps 12] [--out runs/bench/sam_cache]

Part 1 (cache): a model whose SAM image encoder takes about 40% of a training step (as SAM ViT-H does
next to a 3B LLM): the tiny preset with a wider SAM encoder at 224 px (``--sam-dim``,
``--sam-depth``). On the same ShapesRef batches (stage-1 mixture, batch 8), alternating batch by
batch in one process: a full training step that runs the encoder, a full step that reads the
embeddings from a warm cache (lookup included), the encoder alone on the batch's images and
region crops, and the lookup alone.

Part 2 (throughput): samples/s of demo stage 1 and stage 2 (tiny preset, their trainability and
loss weights, warm SAM cache, AdamW) at batch 1, 4 and 16, and the process's peak RSS.

Each case runs in a fresh process (peak RSS is per case: the process's max RSS), on ShapesRef data built once. Times are
medians over ``--steps`` steps after 3 warm-up steps. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _cfg(case: dict, data: Path, cache_dir: Path):
    from fclm.training.config import train_config_from_dict

    stage = case["stage"]
    files = {1: ["train_res.jsonl", "train_region_caption.jsonl", "train_roc.jsonl"],
             2: ["train_dlres.jsonl", "train_res.jsonl", "train_region_caption.jsonl"]}[stage]
    model = {"preset": "tiny"}
    if case.get("big_sam"):
        model["sam"] = {"img_size": 224, "patch_size": 16, "encoder_embed_dim": case["sam_dim"], "encoder_depth": case["sam_depth"],
                        "encoder_num_heads": 4, "encoder_global_attn_indexes": [case["sam_depth"] - 1]}
    return train_config_from_dict({
        "stage": 1,  # stage 2's policy below; a stage-1 config avoids needing an export
        "model": model,
        "data": {"root": str(data), "train": [{"path": f} for f in files], "batch_size": case["batch"]},
        # as demo_stage1.yaml / demo_stage2.yaml: the whole lm_head trains in both stages
        "trainability": {"lm_head": "full", **({"region_extractor": "frozen", "projectors": "frozen", "sam_decoder": "frozen",
                                                "heads": "frozen"} if stage == 2 else {})},
        "loss": {"weights": {"loss_self_recon": 0.0, "loss_latent": 1.0}} if stage == 2 else {},
        "optim": {"lr": 1e-3},
        "sam_cache": {"dir": str(cache_dir)},
    })


def run_case(case: dict) -> dict:
    """One measurement in this process; returns timings and peak RSS."""
    import torch

    from fclm.losses import FCLMCriterion
    from fclm.training.building import build_model
    from fclm.training.loop import build_data, build_optimizer, move_to_device
    from fclm.training.sam_cache import open_cache_for
    from fclm.training.trainability import apply_trainability

    torch.set_num_threads(case["threads"])
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cfg = _cfg(case, Path(case["data"]), Path(case["cache"]))
    model = build_model(cfg)
    apply_trainability(model, cfg.trainability)
    model.train()
    criterion = FCLMCriterion(cfg.loss)
    optimizer, _ = build_optimizer(cfg, model, None)
    _, loader = build_data(cfg, model.processor, rank=0, world_size=1)
    n = case["steps"] + 3
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == n:
            break
    cache = open_cache_for(model, cfg.sam_cache.dir)
    for b in batches:  # warm the cache (what `fclm-train cache-sam` or the first epoch does)
        cache.fill_batch(dict(b), model.sam.encode)

    def step(batch: dict, cached: bool) -> None:
        batch = move_to_device(dict(batch), torch.device("cpu"))
        if cached:
            cache.fill_batch(batch, model.sam.encode)
        out = model(batch)
        total = criterion.weighted_total(criterion(out, batch))
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def encoder_only(batch: dict) -> None:
        with torch.no_grad():
            model.sam.encode(batch["sam_images"])
            if batch["region_crops"].shape[0]:
                model.sam.encode(batch["region_crops"])

    def lookup_only(batch: dict) -> None:
        cache.fill_batch(dict(batch), model.sam.encode)

    # The variants alternate batch by batch in this one process, so load from other jobs hits them alike.
    variants = {"cached": lambda b: step(b, True)}
    if case["mode"] == "compare":
        variants = {"recompute": lambda b: step(b, False), "cached": lambda b: step(b, True),
                    "encoder": encoder_only, "lookup": lookup_only}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i, b in enumerate(batches):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn(b)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    samples = sum(int(b["input_ids"].shape[0]) for b in batches[3:])
    return {
        **{f"{k}_s": statistics.median(v) for k, v in times.items()},
        **{f"{k}_samples_per_s": samples / sum(v) for k, v in times.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _spawn(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench/sam_cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--sam-dim", type=int, default=128)
    p.add_argument("--sam-depth", type=int, default=3)
    p.add_argument("--images", type=int, default=200)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    data = args.out / "shapesref"
    if not (data / "manifest.json").is_file():
        from data_builders.synthetic import ShapesRefOptions, build

        build(ShapesRefOptions(out=data, n=args.images, n_val=1, seed=0))
    base = {"data": str(data), "threads": args.threads, "steps": args.steps, "sam_dim": args.sam_dim, "sam_depth": args.sam_depth}
    print(f"# SAM cache benchmark ({args.threads} thread(s), median of {args.steps} steps after 3 warm-up)\n")
    r = _spawn({**base, "stage": 1, "batch": 8, "big_sam": True, "mode": "compare", "cache": str(args.out / "cache_big")})
    share = r["encoder_s"] / r["recompute_s"]
    print(f"SAM encoder {args.sam_dim}×{args.sam_depth} at 224 px (images + region crops): {share:.0%} of a step that recomputes it\n")
    print("| per step (batch 8, stage-1 mixture) | median s | samples/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| SAM encoder alone (images + crops) | {r['encoder_s']:.4f} | | |")
    print(f"| cache lookup alone (all hits) | {r['lookup_s']:.4f} | | |")
    print(f"| train step, encoder recomputed | {r['recompute_s']:.4f} | {r['recompute_samples_per_s']:.1f} | 1.00× |")
    print(f"| train step, SAM cache hits | {r['cached_s']:.4f} | {r['cached_samples_per_s']:.1f} | {r['recompute_s'] / r['cached_s']:.2f}× |")
    print(f"\npeak RSS of that process: {r['peak_rss_mib']:.0f} MiB")
    print("\n| demo stage | batch | median s/step | samples/s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for stage in (1, 2):
        for batch in (1, 4, 16):
            r = _spawn({**base, "stage": stage, "batch": batch, "mode": "throughput", "cache": str(args.out / "cache_tiny")})
            print(f"| {stage} | {batch} | {r['cached_s']:.3f} | {r['cached_samples_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
