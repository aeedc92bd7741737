"""MaPO: reference-free preference loss on per-sample errors.

Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models without Reference"
(arXiv:2406.06424). Per pair (one ``t`` and one noise shared by winner and loser)::

    L = err_w + weight * softplus(-k * (g(scale * err_w) - g(scale * err_l)))

with the bounded, decreasing link ``g(u) = u / (exp(u) - 1)`` (``g(0) = 1``, ``g -> 0`` as ``u -> inf``).
The first term is plain fine-tuning on the winner; the second widens the margin ``g_w - g_l`` (a lower
winner error than loser error gives a positive margin). ``softplus(-x) == -logsigmoid(x)``.

Presets (docs/methods.md#mapo, where the papers' values are listed):

- ``"official"`` (default; the released code): ``scale = 0.5, k = 1000 (= T), weight = 0.1``.
- ``"paper"`` (paper v2): ``scale = 1, k = beta, weight = 1/beta``; beta 8 for general preference,
  32 culture, 64 style / safety, 1024 personalization (larger reference mismatch, larger beta).

The raw knobs ``scale``, ``k``, ``weight`` override whatever the preset sets. ``beta`` belongs to the
paper preset only: in the official code a knob named ``beta`` is the *weight* (0.1), so rather than
guess, ``beta`` with the official preset is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.objectives._common import ObjectiveError, check_per_sample, pair_accuracy

MAPO_PRESETS = ("official", "paper")
MAPO_PAPER_BETAS = {"general": 8.0, "culture": 32.0, "style": 64.0, "safety": 64.0, "personalization": 1024.0}

# Below this |u| the 4-term Taylor series of g is exact to double precision (next term u^6/30240).
_SERIES_CUTOFF = 1e-2


@dataclass(frozen=True)
class MapoParams:
    """Resolved MaPO knobs: ``L = err_w + weight * softplus(-k * (g(scale*err_w) - g(scale*err_l)))``."""

    scale: float
    k: float
    weight: float


def resolve_mapo_params(preset: str | None = "official", *, beta=None, scale=None, k=None, weight=None) -> MapoParams:
    """Turn a preset plus optional overrides into :class:`MapoParams`, checking every value."""
    if preset == "official":
        if beta is not None:
            raise ObjectiveError(
                "MaPO beta belongs to preset='paper' (k = beta, weight = 1/beta); "
                "with preset='official' set k and weight instead"
            )
        base = {"scale": 0.5, "k": 1000.0, "weight": 0.1}
    elif preset == "paper":
        if beta is None:
            if k is None or weight is None:
                raise ObjectiveError(
                    "MaPO preset='paper' needs beta (suggested: 8 general preference, "
                    "64 style/safety, 1024 personalization)"
                )
            base = {"scale": 1.0}
        else:
            if not beta > 0:
                raise ObjectiveError(f"MaPO beta must be > 0, got {beta!r}")
            base = {"scale": 1.0, "k": float(beta), "weight": 1.0 / beta}
    elif preset is None:
        if beta is not None:
            base = {"k": float(beta), "weight": 1.0 / beta}
        else:
            base = {}
    else:
        raise ObjectiveError(f"unknown MaPO preset {preset!r}; known: {', '.join(MAPO_PRESETS)} (or None)")

    for name, value in (("scale", scale), ("k", k), ("weight", weight)):
        if value is not None:
            base[name] = float(value)
    missing = [n for n in ("scale", "k", "weight") if n not in base]
    if missing:
        raise ObjectiveError(f"MaPO with preset=None needs {', '.join(missing)}")
    params = MapoParams(**base)
    if not (params.scale > 0 and params.k > 0 and params.weight >= 0):
        raise ObjectiveError(f"MaPO needs scale > 0, k > 0, weight >= 0, got {params}")
    return params


def mapo_link(u: torch.Tensor) -> torch.Tensor:
    """The MaPO link ``g(u) = u / (exp(u) - 1)``, stable for every finite ``u``, with finite gradients.

    - ``|u| < 1e-2``: series ``1 - u/2 + u^2/12 - u^4/720`` (exact at 0, where the formula is 0/0).
    - ``u > 0``: ``u * exp(-u) / (-expm1(-u))``, which decays like ``u*exp(-u)`` without overflow.
    - ``u < 0``: ``u / expm1(u)``, which tends to ``|u|``.

    Each branch sees only inputs in its own range (``torch.where`` on safe inputs), so no branch
    produces inf/NaN that would leak into gradients. Half-precision inputs are computed in float32.
    """
    if u.dtype in (torch.float16, torch.bfloat16):
        u = u.float()
    small = u.abs() < _SERIES_CUTOFF
    pos = u >= _SERIES_CUTOFF
    u_small = torch.where(small, u, torch.zeros_like(u))
    u_pos = torch.where(pos, u, torch.ones_like(u))
    u_neg = torch.where(u <= -_SERIES_CUTOFF, u, -torch.ones_like(u))

    u2 = u_small * u_small
    g_small = 1.0 - 0.5 * u_small + u2 / 12.0 - u2 * u2 / 720.0
    g_pos = u_pos * torch.exp(-u_pos) / (-torch.expm1(-u_pos))
    g_neg = u_neg / torch.expm1(u_neg)
    return torch.where(small, g_small, torch.where(pos, g_pos, g_neg))


def _margin(err_w, err_l, p: MapoParams) -> tuple[torch.Tensor, torch.Tensor]:
    check_per_sample(err_w=err_w, err_l=err_l)
    return mapo_link(p.scale * err_w), mapo_link(p.scale * err_l)


def mapo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    *,
    preset: str | None = "official",
    beta: float | None = None,
    scale: float | None = None,
    k: float | None = None,
    weight: float | None = None,
) -> torch.Tensor:
    """Per-sample MaPO loss ``Tensor[B]`` (see the module docstring for the formula and presets).

    No reference model: one forward pass over winner and loser is all it needs.
    """
    p = resolve_mapo_params(preset, beta=beta, scale=scale, k=k, weight=weight)
    g_w, g_l = _margin(err_w, err_l, p)
    # softplus(-x) == -logsigmoid(x); logsigmoid stays exact in both tails (F.softplus returns x above 20).
    return err_w + p.weight * -F.logsigmoid(p.k * (g_w - g_l))


@torch.no_grad()
def mapo_metrics(err_w, err_l, *, preset: str | None = "official", beta=None, scale=None, k=None,
                 weight=None) -> dict[str, torch.Tensor]:
    """Batch-mean health signals of MaPO (detached 0-d tensors).

    ``margin`` mean ``g_w - g_l``; ``margin_acc`` share of pairs with a positive margin (ties 1/2);
    ``margin_loss`` mean ``softplus(-k*margin)`` (unweighted); ``g_w``, ``g_l``, ``err_w``, ``err_l``.
    """
    p = resolve_mapo_params(preset, beta=beta, scale=scale, k=k, weight=weight)
    g_w, g_l = _margin(err_w, err_l, p)
    margin = g_w - g_l
    return {
        "margin": margin.mean(),
        "margin_acc": pair_accuracy(margin),
        "margin_loss": (-F.logsigmoid(p.k * margin)).mean(),
        "g_w": g_w.mean(),
        "g_l": g_l.mean(),
        "err_w": err_w.mean(),
        "err_l": err_l.mean(),
    }
