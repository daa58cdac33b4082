"""``FCLMCriterion``: model outputs + batch → a dict of named losses (DETR's ``SetCriterion`` shape).

The criterion owns the three model-wide losses and delegates grounding to the criteria of the heads
the model routes ``[SEG]`` to (each registered with its head, :mod:`fclm.model.heads.base`):

* ``loss_ce``: ``outputs["logits"]`` (B,L,V), ``batch["labels"]`` (B,L).
* head terms: for each head criterion, ``outputs["heads"][name]`` (``query_index`` (n,) into the batch's
  N [SEG]s and ``pred_*``) and :func:`fclm.losses.heads.head_targets` of those n queries. The ``sam``
  head's terms are ``loss_mask_bce`` / ``loss_mask_dice`` (:class:`fclm.losses.heads.SamCriterion`).
* ``loss_self_recon``: ``outputs["pred_recon_masks"]`` (R,Hl,Wl) (source ``pos``) and/or
  ``outputs["pred_recon_masks_from_mask"]`` (source ``mask``; ``both`` sums the two) vs
  ``batch["region_masks"]`` (R,S,S).
* ``loss_latent``: ``outputs["seg_embeddings"]`` (N,C), ``outputs["pos_embeddings"]`` (R,C),
  ``batch["latent_pairs"]`` (P,2).

Every call returns every name (the three above and all that the routed heads declare). Where the
batch has nothing for a loss (no supervised token, no [SEG] routed to a head, no region, no latent
pair) that loss is an exact 0 scalar that is part of the autograd graph (see
:func:`fclm.losses._utils.graph_zero`), so the training loop can always sum, log and back-propagate
the same set of names. Head criteria may add detached ``metric_*`` diagnostics: logged, never weighted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fclm.config import LossConfig
from fclm.losses._utils import graph_zero
from fclm.losses.consistency import latent_loss, self_recon_loss
from fclm.losses.heads import SAM_LOSS_WEIGHTS, SamCriterion, head_targets
from fclm.losses.lm import causal_lm_loss

__all__ = ["FCLMCriterion", "CORE_LOSS_NAMES", "LOSS_NAMES"]

CORE_LOSS_NAMES: tuple[str, ...] = ("loss_ce", "loss_self_recon", "loss_latent")
"""The losses that do not belong to a grounding head."""

LOSS_NAMES: tuple[str, ...] = ("loss_ce", *SAM_LOSS_WEIGHTS, "loss_self_recon", "loss_latent")
"""Names produced with the default ``sam`` head alone."""


class FCLMCriterion:
    """Compute FCLM's named losses; :meth:`weighted_total` applies the weight table.

    Arguments:
      loss_cfg: weights (overriding the heads' declared defaults; a name that is neither a model-wide
        loss nor declared by a routed head raises ``ValueError`` naming it), ``self_recon_source``,
        ``latent_kind``, ``kl_temperature`` and the λs inside self-recon.
      head_criteria: head name → criterion, for the heads the model routes to (default: the ``sam``
        head's). Each criterion has ``loss_weights`` (its declared names → default weights).
    """

    def __init__(self, loss_cfg: LossConfig, head_criteria: Mapping[str, Any] | None = None) -> None:
        self.head_criteria: dict[str, Any] = dict(head_criteria) if head_criteria is not None else {"sam": SamCriterion()}
        declared: dict[str, float] = {}
        for name, crit in self.head_criteria.items():
            for k, w in crit.loss_weights.items():
                if k in declared or k in CORE_LOSS_NAMES:
                    raise ValueError(f"head {name!r} declares loss {k!r} that another head or the model already uses")
                declared[k] = w
        self.loss_names: tuple[str, ...] = (CORE_LOSS_NAMES[0], *declared, *CORE_LOSS_NAMES[1:])
        unknown = [k for k in loss_cfg.weights if k not in self.loss_names]
        if unknown:
            raise ValueError(
                f"unknown loss name(s) in loss weights: {', '.join(unknown)}: no routed head "
                f"({', '.join(self.head_criteria) or 'none'}) declares them (known: {', '.join(self.loss_names)})"
            )
        if loss_cfg.self_recon_source not in ("pos", "mask", "both"):
            raise ValueError(f"loss.self_recon_source {loss_cfg.self_recon_source!r} is not one of pos, mask, both")
        if loss_cfg.latent_kind not in ("cosine", "mse", "kl"):
            raise ValueError(f"loss.latent_kind {loss_cfg.latent_kind!r} is not one of cosine, mse, kl")
        self.cfg = loss_cfg
        self.weights: dict[str, float] = {**declared, **dict(loss_cfg.weights)}

    def __call__(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Return every name of :attr:`loss_names` (and the heads' ``metric_*`` diagnostics) as scalars."""
        anchor = outputs.get("logits")
        losses: dict[str, torch.Tensor] = {}

        labels = batch.get("labels")
        if anchor is not None and labels is not None:
            losses["loss_ce"] = causal_lm_loss(anchor, labels.to(anchor.device))
        else:
            losses["loss_ce"] = graph_zero(anchor)

        losses.update(self._head_losses(outputs, batch, anchor))
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

    def _head_losses(self, outputs: Mapping[str, Any], batch: Mapping[str, Any], anchor: torch.Tensor | None) -> dict[str, torch.Tensor]:
        head_outputs = outputs.get("heads") or {}
        stray = sorted(set(head_outputs) - set(self.head_criteria))
        if stray:
            raise ValueError(f"outputs have predictions of head(s) {stray} that the criterion has no criterion for "
                             f"(it has {sorted(self.head_criteria)})")
        losses: dict[str, torch.Tensor] = {}
        for name, crit in self.head_criteria.items():
            preds = head_outputs.get(name)
            if preds is None or preds["query_index"].shape[0] == 0:
                zero = graph_zero(outputs.get("seg_embeddings"), anchor)
                losses.update({k: zero.clone() for k in crit.loss_weights})
                continue
            targets = head_targets(batch, preds["query_index"])
            got = crit(preds, targets)
            missing = [k for k in crit.loss_weights if k not in got]
            if missing:
                raise ValueError(f"head {name!r} criterion did not return its declared loss(es) {missing}")
            losses.update(got)
        return losses

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
