"""Recipes: turn a batch of preference pairs into per-sample errors and call an objective.

A recipe knows the method's data flow (which passes run, what is swapped, what is the reference), never
the loss maths (that is `objectives/`). Winner and loser go through the network as ONE batch of 2B with
one timestep and one noise per pair (docs/methods.md#conventions-shared-by-every-method).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models import Conditioning
from ..objectives import dpo_loss, mapo_loss, sft_loss
from ..objectives.dpo import dpo_metrics
from ..objectives.mapo import mapo_metrics


@dataclass
class StepResult:
    """Per-sample losses (the loop reduces) and detached scalar metrics for logging (0-d tensors or floats:
    the loop keeps them on the device and reads them once per optimizer step, not per micro-batch)."""

    losses: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """err = mean over every non-batch element of (pred - target)^2, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class PairBatch:
    """Latents of winners and losers [B, ...] and their conditioning (SDXL: time ids per image)."""

    latents_w: Tensor
    latents_l: Tensor
    cond_w: Conditioning
    cond_l: Conditioning

    @property
    def size(self) -> int:
        return self.latents_w.shape[0]


class PreferenceRecipe:
    """DPO / MaPO / NPO / SFT on pairs. `reference` is a callable context/module for DPO's reference pass.

    - dpo: two passes (policy with grad, reference under no_grad): adapters disabled for LoRA, or a frozen
      copy of the UNet for a full fine-tune (`ref_unet`).
    - mapo: one pass, no reference.
    - npo: the chosen objective on swapped pairs (the loser becomes the "winner"), used for the negative model.
    - sft: one pass on winners only.
    """

    def __init__(self, family, method: str, *, beta: float | None = None, loss_type: str = "sigmoid",
                 mapo_preset: str = "official", npo_objective: str = "dpo", ref_unet=None, disable_adapters=None):
        self.family = family
        self.method = method
        self.beta = beta
        self.loss_type = loss_type
        self.mapo_preset = mapo_preset
        self.npo_objective = npo_objective
        self.ref_unet = ref_unet
        # Under DDP the family's UNet is a wrapper: the loop passes a context that reaches the inner module.
        self.disable_adapters = disable_adapters or family.lora_disabled

    @property
    def objective(self) -> str:
        return self.npo_objective if self.method == "npo" else self.method

    def _errors(self, batch: PairBatch, noise: Tensor, t: Tensor, unet_override=None) -> tuple[Tensor, Tensor]:
        x0 = torch.cat([batch.latents_w, batch.latents_l])
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        cond = Conditioning.cat([batch.cond_w, batch.cond_l])
        x_t = self.family.add_noise(x0, noise2, t2)
        if unet_override is None:
            pred = self.family.predict(x_t, t2, cond)
        else:
            saved, self.family.unet = self.family.unet, unet_override
            try:
                pred = self.family.predict(x_t, t2, cond)
            finally:
                self.family.unet = saved
        err = per_sample_mse(pred, self.family.target(x0, noise2, t2))
        return err.chunk(2)

    def _reference_errors(self, batch, noise, t) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if self.ref_unet is not None:
                return self._errors(batch, noise, t, unet_override=self.ref_unet)
            with self.disable_adapters():
                return self._errors(batch, noise, t)

    def __call__(self, batch: PairBatch, noise: Tensor, t: Tensor) -> StepResult:
        if self.method == "sft":
            x_t = self.family.add_noise(batch.latents_w, noise, t)
            err_w = per_sample_mse(self.family.predict(x_t, t, batch.cond_w), self.family.target(batch.latents_w, noise, t))
            return StepResult(sft_loss(err_w), {"err_w": err_w.detach().mean()})

        err_w, err_l = self._errors(batch, noise, t)
        swap = self.method == "npo"
        if self.objective == "dpo":
            ref_w, ref_l = self._reference_errors(batch, noise, t)
            losses = dpo_loss(err_w, err_l, ref_w, ref_l, beta=self.beta, loss_type=self.loss_type, swap=swap)
            metrics = dict(dpo_metrics(err_w, err_l, ref_w, ref_l, beta=self.beta, swap=swap))
        elif self.objective == "mapo":
            w, l = (err_l, err_w) if swap else (err_w, err_l)
            kwargs = {"beta": self.beta} if self.mapo_preset == "paper" else {}
            losses = mapo_loss(w, l, preset=self.mapo_preset, **kwargs)
            metrics = dict(mapo_metrics(w, l, preset=self.mapo_preset, **kwargs))
        else:
            raise ValueError(f"unknown objective {self.objective!r}")
        metrics.setdefault("err_w", err_w.detach().mean())
        metrics.setdefault("err_l", err_l.detach().mean())
        return StepResult(losses, metrics)


def sample_noise_and_t(shape, num_train_timesteps: int, generator: torch.Generator, device,
                       shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
    """One noise and one timestep per pair, from a generator the loop seeds per step (exact resume).

    `shard = (rank, world)`: the draw covers the GLOBAL batch (world x shape[0] pairs, the same generator on
    every process) and this process keeps rows rank::world, the rows `BatchStream` gives it; so a pair gets the
    same noise and t whatever the number of processes.
    """
    rank, world = shard
    noise = torch.randn((shape[0] * world, *shape[1:]), generator=generator)[rank::world].to(device)
    t = torch.randint(0, num_train_timesteps, (shape[0] * world,), generator=generator)[rank::world].to(device)
    return noise, t


@contextlib.contextmanager
def count_unet_calls(unet):
    """Count forward calls of a module (tests: MaPO makes 1 network pass per step, DPO 2)."""
    counter = {"calls": 0}

    def hook(*_):
        counter["calls"] += 1

    handle = unet.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
