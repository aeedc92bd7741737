"""Objectives by name, for configs and the CLI."""

from __future__ import annotations

import difflib
from typing import Callable

import torch

from diffalign.objectives._common import ObjectiveError
from diffalign.objectives.dpo import dpo_loss, npo_loss
from diffalign.objectives.mapo import mapo_loss
from diffalign.objectives.sft import sft_loss

OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "dpo": dpo_loss,
    "mapo": mapo_loss,
    "npo": npo_loss,
    "sft": sft_loss,
}


def get_objective(name: str) -> Callable[..., torch.Tensor]:
    """The loss function registered as ``name`` (case-insensitive); ``ObjectiveError`` (a ValueError) if unknown."""
    key = str(name).strip().lower()
    if key in OBJECTIVES:
        return OBJECTIVES[key]
    known = ", ".join(sorted(OBJECTIVES))
    close = difflib.get_close_matches(key, OBJECTIVES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ObjectiveError(f"unknown objective {name!r}; known objectives: {known}.{hint}")
