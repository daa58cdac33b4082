"""Self-reconstruction warm-up: ``<pos>`` → SAM decoder → the region's own mask, before the stage's main steps.

Decoding a region back from its position token needs thousands of steps (docs/benchmarks.md, "Consistency
learning"), far more than the region records of a mixed stage-1 run give it. These steps do not need the
LLM: only the position branch of the region extractor, the pos projector and the SAM prompt encoder and
mask decoder take part, on SAM image embeddings computed once. So they run first and cheaply:

1. the first ``max_regions`` regions of the run's files (records with ``regions``, every file in turn) are
   collated once; their images are encoded by the (frozen) SAM image encoder, through the run's
   embedding cache when it has one;
2. ``steps`` AdamW steps over random batches of ``batch_size`` regions on ``loss_self_recon``
   (the criterion's BCE / dice weights), lr ``lr`` (linear warm-up over the first 5 %, then constant, or
   a cosine decay towards 0 with ``schedule: cosine``).

Only parameters the stage trains are updated (``requires_grad``); the main steps then start from them
with a fresh optimizer. Every process runs the same warm-up before the model is wrapped for distributed
training (DDP starts from rank 0's weights).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from fclm.training.config import TrainConfig

logger = logging.getLogger("fclm.train")

__all__ = ["collect_regions", "reconstruction_warmup", "warmup_lr_lambda"]


@torch.no_grad()
def collect_regions(
    model: nn.Module,
    records: list[dict],
    *,
    encode: Callable[[dict], torch.Tensor],
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Position features and SAM image embeddings of every region of ``records``.

    Returns ``{"features": R×(2P²+4), "masks": R×S×S, "embeddings": R×C×h×w}`` (one embedding row per
    region; ``encode(batch)`` gives a collated batch's B×C×h×w image embeddings).
    """
    from fclm.data.collator import FCLMCollator

    collate = FCLMCollator(model.processor)
    extractor = model.region_extractor
    parts: dict[str, list[torch.Tensor]] = {"features": [], "masks": [], "embeddings": []}
    for i in range(0, len(records), batch_size):
        batch = collate(records[i : i + batch_size])
        if batch["region_masks"].shape[0] == 0:
            continue
        index = batch["region_batch_index"]
        parts["features"].append(
            extractor.position_features(batch["region_masks"], batch["region_boxes"], index, batch["sam_valid_hw"])
        )
        parts["masks"].append(batch["region_masks"].float())
        parts["embeddings"].append(encode(batch)[index])
    if not parts["masks"]:
        raise ValueError("the reconstruction warm-up found no record with regions in the run's files")
    return {k: torch.cat(v) for k, v in parts.items()}


def _records_with_regions(cfg: TrainConfig, limit: int) -> list[dict]:
    """The first records with regions of each file in turn (round robin), up to ``limit`` regions."""
    from fclm.data import JsonlDataset

    if cfg.recon_warmup.files:
        sources = [JsonlDataset(path, strict=cfg.data.strict) for path in cfg.recon_warmup.files]
    else:
        sources = [JsonlDataset(src.path, strict=cfg.data.strict, tasks=src.tasks) for src in cfg.data.train if src.weight > 0]
    chosen, n_regions, cursors = [], 0, [0] * len(sources)
    while n_regions < limit and any(c < len(ds) for c, ds in zip(cursors, sources)):
        for k, ds in enumerate(sources):
            while cursors[k] < len(ds):
                record = ds[cursors[k]]
                cursors[k] += 1
                if record.get("regions"):
                    chosen.append(record)
                    n_regions += len(record["regions"])
                    break
            if n_regions >= limit:
                break
    return chosen


def warmup_lr_lambda(steps: int, schedule: str = "constant") -> Callable[[int], float]:
    """lr factor of warm-up step ``s`` (0-based): a linear ramp over the first 5 % of ``steps``, then 1
    (``constant``) or a half cosine from 1 at the ramp's end towards 0 (``cosine``; the last step's is small, not 0)."""
    ramp = max(1, steps // 20)

    def factor(s: int) -> float:
        if s + 1 < ramp or schedule == "constant":
            return min(1.0, (s + 1) / ramp)
        return 0.5 * (1.0 + math.cos(math.pi * (s + 1 - ramp) / (steps - ramp + 1)))

    return factor


def reconstruction_warmup(model: nn.Module, cfg: TrainConfig, *, encode: Callable[[dict], torch.Tensor], criterion: Any) -> dict[str, float]:
    """Run ``cfg.recon_warmup`` on ``model`` (unwrapped, before ``accelerator.prepare``); returns
    ``{"steps", "loss_self_recon" (mean of the last 50 steps), "regions", "seconds"}``."""
    from fclm.losses import self_recon_loss

    w = cfg.recon_warmup
    t0 = time.perf_counter()
    device = next(p for p in model.parameters()).device
    records = _records_with_regions(cfg, w.max_regions)
    model.eval()  # dropout off while collecting; the trained modules have none
    regions = collect_regions(model, records, encode=encode)
    modules = [model.region_extractor.pos_mlp, model.pos_projector, model.sam.prompt_encoder, model.sam.mask_decoder]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        logger.info("reconstruction warm-up skipped: the stage trains none of its parameters")
        return {"steps": 0, "loss_self_recon": float("nan"), "regions": int(regions["masks"].shape[0]), "seconds": 0.0}
    lr = w.lr if w.lr is not None else cfg.optim.lr
    optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=0.0,
                                  fused=cfg.optim.fused or None)  # as build_optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lr_lambda(w.steps, w.schedule))
    generator = torch.Generator().manual_seed(cfg.seed)
    n = regions["masks"].shape[0]
    recent: list[float] = []
    model.train()
    for step in range(1, w.steps + 1):
        pick = torch.randint(0, n, (min(w.batch_size, n),), generator=generator)
        tokens = model.region_extractor.position_token(regions["features"][pick].to(device))
        logits, _ = model.sam.decode(regions["embeddings"][pick].to(device), model.pos_projector(tokens)[:, None, :])
        loss = self_recon_loss(logits, regions["masks"][pick].to(device),
                               bce_weight=criterion.cfg.self_recon_bce_weight, dice_weight=criterion.cfg.self_recon_dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent = (recent + [float(loss.detach())])[-50:]
        if step % max(1, cfg.logging.every * 5) == 0 or step == w.steps:
            logger.info("reconstruction warm-up %d/%d loss_self_recon %.4f", step, w.steps, sum(recent) / len(recent))
    optimizer.zero_grad(set_to_none=True)
    result = {"steps": w.steps, "loss_self_recon": sum(recent) / max(1, len(recent)), "regions": int(n),
              "seconds": time.perf_counter() - t0}
    logger.info("reconstruction warm-up: %d steps on %d regions in %.1f s", w.steps, n, result["seconds"])
    return result
