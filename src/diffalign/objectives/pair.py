"""Preference objectives bound to their settings: which per-sample errors they read, their losses and metrics.

A recipe computes per-sample errors (docs/methods.md#conventions-shared-by-every-method) and hands them to a
:class:`PairObjective`, positionally, in the order its ``reads`` names:

- ``"winner"``: ``err_w`` (SFT: one pass over the winners only);
- ``"pair"``: ``err_w, err_l`` (MaPO: one pass over winner and loser);
- ``"pair+reference"``: ``err_w, err_l, ref_err_w, ref_err_l`` (DPO: a second pass through the frozen reference).

``swap=True`` trains the negative model of Diffusion-NPO: winner and loser trade places.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from diffalign.objectives.dpo import dpo_loss, dpo_metrics
from diffalign.objectives.mapo import mapo_loss, mapo_metrics
from diffalign.objectives.sft import sft_loss

READS = ("winner", "pair", "pair+reference")


@dataclass(frozen=True)
class PairObjective:
    """``loss(*errors) -> Tensor[B]`` and ``metrics(*errors) -> dict`` of detached scalars (None: none)."""

    name: str
    reads: Literal["winner", "pair", "pair+reference"]
    loss: Callable[..., torch.Tensor]
    metrics: Optional[Callable[..., dict]] = None

    def __post_init__(self):
        if self.reads not in READS:
            raise ValueError(f"reads must be one of {READS}, got {self.reads!r}")

    @property
    def needs_reference(self) -> bool:
        return self.reads == "pair+reference"


def dpo_objective(*, beta: float, loss_type: str = "sigmoid", swap: bool = False) -> PairObjective:
    """Diffusion-DPO (objectives/dpo.py); with ``swap`` the loss of Diffusion-NPO (``npo_loss``)."""
    return PairObjective("npo" if swap else "dpo", "pair+reference",
                         functools.partial(dpo_loss, beta=beta, loss_type=loss_type, swap=swap),
                         functools.partial(dpo_metrics, beta=beta, swap=swap))


def mapo_objective(*, preset: str = "official", beta: Optional[float] = None, swap: bool = False) -> PairObjective:
    """MaPO (objectives/mapo.py), reference-free; ``beta`` belongs to ``preset="paper"`` only."""
    kwargs = {"preset": preset, **({"beta": beta} if preset == "paper" else {})}

    def order(err_w, err_l):
        return (err_l, err_w) if swap else (err_w, err_l)

    return PairObjective("mapo", "pair", lambda err_w, err_l: mapo_loss(*order(err_w, err_l), **kwargs),
                         lambda err_w, err_l: mapo_metrics(*order(err_w, err_l), **kwargs))


def sft_objective() -> PairObjective:
    """Plain fine-tuning on the winners (objectives/sft.py)."""
    return PairObjective("sft", "winner", sft_loss)


__all__ = ["PairObjective", "READS", "dpo_objective", "mapo_objective", "sft_objective"]
