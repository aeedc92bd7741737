"""Random draws of a training step that cover the global batch, and the timestep sampler.

Every draw of a step comes from the loop's (seed, step, micro-batch) generator, the same on every process. A draw
covers the GLOBAL batch (``world x n`` samples) and this process keeps rows ``rank::world``, the rows
``BatchStream`` gives it; so a sample gets the same noise and timestep whatever the number of processes, and a
resumed run draws what an uninterrupted one drew.

Timesteps are drawn through a sampler object, so a weighted sampler can replace the uniform one in a recipe
without touching the loop: it only has to draw from the generator it is given.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor


def draw_global(fn: Callable[..., Tensor], n: int, shape: tuple, generator: torch.Generator,
                shard: tuple[int, int] = (0, 1), *args, **kwargs) -> Tensor:
    """``fn(*args, (world * n, *shape), generator=generator, **kwargs)[rank::world]``: this process's ``n`` rows
    of a draw for the global batch (``shard = (rank, world)``)."""
    rank, world = shard
    return fn(*args, (n * world, *shape), generator=generator, **kwargs)[rank::world]


class TimestepSampler(Protocol):
    """Draws training timesteps (int64, CPU) for this process's samples from a step's generator."""

    def sample(self, n: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        """``t`` for ``n`` samples: one per sample of the global batch drawn, this process's rows kept."""

    def sample_above(self, t: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        """A timestep ``s > t`` per sample (``s <= T-1``; the caller keeps ``t < T-1``)."""


class UniformTimesteps:
    """Every training timestep equally likely: ``t ~ U{0..T-1}``, and ``s ~ U{t+1..T-1}`` above a given ``t``."""

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = int(num_train_timesteps)

    def sample(self, n: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        return draw_global(torch.randint, n, (), generator, shard, 0, self.num_train_timesteps)

    def sample_above(self, t: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        # One float64 uniform per sample, scaled onto t+1..T-1 (the top clipped: u < 1 never reaches it anyway).
        T = self.num_train_timesteps
        u = draw_global(torch.rand, len(t), (), generator, shard, dtype=torch.float64)
        return torch.minimum(t + 1 + (u * (T - 1 - t)).long(), torch.tensor(T - 1))


#: Timestep densities of the flow-matching families (the SD3 paper's, as the diffusers SD3/FLUX scripts offer them).
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")


class FlowTimesteps:
    """Training timesteps of a flow-matching family (models/flow.py), drawn as the SD3 paper proposes.

    A uniform ``u`` in [0, 1) (``none``), ``u = sigmoid(n)`` with ``n ~ N(logit_mean, logit_std^2)``
    (``logit_normal``), or ``u = 1 - v - mode_scale * (cos^2(pi v / 2) - 1 + v)`` for a uniform ``v`` (``mode``);
    then the index ``floor(u T)`` into the scheduler's training sigmas, which run from pure noise down, as the
    diffusers scripts index them: our ascending timestep is ``k = T - 1 - floor(u T)``. One ``u`` per sample of
    the global batch (winner and loser share it). ``sample_above`` (Self-NPO's student) stays uniform.
    """

    def __init__(self, num_train_timesteps: int, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)
        self._uniform = UniformTimesteps(num_train_timesteps)

    def density_sample(self, n: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        """``u`` in [0, 1) for this process's ``n`` samples (float64)."""
        if self.weighting_scheme == "logit_normal":
            z = draw_global(torch.randn, n, (), generator, shard, dtype=torch.float64)
            return torch.sigmoid(self.logit_mean + self.logit_std * z)
        u = draw_global(torch.rand, n, (), generator, shard, dtype=torch.float64)
        if self.weighting_scheme == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample(self, n: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        T = self.num_train_timesteps
        index = (self.density_sample(n, generator, shard) * T).long().clamp(0, T - 1)
        return (T - 1) - index

    def sample_above(self, t: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Tensor:
        return self._uniform.sample_above(t, generator, shard)


def timestep_sampler(cfg, family) -> TimestepSampler:
    """The run's sampler: :class:`FlowTimesteps` from ``weighting_scheme`` for a flow-matching family, else uniform
    (``weighting_scheme`` other than none is refused there: it has no meaning for a DDPM schedule)."""
    from ..errors import UserError

    scheme = getattr(cfg, "weighting_scheme", "none")
    if getattr(family, "is_flow", False):
        return FlowTimesteps(family.num_train_timesteps, scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale)
    if scheme != "none":
        raise UserError(f"weighting_scheme={scheme} applies to flow-matching models (sd3, flux); the {family.name} "
                        "family trains on uniform timesteps: remove it")
    return UniformTimesteps(family.num_train_timesteps)


def sample_noise_and_t(shape, timesteps: TimestepSampler, generator: torch.Generator, device,
                       shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
    """One noise (``shape`` = this process's ``[B, ...]``) and one timestep per sample, in that order: the noise
    of the global batch first, then its timesteps from ``timesteps``."""
    noise = draw_global(torch.randn, shape[0], tuple(shape[1:]), generator, shard).to(device)
    t = timesteps.sample(shape[0], generator, shard).to(device)
    return noise, t


__all__ = ["FlowTimesteps", "TimestepSampler", "UniformTimesteps", "WEIGHTING_SCHEMES", "draw_global",
           "sample_noise_and_t", "timestep_sampler"]
