"""Shared pieces of the objectives: errors a user can fix, per-sample shape checks and the per-sample error."""

from __future__ import annotations

import torch

from diffalign.errors import UserError


class ObjectiveError(UserError, ValueError):
    """A bad objective setting (unknown name, missing or invalid hyper-parameter).

    A ``ValueError`` for Python callers and a ``UserError`` so the CLI prints it as one line.
    """


def check_per_sample(**tensors: torch.Tensor) -> None:
    """Per-sample errors must be 1-D ``[B]`` and share one shape.

    Un-reduced ``[B, C, H, W]`` errors would silently turn a per-pair loss into a per-element one,
    which is wrong maths for DPO and MaPO, so they are refused here.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.ndim != 1:
            raise ValueError(
                f"{name} must be a per-sample tensor of shape [B], got shape {tuple(t.shape)}; "
                "reduce the squared error with a mean over the non-batch dimensions first"
            )
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-sample errors must share one shape, got {shapes}")


def pair_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Share of pairs with a positive margin; exact ties count one half (so chance level is 0.5)."""
    margin = margin.detach()
    return ((margin > 0).double() + 0.5 * (margin == 0).double()).mean().to(margin.dtype)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """err = mean over every non-batch element of (pred - target)^2, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
