"""The noise schedule maths every training recipe uses, in one small object.

Conventions (docs/methods.md#conventions-shared-by-every-method): ``x_t = a_t x0 + s_t eps`` with
``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``; the regression target is ``eps`` (epsilon),
``v = a_t eps - s_t x0`` (v-prediction) or ``x0`` (sample), as the model's scheduler config says. The
coefficients are read from ``alphas_cumprod`` in float32 on the CPU and moved to the tensor's device, so a
recipe gets the same numbers whatever device it trains on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unsupported(kind: str) -> UserError:
    return UserError(f"unsupported prediction_type {kind!r} in the scheduler config; use epsilon or v_prediction")


class NoiseSchedule:
    """``alphas_cumprod`` (abar_t for t = 0..T-1) and the prediction type; every method is a pure function.

    An unsupported prediction type is refused when a target or an x0 estimate is asked for, not before: noising
    alone never needs it.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str):
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def coeffs(self, t: Tensor | int, ref: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, s_t)`` in float32, one per sample, shaped to broadcast over ``ref`` ``[B, ...]`` (an int or a
        0-d ``t`` is the same timestep for every sample)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        if t.ndim == 0:
            t = t.expand(ref.shape[0])
        abar = self.alphas_cumprod.to(torch.float32)[t.cpu()].to(ref.device)
        shape = (-1,) + (1,) * (ref.ndim - 1)
        return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """``x_t = a_t x0 + s_t eps`` (the forward process), in x0's dtype."""
        a, s = self.coeffs(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The regression target of the prediction type: ``eps``, ``v = a_t eps - s_t x0``, or ``x0``."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            a, s = self.coeffs(t, x0)
            return (a * noise.float() - s * x0.float()).to(x0.dtype)
        if kind == "sample":
            return x0
        raise _unsupported(kind)

    def pred_x0(self, x_t: Tensor, t: Tensor | int, model_output: Tensor) -> Tensor:
        """The x0 estimate of a model output: ``(x_t - s_t eps)/a_t`` (epsilon), ``a_t x_t - s_t v`` (v)."""
        a, s = self.coeffs(t, x_t)
        out_dtype = torch.promote_types(x_t.dtype, model_output.dtype)
        x, m = x_t.float(), model_output.float()
        kind = self.prediction_type
        if kind == "epsilon":
            x0 = (x - s * m) / a
        elif kind == "v_prediction":
            x0 = a * x - s * m
        elif kind == "sample":
            x0 = m
        else:
            raise _unsupported(kind)
        return x0.to(out_dtype)

    def ddim_step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """One deterministic DDIM step (eta = 0) from ``t`` to ``t_next`` given the x0 estimate at ``x_t``:
        ``eps_hat = (x_t - a_t x0_hat) / s_t``, then ``x_next = a_next x0_hat + s_next eps_hat``."""
        a, s = self.coeffs(t, x_t)
        a_next, s_next = self.coeffs(t_next, x_t)
        eps_hat = (x_t - a * x0_hat) / s
        return a_next * x0_hat + s_next * eps_hat


__all__ = ["NoiseSchedule", "PREDICTION_TYPES"]
