"""Measurements of what the two training stages change, on held-out records (teacher-forced forward passes).

* :func:`latent_cosine` — mean cosine of ``z_seg`` and ``z_pos`` over the batch's latent pairs
  (a ``[SEG]`` and a region that denote the same object: DL-RES records). Stage 2's latent loss
  should raise it.
* :func:`pos_reconstruction_iou` — IoU of the mask decoded from ``<pos>`` (``pred_recon_masks``,
  logits > 0, upsampled to the SAM frame) against the input region mask, and the same IoU for the
  baseline that simply upsamples the pooled mask the position branch receives
  (``region_extractor.pooled_mask_size``², bilinear, > 0.5). Both are computed inside the image's
  valid area of the SAM frame, pooled over all regions (ΣI / ΣU) and per region (mean).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F


def _batches(model: Any, records: Sequence[dict], batch_size: int) -> Iterable[dict]:
    from fclm.data.collator import FCLMCollator

    collate = FCLMCollator(model.processor)
    for i in range(0, len(records), batch_size):
        yield collate(list(records[i : i + batch_size]))


@torch.no_grad()
def latent_cosine(model: Any, records: Sequence[dict], *, batch_size: int = 8) -> float:
    """Mean cosine similarity of ``z_seg`` and ``z_pos`` over every latent pair of ``records``
    (records as :class:`fclm.data.JsonlDataset` returns them). ``nan`` when there is no pair."""
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(model, records, batch_size):
        pairs = batch.get("latent_pairs")
        if pairs is None or pairs.shape[0] == 0:
            continue
        out = model(batch)
        z_seg = out["seg_embeddings"][pairs[:, 0]]
        z_pos = out["pos_embeddings"][pairs[:, 1]]
        total += float(F.cosine_similarity(z_seg.float(), z_pos.float(), dim=-1).sum())
        count += int(pairs.shape[0])
    return total / count if count else float("nan")


@torch.no_grad()
def pos_reconstruction_iou(model: Any, records: Sequence[dict], *, batch_size: int = 8) -> dict[str, float]:
    """``{"pos_recon_iou", "pos_recon_iou_pooled", "pos_recon_miou", "pos_recon_miou_pooled", "regions"}``."""
    model.eval()
    size = model.config.region_extractor.pooled_mask_size
    inter = {"learned": 0.0, "pooled": 0.0}
    union = {"learned": 0.0, "pooled": 0.0}
    per_region: dict[str, list[float]] = {"learned": [], "pooled": []}
    for batch in _batches(model, records, batch_size):
        masks = batch["region_masks"]
        if masks.shape[0] == 0:
            continue
        out = model(batch)
        s = masks.shape[-1]
        valid = torch.zeros_like(masks, dtype=torch.bool)
        for r, b in enumerate(batch["region_batch_index"].tolist()):
            h, w = batch["sam_valid_hw"][b].tolist()
            valid[r, :h, :w] = True
        target = masks > 0.5
        learned = F.interpolate(out["pred_recon_masks"].float()[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0
        pooled = F.interpolate(F.adaptive_avg_pool2d(masks[:, None].float(), size), size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0.5
        for name, pred in (("learned", learned), ("pooled", pooled)):
            i = (pred & target & valid).flatten(1).sum(1).float()
            u = ((pred | target) & valid).flatten(1).sum(1).float()
            inter[name] += float(i.sum())
            union[name] += float(u.sum())
            per_region[name] += torch.where(u > 0, i / u.clamp(min=1), torch.ones_like(u)).tolist()
    n = len(per_region["learned"])
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {
        "pos_recon_iou": inter["learned"] / union["learned"] if union["learned"] else float("nan"),
        "pos_recon_iou_pooled": inter["pooled"] / union["pooled"] if union["pooled"] else float("nan"),
        "pos_recon_miou": mean(per_region["learned"]),
        "pos_recon_miou_pooled": mean(per_region["pooled"]),
        "regions": n,
    }


__all__ = ["latent_cosine", "pos_reconstruction_iou"]
