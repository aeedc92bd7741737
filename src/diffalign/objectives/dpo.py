"""Diffusion-DPO and Diffusion-NPO losses on per-sample errors.

Diffusion-DPO: Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization"
(arXiv:2311.12908), final objective Eq. (14) with the constant T*omega(lambda_t) folded into beta.

Convention (the original Diffusion-DPO code's, used everywhere in diffalign)::

    inner = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))

where ``err_*`` are per-element mean squared errors of the trained model and ``ref_err_*`` those of the
frozen reference. The 0.5 matters when comparing betas: the diffusers SD1.5 research script drops it,
so its ``beta_dpo = 2500`` is ``beta = 5000`` here (paper: 2000..5000 for SD1.5, 5000 for SDXL).

Diffusion-NPO: Wang et al. 2025, "Diffusion-NPO: Negative Preference Optimization for Better Preference
Aligned Generation of Diffusion Models" (ICLR 2025). The negative model is trained with the same loss on
pairs with winner and loser swapped, which is exactly ``inner -> -inner`` (``swap=True`` / ``npo_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.objectives._common import ObjectiveError, check_per_sample, pair_accuracy

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_inner(err_w, err_l, ref_err_w, ref_err_l, *, beta: float, swap: bool = False) -> torch.Tensor:
    """The DPO logit ``-0.5*beta*((err_w-err_l)-(ref_err_w-ref_err_l))``, sign-flipped if ``swap``."""
    check_per_sample(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    if swap:
        err_w, err_l, ref_err_w, ref_err_l = err_l, err_w, ref_err_l, ref_err_w
    return -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))


def dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    swap: bool = False,
) -> torch.Tensor:
    """Per-sample Diffusion-DPO loss ``Tensor[B]``.

    With ``inner`` as in the module docstring and ``h = inner / beta`` (the un-scaled implicit
    log-likelihood-ratio difference, ``-0.5*((err_w-err_l)-(ref_err_w-ref_err_l))``):

    - ``"sigmoid"`` (DPO, Rafailov et al. 2023; Diffusion-DPO Eq. 14)::

          L = -(1 - eps) * logsigmoid(inner) - eps * logsigmoid(-inner)

      with ``eps = label_smoothing`` (conservative DPO; 0 gives the plain loss).
    - ``"hinge"`` (SLiC-style)::  ``L = relu(1 - inner)``.
    - ``"ipo"`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", sampled IPO loss with ``tau = beta``)::

          L = (h - 1 / (2 * beta))**2  ==  (inner - 1/2)**2 / beta**2

      Note the scale: with beta in the thousands both terms are ~1e-4, so IPO losses are tiny and its
      learning rate is not interchangeable with the sigmoid loss's.

    ``swap=True`` swaps winner and loser (Diffusion-NPO): the inner term changes sign.
    ``label_smoothing`` applies to ``"sigmoid"`` only and must lie in ``[0, 0.5]``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ObjectiveError(f"unknown DPO loss_type {loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ObjectiveError(f"DPO beta must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ObjectiveError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ObjectiveError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")

    inner = dpo_inner(err_w, err_l, ref_err_w, ref_err_l, beta=beta, swap=swap)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(inner)
        if label_smoothing:
            loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-inner)
        return loss
    if loss_type == "hinge":
        return torch.relu(1.0 - inner)
    h = inner / beta
    return (h - 1.0 / (2.0 * beta)) ** 2


def npo_loss(err_w, err_l, ref_err_w, ref_err_l, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Diffusion-NPO loss: :func:`dpo_loss` with ``swap=True``.

    Pass the pair as labelled (``err_w`` = the preferred image); the negative model learns to prefer
    the loser. Official settings: SD1.5 beta 1000 in this convention (500 without the 0.5), SDXL 2000.
    """
    return dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, swap=True)


@torch.no_grad()
def dpo_metrics(err_w, err_l, ref_err_w, ref_err_l, *, beta: float, swap: bool = False) -> dict[str, torch.Tensor]:
    """Batch-mean health signals of Diffusion-DPO (detached 0-d tensors).

    - ``implicit_acc``: share of pairs with ``inner > 0`` (ties count 1/2, so 0.5 at model == reference).
    - ``margin``: mean ``inner``; ``reward_w`` / ``reward_l``: mean implicit rewards
      ``-0.5*beta*(err - ref_err)`` of winner and loser (``margin = reward_w - reward_l``).
    - ``model_diff`` / ``ref_diff``: mean ``err_w - err_l`` and ``ref_err_w - ref_err_l``.
    - ``err_w``, ``err_l``, ``ref_err_w``, ``ref_err_l``: mean errors.

    With ``swap=True`` the roles are those of Diffusion-NPO (the "winner" is the labelled loser).
    """
    inner = dpo_inner(err_w, err_l, ref_err_w, ref_err_l, beta=beta, swap=swap)
    if swap:
        err_w, err_l, ref_err_w, ref_err_l = err_l, err_w, ref_err_l, ref_err_w
    return {
        "implicit_acc": pair_accuracy(inner),
        "margin": inner.mean(),
        "reward_w": (-0.5 * beta * (err_w - ref_err_w)).mean(),
        "reward_l": (-0.5 * beta * (err_l - ref_err_l)).mean(),
        "model_diff": (err_w - err_l).mean(),
        "ref_diff": (ref_err_w - ref_err_l).mean(),
        "err_w": err_w.mean(),
        "err_l": err_l.mean(),
        "ref_err_w": ref_err_w.mean(),
        "ref_err_l": ref_err_l.mean(),
    }
