"""Probes used by the demo: latent cosine of DL-RES pairs, <pos> reconstruction IoU and its pooled-mask baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fclm.config import preset
from fclm.training.probes import latent_cosine, pos_reconstruction_iou


@pytest.fixture(scope="module")
def model():
    from fclm.model import build_fclm

    torch.manual_seed(0)
    return build_fclm(preset("tiny")).eval()


def _records(shapes: Path, task: str, n: int) -> list[dict]:
    from fclm.data import JsonlDataset

    ds = JsonlDataset(shapes / f"train_{task}.jsonl")
    return [ds[i] for i in range(n)]


def test_latent_cosine_matches_a_direct_computation(model, shapes_dir: Path):
    from fclm.data.collator import FCLMCollator

    records = _records(shapes_dir, "dlres", 3)
    batch = FCLMCollator(model.processor)(records)
    assert batch["latent_pairs"].shape[0] == 3
    with torch.no_grad():
        out = model(dict(batch))
    pairs = batch["latent_pairs"]
    direct = F.cosine_similarity(out["seg_embeddings"][pairs[:, 0]], out["pos_embeddings"][pairs[:, 1]], dim=-1).mean()
    assert latent_cosine(model, records, batch_size=2) == pytest.approx(float(direct), abs=1e-5)
    import math

    assert math.isnan(latent_cosine(model, _records(shapes_dir, "res", 2)))  # no pairs in plain RES


class Oracle(torch.nn.Module):
    """Decodes each region's own mask (downsampled to the low-res grid) as logits ±10."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.processor, self.config = model.processor, model.config

    def forward(self, batch):
        low = self.inner.sam.low_res_size
        masks = F.interpolate(batch["region_masks"][:, None], size=low, mode="area")[:, 0]
        return {"pred_recon_masks": (masks > 0.5).float() * 20 - 10}


def test_pos_reconstruction_iou_and_pooled_baseline(model, shapes_dir: Path):
    records = _records(shapes_dir, "region_caption", 4)
    oracle = pos_reconstruction_iou(Oracle(model), records)
    assert oracle["regions"] == 4
    assert oracle["pos_recon_iou"] > 0.85 and oracle["pos_recon_iou_pooled"] > 0.7
    untrained = pos_reconstruction_iou(model, records)
    assert untrained["pos_recon_iou_pooled"] == pytest.approx(oracle["pos_recon_iou_pooled"])
    assert untrained["pos_recon_iou"] < untrained["pos_recon_iou_pooled"]
    assert 0.0 <= untrained["pos_recon_miou"] <= 1.0
