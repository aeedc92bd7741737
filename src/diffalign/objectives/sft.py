"""Supervised fine-tuning on the preferred image: the plain diffusion loss on winners.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Eq. (14) ("L_simple"), with the per-element
mean squared error. It is the SFT baseline of Diffusion-DPO and MaPO, and MaPO's first term.
"""

from __future__ import annotations

import torch

from diffalign.objectives._common import check_per_sample


def sft_loss(err_w: torch.Tensor) -> torch.Tensor:
    """Per-sample SFT loss ``Tensor[B]``: the winner's error itself."""
    check_per_sample(err_w=err_w)
    return err_w
