"""``FCLMCriterion``: model outputs + batch → a dict of named losses (DETR's ``SetCriterion`` shape).

Keys read (CONTRACTS.md):

* ``loss_ce``: ``outputs["logits"]`` (B,L,V), ``batch["labels"]`` (B,L).
* ``loss_mask_bce`` / ``loss_mask_dice``: ``outputs["heads"]["sam"]`` with ``query_index`` (n,) into
  the batch's N [SEG]s and ``pred_masks`` (n,Hl,Wl); ``batch["target_masks"]`` (N,S,S). Logits are
  upsampled to the S × S SAM frame. A [SEG] without target (``target_exists`` False) keeps its
  empty target mask: the sam head learns to predict an empty mask for it. [SEG]s routed to other
  heads are not counted here (their heads bring their own losses).
* ``loss_self_recon``: ``outputs["pred_recon_masks"]`` (R,Hl,Wl) (source ``pos``) and/or
  ``outputs["pred_recon_masks_from_mask"]`` (source ``mask``; ``both`` sums the two) vs
  ``batch["region_masks"]`` (R,S,S).
* ``loss_latent``: ``outputs["seg_embeddings"]`` (N,C), ``outputs["pos_embeddings"]`` (R,C),
  ``batch["latent_pairs"]`` (P,2).

Every call returns all five losses. Where the batch has nothing for a loss (no supervised token, no
[SEG] routed to the sam head, no region, no latent pair) that loss is an exact 0 scalar that is part
of the autograd graph (see :func:`fclm.losses._utils.graph_zero`), so the training loop can always
sum, log and back-propagate the same set of names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fclm.config import LossConfig
from fclm.losses._utils import graph_zero
from fclm.losses.consistency import latent_loss, self_recon_loss
from fclm.losses.lm import causal_lm_loss
from fclm.losses.mask import mask_bce_loss, mask_dice_loss, upsample_logits

__all__ = ["FCLMCriterion", "LOSS_NAMES"]

LOSS_NAMES: tuple[str, ...] = ("loss_ce", "loss_mask_bce", "loss_mask_dice", "loss_self_recon", "loss_latent")
"""Names the criterion produces; the weight table may only use these."""


class FCLMCriterion:
    """Compute FCLM's named losses; :meth:`weighted_total` applies the config's weight table.

    Arguments:
      loss_cfg: weights (a name outside :data:`LOSS_NAMES` raises ``ValueError`` naming it),
        ``self_recon_source``, ``latent_kind``, ``kl_temperature`` and the λs inside self-recon.
    """

    def __init__(self, loss_cfg: LossConfig) -> None:
        unknown = [k for k in loss_cfg.weights if k not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown loss name(s) in loss weights: {', '.join(unknown)} (known: {', '.join(LOSS_NAMES)})")
        if loss_cfg.self_recon_source not in ("pos", "mask", "both"):
            raise ValueError(f"loss.self_recon_source {loss_cfg.self_recon_source!r} is not one of pos, mask, both")
        if loss_cfg.latent_kind not in ("cosine", "mse", "kl"):
            raise ValueError(f"loss.latent_kind {loss_cfg.latent_kind!r} is not one of cosine, mse, kl")
        self.cfg = loss_cfg
        self.weights: dict[str, float] = dict(loss_cfg.weights)

    def __call__(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Return ``{"loss_ce", "loss_mask_bce", "loss_mask_dice", "loss_self_recon", "loss_latent"}`` scalars."""
        anchor = outputs.get("logits")
        losses: dict[str, torch.Tensor] = {}

        labels = batch.get("labels")
        if anchor is not None and labels is not None:
            losses["loss_ce"] = causal_lm_loss(anchor, labels.to(anchor.device))
        else:
            losses["loss_ce"] = graph_zero(anchor)

        losses.update(self._mask_losses(outputs, batch, anchor))
        losses["loss_self_recon"] = self._self_recon(outputs, batch, anchor)

        pairs = batch.get("latent_pairs")
        z_seg, z_pos = outputs.get("seg_embeddings"), outputs.get("pos_embeddings")
        if pairs is not None and pairs.shape[0] > 0:
            if z_seg is None or z_pos is None:
                raise ValueError("the batch has latent_pairs but outputs lack seg_embeddings or pos_embeddings")
            losses["loss_latent"] = latent_loss(
                z_seg, z_pos, pairs.to(z_seg.device), kind=self.cfg.latent_kind, temperature=self.cfg.kl_temperature
            )
        else:
            losses["loss_latent"] = graph_zero(z_seg, anchor)
        return losses

    def _mask_losses(self, outputs: Mapping[str, Any], batch: Mapping[str, Any], anchor: torch.Tensor | None) -> dict[str, torch.Tensor]:
        sam_out = (outputs.get("heads") or {}).get("sam")
        if sam_out is None or sam_out["pred_masks"].shape[0] == 0:
            zero = graph_zero(None if sam_out is None else sam_out["pred_masks"], outputs.get("seg_embeddings"), anchor)
            return {"loss_mask_bce": zero, "loss_mask_dice": zero.clone()}
        pred = sam_out["pred_masks"]
        query_index = sam_out["query_index"].to(pred.device).long()
        if query_index.shape != (pred.shape[0],):
            raise ValueError(f"heads.sam.query_index {tuple(query_index.shape)} does not match pred_masks {tuple(pred.shape)}")
        target_masks = batch.get("target_masks")
        if target_masks is None:
            raise ValueError("outputs have sam-head masks but the batch has no target_masks")
        if int(query_index.max()) >= target_masks.shape[0]:
            raise ValueError(f"heads.sam.query_index {query_index.tolist()} outside the batch's {target_masks.shape[0]} targets")
        targets = target_masks.to(pred.device)[query_index]
        pred = upsample_logits(pred, tuple(targets.shape[-2:]))
        return {"loss_mask_bce": mask_bce_loss(pred, targets), "loss_mask_dice": mask_dice_loss(pred, targets)}

    def _self_recon(self, outputs: Mapping[str, Any], batch: Mapping[str, Any], anchor: torch.Tensor | None) -> torch.Tensor:
        region_masks = batch.get("region_masks")
        source = self.cfg.self_recon_source
        keys = {"pos": ["pred_recon_masks"], "mask": ["pred_recon_masks_from_mask"], "both": ["pred_recon_masks", "pred_recon_masks_from_mask"]}[source]
        if region_masks is None or region_masks.shape[0] == 0:
            return graph_zero(outputs.get(keys[0]), outputs.get("pos_embeddings"), anchor)
        total = None
        for key in keys:
            pred = outputs.get(key)
            if pred is None:
                raise ValueError(f"loss.self_recon_source={source!r} needs outputs[{key!r}] for the batch's {region_masks.shape[0]} regions")
            loss = self_recon_loss(
                pred,
                region_masks.to(pred.device),
                bce_weight=self.cfg.self_recon_bce_weight,
                dice_weight=self.cfg.self_recon_dice_weight,
            )
            total = loss if total is None else total + loss
        return total

    def weighted_total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Σ weight × loss over the weight table; a weighted name missing from ``losses`` is an error.

        Losses without a weight are left out of the total (they can still be logged).
        """
        missing = [k for k in self.weights if k not in losses]
        if missing:
            raise ValueError(f"weighted_total: no value for weighted loss(es) {', '.join(missing)}")
        total = None
        for name, w in self.weights.items():
            term = losses[name] * w
            total = term if total is None else total + term
        if total is None:
            return graph_zero(*losses.values()) if losses else torch.zeros(())
        return total
