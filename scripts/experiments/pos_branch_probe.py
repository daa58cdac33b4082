"""Probe: how well a ``<pos>`` position branch can be decoded back into its region (self-reconstruction only).

    python scripts/experiments/pos_branch_probe.py --data runs/demo/shapesref --tokenizer runs/demo/tokenizer \
        --variants current,mlp256 --steps 600 [--batch 16] [--threads 1]

The tiny preset (seed 0) with its frozen random SAM image encoder; ShapesRef region records
(``train_roc.jsonl`` / ``val_roc.jsonl``, one region each). For each variant the SAM prompt encoder and mask
decoder restart from the same initial weights and are trained together with the variant's position branch
(``position features → <pos> (LLM width) → pos projector → SAM prompt``) on ``loss_self_recon``
(2·BCE + dice, as in training), AdamW lr ``--lr``, no clipping. Reported per variant:

* ``spread_init``: mean distance between two regions' ``z_pos`` at initialisation / mean ``‖z_pos‖``;
* ``iou``: held-out mean IoU of the decoded mask (logits > 0, upsampled to the SAM frame) against the
  region mask, inside the image's valid area — ``fclm.training.probes.pos_reconstruction_iou``'s figure;
* ``pooled``: the same IoU for upsampling the 16 × 16 pooled mask (the information the branch receives);
* seconds of training (1 torch thread by default; the machine may be shared).

Variants are the extractor's position-branch settings (``RegionExtractorConfig.pos_*``) plus ``current``
(the pre-issue-17 branch: 3 GELU layers 64 wide, no normalisation).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# name → RegionExtractorConfig position-branch overrides
VARIANTS: dict[str, dict] = {
    "current": dict(pos_hidden_dim=64, pos_layers=3, pos_activation="gelu", pos_norm="none"),
    "gelu256": dict(pos_hidden_dim=256, pos_layers=3, pos_activation="gelu", pos_norm="none"),
    "mlp256": dict(pos_hidden_dim=256, pos_layers=3, pos_activation="relu", pos_norm="none"),
    "mlp256_ln": dict(pos_hidden_dim=256, pos_layers=3, pos_activation="relu", pos_norm="layernorm"),
    "mlp512_ln": dict(pos_hidden_dim=512, pos_layers=3, pos_activation="relu", pos_norm="layernorm"),
    "mlp256x2_ln": dict(pos_hidden_dim=256, pos_layers=2, pos_activation="relu", pos_norm="layernorm"),
    "mlp256x4_ln": dict(pos_hidden_dim=256, pos_layers=4, pos_activation="relu", pos_norm="layernorm"),
}


def load_regions(model, path: Path, data: Path, limit: int, batch: int = 32) -> dict[str, torch.Tensor]:
    """Region masks, boxes, valid sizes and SAM image embeddings of the first ``limit`` records."""
    from fclm.data.collator import FCLMCollator

    records = []
    with open(path) as f:
        for line in f:
            if len(records) >= limit:
                break
            r = json.loads(line)
            records.append({**r, "image": str(data / r["image"])})
    collate = FCLMCollator(model.processor)
    parts: dict[str, list[torch.Tensor]] = {"masks": [], "boxes": [], "hw": [], "emb": []}
    for i in range(0, len(records), batch):
        b = collate(records[i : i + batch])
        emb = model.sam.encode(b["sam_images"])
        idx = b["region_batch_index"]
        parts["masks"].append(b["region_masks"].float())
        parts["boxes"].append(b["region_boxes"].float())
        parts["hw"].append(b["sam_valid_hw"][idx])
        parts["emb"].append(emb[idx])
    return {k: torch.cat(v) for k, v in parts.items()}


def position_branch(model, overrides: dict):
    from fclm.config import RegionExtractorConfig
    from fclm.model.region_extractor import build_region_extractor

    cfg = RegionExtractorConfig(**{**vars(model.config.region_extractor), **overrides})
    ext = build_region_extractor(cfg, sam_dim=model.config.sam.prompt_embed_dim, vision_dim=model.region_extractor.vision_dim,
                                 llm_dim=model.region_extractor.llm_dim)
    return ext


def z_pos(ext, projector, regions: dict, sel: torch.Tensor) -> torch.Tensor:
    n = sel.numel()
    feats = ext.position_features(regions["masks"][sel], regions["boxes"][sel], torch.arange(n), regions["hw"][sel])
    return projector(ext.position_token(feats))


def evaluate(ext, projector, sam, regions: dict, batch: int = 64) -> tuple[float, float]:
    size = ext.pooled_mask_size
    ious, pooled_ious = [], []
    with torch.no_grad():
        for i in range(0, regions["masks"].shape[0], batch):
            sel = torch.arange(i, min(i + batch, regions["masks"].shape[0]))
            masks = regions["masks"][sel]
            logits, _ = sam.decode(regions["emb"][sel], z_pos(ext, projector, regions, sel)[:, None])
            s = masks.shape[-1]
            valid = torch.zeros_like(masks, dtype=torch.bool)
            for r, (h, w) in enumerate(regions["hw"][sel].tolist()):
                valid[r, :h, :w] = True
            target = masks > 0.5
            learned = F.interpolate(logits[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0
            pooled = F.interpolate(F.adaptive_avg_pool2d(masks[:, None], size), size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0.5
            for pred, out in ((learned, ious), (pooled, pooled_ious)):
                inter = (pred & target & valid).flatten(1).sum(1).float()
                union = ((pred | target) & valid).flatten(1).sum(1).float()
                out += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
    return sum(ious) / len(ious), sum(pooled_ious) / len(pooled_ious)


def spread(ext, projector, regions: dict, n: int = 256) -> float:
    with torch.no_grad():
        z = z_pos(ext, projector, regions, torch.arange(min(n, regions["masks"].shape[0])))
    return float(torch.cdist(z, z).mean() / z.norm(dim=-1).mean())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "demo" / "shapesref")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "runs" / "demo" / "tokenizer")
    ap.add_argument("--variants", default="current,mlp256,mlp256_ln")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps (0: at the end)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from fclm.config import preset
    from fclm.losses import self_recon_loss
    from fclm.model import build_fclm
    from fclm.model.projectors import MLPProjector

    cfg = preset("tiny")
    cfg.backbone.tokenizer = str(args.tokenizer)
    torch.manual_seed(0)
    model = build_fclm(cfg).eval()
    t0 = time.perf_counter()
    train = load_regions(model, args.data / "train_roc.jsonl", args.data, args.n_train)
    val = load_regions(model, args.data / "val_roc.jsonl", args.data, args.n_val)
    print(f"regions: {train['masks'].shape[0]} train, {val['masks'].shape[0]} val ({time.perf_counter() - t0:.0f} s)", flush=True)
    sam0 = copy.deepcopy(model.sam)
    results = []
    for name in args.variants.split(","):
        torch.manual_seed(0)
        ext = position_branch(model, VARIANTS[name])
        projector = MLPProjector(in_dim=ext.llm_dim, out_dim=cfg.sam.prompt_embed_dim, num_layers=cfg.projector_layers)
        sam = copy.deepcopy(sam0)
        sam.train()
        params = [p for m in (ext, projector, sam.prompt_encoder, sam.mask_decoder) for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        row = {"variant": name, **VARIANTS[name], "spread_init": round(spread(ext, projector, train), 4), "steps": args.steps,
               "batch": args.batch, "curve": []}
        g = torch.Generator().manual_seed(0)
        t1 = time.perf_counter()
        for step in range(1, args.steps + 1):
            sel = torch.randint(0, train["masks"].shape[0], (args.batch,), generator=g)
            logits, _ = sam.decode(train["emb"][sel], z_pos(ext, projector, train, sel)[:, None])
            loss = self_recon_loss(logits, train["masks"][sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                row["curve"].append((step, round(evaluate(ext, projector, sam, val)[0], 4)))
                print(f"  {name} step {step}: iou {row['curve'][-1][1]:.3f} ({time.perf_counter() - t1:.0f} s)", flush=True)
        iou, pooled = evaluate(ext, projector, sam, val)
        row.update(iou=round(iou, 4), pooled=round(pooled, 4), spread_end=round(spread(ext, projector, train), 4),
                   seconds=round(time.perf_counter() - t1, 1))
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


if __name__ == "__main__":
    main()
