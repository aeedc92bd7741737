"""Self-NPO pieces: the pseudo-Huber distance, the student's distance to the teacher (the method table's
objective of ``selfnpo``) and the forward re-noising of a teacher state.

Wang et al. 2025, "Self-NPO: Negative Preference Optimization of Diffusion Models by Simply Learning from
Itself without Explicit Preference Annotation". The student sees ``x_s`` re-noised from the teacher's
``x_t`` (``s > t``) and regresses its x0 prediction onto the teacher's with the pseudo-Huber distance.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from ._common import per_sample_mse

SELFNPO_LOSSES = ("pseudo_huber", "l2")


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Per-sample pseudo-Huber distance ``Tensor[B]``::

        d(pred, target) = mean over non-batch dims of ( sqrt((pred - target)**2 + c**2) - c )

    Per-element with a fixed ``c`` (default 1e-3), as the Self-NPO official training code uses it
    (and the diffusers LCM scripts). Note this differs from the consistency-model form of Song & Dhariwal
    2023 ("Improved Techniques for Training Consistency Models"), which applies
    ``sqrt(||x - y||^2 + c^2) - c`` to the whole-sample L2 norm with ``c = 0.00054 * sqrt(dim)``;
    here ``c`` never scales with the dimension.

    Behaves like ``d^2 / (2c)`` for ``|d| << c`` and like ``|d| - c`` for ``|d| >> c``. Computed as
    ``d^2 / (sqrt(d^2 + c^2) + c)``, the same value without the cancellation of the difference form.
    Half-precision inputs are computed in float32 (``c**2 = 1e-6`` is subnormal in fp16).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must share one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim < 1:
        raise ValueError("pred and target need a batch dimension")
    if not c > 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c!r}")
    d = pred - target
    if d.dtype in (torch.float16, torch.bfloat16):
        d = d.float()
    d2 = d * d
    per_element = d2 / (torch.sqrt(d2 + c * c) + c)
    return per_element.reshape(per_element.shape[0], -1).mean(dim=1)


def renoise(
    x_t: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Forward-diffuse ``x_t`` (noise level ``t``) to the noisier level ``s > t``::

        x_s = a_s * (x_t / a_t + sqrt((s_s/a_s)^2 - (s_t/a_t)^2) * noise)

    with ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``. In noise-to-signal terms this adds the missing
    variance, so if ``x_t = a_t x0 + s_t eps`` then ``x_s`` has mean ``a_s x0`` and std ``s_s`` per element,
    exactly the marginal ``q(x_s | x0)``.

    ``t`` and ``s`` are integer tensors ``[B]`` indexing ``alphas_cumprod`` (``[T]``); ``x_t`` and ``noise``
    share any shape ``[B, ...]`` (4-D images, 5-D video). Raises ``ValueError`` unless ``s > t`` for every
    sample.
    """
    if noise.shape != x_t.shape:
        raise ValueError(f"noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
    for name, idx in (("t", t), ("s", s)):
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of timesteps, got dtype {idx.dtype}")
        if idx.shape != (x_t.shape[0],):
            raise ValueError(f"{name} must have shape [B] = [{x_t.shape[0]}], got {tuple(idx.shape)}")
    n = alphas_cumprod.shape[0]
    if bool((t < 0).any()) or bool((s >= n).any()):
        raise ValueError(f"timesteps must lie in [0, {n - 1}], got t={t.tolist()} s={s.tolist()}")
    if not bool((s > t).all()):
        raise ValueError(f"renoise needs s > t for every sample, got t={t.tolist()} s={s.tolist()}")

    # Coefficients in float64 on the CPU (B numbers; MPS has no float64), then cast to x_t's device/dtype.
    abar = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
    abar_t, abar_s = abar[t.cpu()], abar[s.cpu()]
    # a_s * sqrt((s_s/a_s)^2 - (s_t/a_t)^2) == sqrt(1 - abar_s/abar_t): the same value without dividing by abar_s,
    # which is exactly 0 at s = T-1 in zero-terminal-SNR schedules (CogVideoX), where the other form gives 0*inf.
    # abar_t > 0 always (t < s <= T-1). The clamp guards a non-monotone schedule.
    ratio = abar_s / abar_t
    coef_x = ratio.sqrt()
    coef_noise = (1.0 - ratio).clamp_min(0.0).sqrt()
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    coef_x = coef_x.to(device=x_t.device, dtype=x_t.dtype).reshape(shape)
    coef_noise = coef_noise.to(device=x_t.device, dtype=x_t.dtype).reshape(shape)
    return coef_x * x_t + coef_noise * noise


def selfnpo_distance(loss: str = "pseudo_huber", *, huber_c: float = 1e-3) -> Callable[[Tensor, Tensor], Tensor]:
    """The student's per-sample distance to the teacher's target: pseudo-Huber with ``c = huber_c`` (official) or
    the per-element mean squared error (``l2``); the method table's objective of ``selfnpo``."""
    if loss not in SELFNPO_LOSSES:
        raise ValueError(f"loss must be one of {SELFNPO_LOSSES}, got {loss!r}")
    return functools.partial(pseudo_huber, c=float(huber_c)) if loss == "pseudo_huber" else per_sample_mse
