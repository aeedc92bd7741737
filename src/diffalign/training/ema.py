"""``use_ema``: an exponential moving average of the trained weights, saved in their place at the end.

As the diffusers training scripts do for a full fine-tune: after every applied optimizer update,
``ema = ema + (1 - decay) * (weight - ema)`` (float32); checkpoints hold it (``ema.safetensors``) so a resumed
run continues it exactly; the output ``unet/`` (``transformer/`` for SD3, FLUX and CogVideoX) holds the EMA weights
and ``unet_raw/`` (``transformer_raw/``) the trained ones.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class WeightEma:
    """EMA of ``trainable`` (name -> parameter), started at their current values."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter], decay: float):
        self.trainable, self.decay = trainable, float(decay)
        self.weights = {n: p.detach().clone().float() for n, p in trainable.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.trainable.items():
            self.weights[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA values in the trained parameters for the duration of the context (to save them); the trained
        values are back afterwards, also after an exception."""
        raw = {n: p.detach().clone() for n, p in self.trainable.items()}
        try:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(self.weights[n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.trainable.items():
                    p.copy_(raw[n])


__all__ = ["WeightEma"]
