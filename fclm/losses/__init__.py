"""Losses: pure functions of (predictions, targets) and the :class:`FCLMCriterion` that names them."""

from fclm.losses.consistency import latent_loss, self_recon_loss
from fclm.losses.criterion import CORE_LOSS_NAMES, LOSS_NAMES, FCLMCriterion
from fclm.losses.heads import SAM_LOSS_WEIGHTS, HeadTargets, SamCriterion, head_targets
from fclm.losses.lm import causal_lm_loss
from fclm.losses.mask import mask_bce_loss, mask_dice_loss, seg_loss, upsample_logits

__all__ = [
    "FCLMCriterion",
    "CORE_LOSS_NAMES",
    "LOSS_NAMES",
    "HeadTargets",
    "SAM_LOSS_WEIGHTS",
    "SamCriterion",
    "head_targets",
    "causal_lm_loss",
    "latent_loss",
    "mask_bce_loss",
    "mask_dice_loss",
    "self_recon_loss",
    "seg_loss",
    "upsample_logits",
]
