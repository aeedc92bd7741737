"""The toy pretraining's settings, apart from the training code so that building the CLI does not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PretrainConfig:
    out: str = "toy-sd"
    seed: int = 0
    vae_steps: int = 500
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    pool_size: int = 20_000
    unet_steps: int = 1100
    unet_batch_size: int = 48
    unet_lr: float = 5e-4
    unet_weight_decay: float = 1e-2
    unet_warmup_steps: int = 100
    ema_decay: float = 0.995
    threads: int = 0  # 0: torch's default
