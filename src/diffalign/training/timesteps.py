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


def sample_noise_and_t(shape, timesteps: TimestepSampler, generator: torch.Generator, device,
                       shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
    """One noise (``shape`` = this process's ``[B, ...]``) and one timestep per sample, in that order: the noise
    of the global batch first, then its timesteps from ``timesteps``."""
    noise = draw_global(torch.randn, shape[0], tuple(shape[1:]), generator, shard).to(device)
    t = timesteps.sample(shape[0], generator, shard).to(device)
    return noise, t


__all__ = ["TimestepSampler", "UniformTimesteps", "draw_global", "sample_noise_and_t"]
