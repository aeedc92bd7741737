"""Pure loss functions on per-sample errors; each returns per-sample losses ``Tensor[B]``.

The training recipes compute the errors (per-element mean squared error per sample) and the loop reduces the
losses. ``pair.py`` binds the preference losses to their settings (which errors they read, their metrics); the
method table (``diffalign.training.methods``) says which method trains with which. Nothing here touches
models, data or accelerate.
"""

from diffalign.objectives._common import ObjectiveError, per_sample_mse
from diffalign.objectives.dpo import DPO_LOSS_TYPES, dpo_inner, dpo_loss, dpo_metrics, npo_loss
from diffalign.objectives.mapo import (
    MAPO_PAPER_BETAS,
    MAPO_PRESETS,
    MapoParams,
    mapo_link,
    mapo_loss,
    mapo_metrics,
    resolve_mapo_params,
)
from diffalign.objectives.pair import PairObjective, dpo_objective, mapo_objective, sft_objective
from diffalign.objectives.selfnpo import SELFNPO_LOSSES, pseudo_huber, renoise, selfnpo_distance
from diffalign.objectives.sft import sft_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "MAPO_PAPER_BETAS",
    "MAPO_PRESETS",
    "MapoParams",
    "SELFNPO_LOSSES",
    "PairObjective",
    "ObjectiveError",
    "dpo_inner",
    "dpo_loss",
    "dpo_metrics",
    "dpo_objective",
    "mapo_link",
    "mapo_loss",
    "mapo_metrics",
    "mapo_objective",
    "npo_loss",
    "per_sample_mse",
    "pseudo_huber",
    "renoise",
    "resolve_mapo_params",
    "selfnpo_distance",
    "sft_loss",
    "sft_objective",
]
