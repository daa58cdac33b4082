"""Probe: does the plain LISA seg projector (``seg_query_norm: none``) learn to route the expression?

    python scripts/experiments/routing_probe.py --variants base,standardize,embed_full --steps 600 [--threads 1]

Each variant is a short RES-only stage 1 (``train/configs/demo_stage1.yaml`` with ``data.train`` =
``train_res.jsonl`` only, no reconstruction warm-up, ``--steps`` steps, lr warm-up 100) on the recipe the demo
had before issue 17 (``OLD_RECIPE``, pinned) with one wiring difference switched (``VARIANTS``); every run
starts from the same random tiny model (seed 0). Reported per variant:

* ``hseg_var_init`` / ``hseg_var``: variance of ``h[SEG]`` across held-out prompts as a fraction of its mean
  squared norm, at initialisation and after training;
* ``zseg_spread``: mean distance between two prompts' ``z_seg`` / mean ``‖z_seg‖`` after training;
* ``giou``: teacher-forced held-out gIoU (mask of the ``[SEG]`` in the ground-truth answer, logits > 0,
  SAM frame) on the first ``--n-val`` ``val_res`` records, overall and per ``meta.difficulty``;
* the training seconds (1 torch thread; the machine may be shared).

``no_system`` drops the system turn from every prompt (a monkeypatch of the processor, for this probe
only: FCLM keeps Qwen's default system prompt).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The recipe of demo_stage1.yaml before issue 17 (LoRA r16 with dropout, new-token rows, AdamW betas
# (0.9, 0.999) without clipping, cosine lr), pinned so that the variants change one thing each.
OLD_RECIPE = ["trainability.embed_tokens=rows", "trainability.lora.r=16", "trainability.lora.alpha=32",
              "trainability.lora.dropout=0.05", "optim.betas=[0.9,0.999]", "optim.grad_clip=0.0",
              "optim.schedule=cosine", "optim.min_lr_ratio=0.1"]
BASE = OLD_RECIPE + ["model.seg_query_norm=none"]
VARIANTS: dict[str, list[str]] = {
    "base": BASE,
    "standardize": OLD_RECIPE + ["model.seg_query_norm=standardize"],
    "no_system": BASE,  # + the processor patch
    "embed_full": BASE + ["trainability.embed_tokens=full"],
    "lora_r8": BASE + ["trainability.lora.r=8", "trainability.lora.alpha=16", "trainability.lora.dropout=0.0"],
    "optim": BASE + ["optim.betas=[0.9,0.95]", "optim.grad_clip=1.0", "optim.schedule=constant"],
    "all": BASE + ["trainability.embed_tokens=full", "trainability.lora.r=8", "trainability.lora.alpha=16",
                   "trainability.lora.dropout=0.0", "optim.betas=[0.9,0.95]", "optim.grad_clip=1.0",
                   "optim.schedule=constant"],
    "no_system_all": BASE + ["trainability.embed_tokens=full", "trainability.lora.r=8", "trainability.lora.alpha=16",
                             "trainability.lora.dropout=0.0", "optim.betas=[0.9,0.95]", "optim.grad_clip=1.0",
                             "optim.schedule=constant"],
    "optim_embed_full": BASE + ["trainability.embed_tokens=full", "optim.betas=[0.9,0.95]", "optim.grad_clip=1.0",
                                "optim.schedule=constant"],
    "optim_lora_r8": BASE + ["trainability.lora.r=8", "trainability.lora.alpha=16", "trainability.lora.dropout=0.0",
                             "optim.betas=[0.9,0.95]", "optim.grad_clip=1.0", "optim.schedule=constant"],
    "embed_full_r8": BASE + ["trainability.embed_tokens=full", "trainability.lora.r=8", "trainability.lora.alpha=16",
                             "trainability.lora.dropout=0.0"],
}


@contextlib.contextmanager
def without_system_turn(enabled: bool):
    """Drop the ``<|im_start|>system … <|im_end|>\\n`` prefix from every encoded conversation."""
    from fclm.processor import FCLMProcessor

    if not enabled:
        yield
        return
    original = FCLMProcessor._conversation_ids

    def patched(self, system, turns, n_image_tokens, add_generation_prompt):
        ids, labels, n_seg = original(self, system, turns, n_image_tokens, add_generation_prompt)
        cut = ids.index(self.token_ids["im_end"]) + 1 + len(self._text("\n"))
        return ids[cut:], labels[cut:], n_seg

    FCLMProcessor._conversation_ids = patched
    try:
        yield
    finally:
        FCLMProcessor._conversation_ids = original


def read_jsonl(path: Path, limit: int) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip() and len(out) < limit:
                out.append(json.loads(line))
    return out


@torch.no_grad()
def held_out(model, records: list[dict], batch_size: int = 16) -> dict:
    """Teacher-forced gIoU (overall, per difficulty), h[SEG] variance fraction and z_seg spread."""
    from fclm.data.collator import FCLMCollator

    model.eval()
    collate = FCLMCollator(model.processor)
    ious, hs, zs, diffs = [], [], [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        batch = collate(chunk)
        out = model(batch)
        hs.append(out["seg_hidden"].float())
        zs.append(out["seg_embeddings"].float())
        head = out["heads"]["sam"]
        logits = head["pred_masks"].float()
        target = batch["target_masks"][head["query_index"]] > 0.5
        s = target.shape[-1]
        pred = F.interpolate(logits[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0
        valid = torch.zeros_like(target)
        for r, b in enumerate(batch["seg_batch_index"][head["query_index"]].tolist()):
            h, w = batch["sam_valid_hw"][b].tolist()
            valid[r, :h, :w] = True
        inter = (pred & target & valid).flatten(1).sum(1).float()
        union = ((pred | target) & valid).flatten(1).sum(1).float()
        ious += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
        diffs += [r["meta"].get("difficulty", "?") for r in chunk]
    h, z = torch.cat(hs), torch.cat(zs)
    result = {
        "giou": sum(ious) / len(ious),
        "hseg_var": float(h.var(0).sum() / (h * h).sum(1).mean()),
        "zseg_spread": float(torch.cdist(z, z).mean() / z.norm(dim=-1).mean()),
    }
    for d in sorted(set(diffs)):
        v = [x for x, k in zip(ious, diffs) if k == d]
        result[f"giou_{d}"] = sum(v) / len(v)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "shapesref")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "runs" / "demo" / "tokenizer")
    ap.add_argument("--sam-cache", type=Path, default=ROOT / "runs" / "demo" / "sam_cache")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fclm_routing_probe"))
    ap.add_argument("--variants", default="base,standardize")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from fclm.config import preset
    from fclm.model import FCLM, build_fclm
    from train.__main__ import main as train_main

    val = [{**r, "image": str(args.data / r["image"])} for r in read_jsonl(args.data / "val_res.jsonl", args.n_val)]
    results = []
    for name in args.variants.split(","):
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        with without_system_turn(name.startswith("no_system")):
            cfg = preset("tiny")
            cfg.backbone.tokenizer = str(args.tokenizer)
            torch.manual_seed(0)
            init = held_out(build_fclm(cfg), val[:64])
            overrides = [
                f"output_dir={out}", f"data.root={args.data}", "data.train=[{path: train_res.jsonl, weight: 1.0}]",
                f"model.backbone.tokenizer={args.tokenizer}", f"sam_cache.dir={args.sam_cache}", f"max_steps={args.steps}",
                "logging.progress_bar=false", "logging.tensorboard=false", f"checkpoint.every={args.steps}",
                f"cpu_threads={args.threads}", "recon_warmup.steps=0", *VARIANTS[name], *args.extra,
            ]
            t0 = time.perf_counter()
            rc = train_main([str(ROOT / "train" / "configs" / "demo_stage1.yaml"), *overrides])
            seconds = time.perf_counter() - t0
            if rc not in (0, None):
                raise SystemExit(f"{name}: training failed ({rc})")
            model = FCLM.from_pretrained(out / "export")
            row = {"variant": name, "overrides": VARIANTS[name] + args.extra, "steps": args.steps,
                   "hseg_var_init": round(init["hseg_var"], 5), "seconds": round(seconds, 1)}
            row.update({k: round(v, 4) for k, v in held_out(model, val).items()})
        print(json.dumps(row), flush=True)
        results.append(row)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
