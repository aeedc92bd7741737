"""Pure loss functions on per-sample errors; each returns per-sample losses ``Tensor[B]``.

The training loop computes the errors (per-element mean squared error per sample) and reduces the
losses. Nothing here touches models, data or accelerate.
"""

from diffalign.objectives._common import ObjectiveError
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
from diffalign.objectives.registry import OBJECTIVES, get_objective
from diffalign.objectives.selfnpo import pseudo_huber, renoise
from diffalign.objectives.sft import sft_loss

__all__ = [
    "DPO_LOSS_TYPES",
    "MAPO_PAPER_BETAS",
    "MAPO_PRESETS",
    "OBJECTIVES",
    "MapoParams",
    "ObjectiveError",
    "dpo_inner",
    "dpo_loss",
    "dpo_metrics",
    "get_objective",
    "mapo_link",
    "mapo_loss",
    "mapo_metrics",
    "npo_loss",
    "pseudo_huber",
    "renoise",
    "resolve_mapo_params",
    "sft_loss",
]
