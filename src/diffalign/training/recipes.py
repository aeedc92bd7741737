"""The recipe of the pair methods (dpo, mapo, npo, sft): preference pairs in, per-sample losses out.

A recipe knows the method's data flow (which passes run, what is the reference), never the loss maths: that
is the objective the method table gives it (objectives/pair.py), which also says which errors it reads. Winner
and loser go through the network as ONE batch of 2B with one timestep and one noise per pair
(docs/methods.md#conventions-shared-by-every-method); an objective that reads only the winner (SFT) gets one
pass over the B winners.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..models import Conditioning
from ..models.folders import raw_folder
from ..objectives import per_sample_mse
from .batches import PairBatch, drop_captions, empty_prompt_mask, to_pair_batch
from .ema import WeightEma
from .methods import get_method
from .model_card import write_model_card
from .pair_data import empty_prompt, load_pair_items
from .protocol import RecipeBase, RunContext, StepResult, TrainData
from .reference import AdaptersOff
from .sections import section_keys
from .sharding import save_network
from .timesteps import UniformTimesteps, sample_noise_and_t, timestep_sampler

if TYPE_CHECKING:
    from ..models import ModelFamily


class PreferenceRecipe(RecipeBase):
    """DPO / MaPO / NPO / SFT on pairs.

    ``method`` names a row of the method table (or is the row); its settings (``beta=...``) or ``keys`` (its
    config section) bind the objective. The objective's ``reads`` says which passes run:

    - ``"pair+reference"`` (dpo, npo with dpo): the policy pass with gradient, then the reference pass under
      no_grad through ``reference`` (reference.py; default: the family's UNet with its adapters off);
    - ``"pair"`` (mapo, npo with mapo): one pass, no reference;
    - ``"winner"`` (sft): one pass over the winners only.

    Swapping winner and loser (npo) is the objective's business, not the recipe's.
    ``timesteps`` draws t (default uniform); ``shard = (rank, world)`` (timesteps.py). Built by the loop with
    :meth:`for_run`; built directly (tests, benchmarks), only :meth:`__call__` and :meth:`step` are available.
    """

    stability_hint = "lower learning_rate or beta"

    def __init__(self, family: ModelFamily, method="dpo", *, keys=None, reference=None, timesteps=None,
                 shard: tuple[int, int] = (0, 1), run: RunContext | None = None, **settings):
        self.method = get_method(method) if isinstance(method, str) else method
        if keys is None:
            try:
                keys = self.method.section(**settings)
            except TypeError:
                known = list(section_keys(self.method.section))
                raise TypeError(f"method {self.method.name} takes the settings {known}, "
                                f"got {sorted(settings)}") from None
        elif settings:
            raise TypeError("give either keys or settings, not both")
        self.keys = keys
        self.objective = self.method.objective(keys)
        self.family = family
        self.schedule = family.schedule
        self.reference = reference
        self.timesteps = timesteps or UniformTimesteps(family.num_train_timesteps)
        self.shard = shard
        self.run = run
        self.ema = None
        self._empty = None
        self._pairs = None

    @classmethod
    def for_run(cls, ctx: RunContext) -> "PreferenceRecipe":
        recipe = cls(ctx.family, ctx.method, keys=ctx.keys, reference=ctx.reference, shard=ctx.shard, run=ctx,
                     timesteps=timestep_sampler(ctx.cfg, ctx.family))
        if ctx.cfg.use_ema:
            recipe.ema = WeightEma(ctx.trainable, ctx.cfg.ema_decay)
        return recipe

    # ------------------------------------------------------------------------------------------- the maths
    def errors(self, batch: PairBatch, noise: Tensor, t: Tensor, net=None) -> tuple[Tensor, Tensor]:
        """Per-sample errors of winners and losers, through ``net`` (default: the trained network)."""
        x0 = torch.cat([batch.latents_w, batch.latents_l])
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        cond = Conditioning.cat([batch.cond_w, batch.cond_l])
        x_t = self.schedule.add_noise(x0, noise2, t2)
        pred = self.family.predict(x_t, t2, cond, net=self.net if net is None else net)
        err = per_sample_mse(pred, self.schedule.target(x0, noise2, t2))
        return err.chunk(2)

    def reference_errors(self, batch: PairBatch, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        reference = self.reference if self.reference is not None else AdaptersOff(self.family.unet)
        with torch.no_grad(), reference.active(self.net) as net:
            return self.errors(batch, noise, t, net=net)

    def __call__(self, batch: PairBatch, noise: Tensor, t: Tensor) -> StepResult:
        """Per-sample losses and metrics of ``batch`` at the given noise and timesteps (one of each per pair)."""
        objective = self.objective
        if objective.reads == "winner":
            x_t = self.schedule.add_noise(batch.latents_w, noise, t)
            err_w = per_sample_mse(self.family.predict(x_t, t, batch.cond_w, net=self.net),
                                   self.schedule.target(batch.latents_w, noise, t))
            errors = (err_w,)
        else:
            err_w, err_l = self.errors(batch, noise, t)
            errors = (err_w, err_l)
            if objective.needs_reference:
                errors += self.reference_errors(batch, noise, t)
        losses = objective.loss(*errors)
        metrics = dict(objective.metrics(*errors)) if objective.metrics is not None else {}
        metrics.setdefault("err_w", err_w.detach().mean())
        if len(errors) > 1:
            metrics.setdefault("err_l", err_l.detach().mean())
        return StepResult(losses, metrics)

    def step(self, batch: PairBatch, generator: torch.Generator) -> StepResult:
        """Noise, then t (through ``timesteps``), for the global batch from ``generator``; then :meth:`__call__`."""
        device = self.run.device if self.run is not None else batch.latents_w.device
        noise, t = sample_noise_and_t(batch.latents_w.shape, self.timesteps, generator, device, shard=self.shard)
        return self(batch, noise, t)

    # ------------------------------------------------------------------------------------------ the run
    def load_data(self) -> TrainData:
        ctx = self._context()
        pairs, items = load_pair_items(ctx.cfg, ctx.family, ctx.resolution, ctx.log)
        self._empty = empty_prompt(ctx.cfg, ctx.family, items)
        self._pairs = pairs
        return TrainData(items, pairs.report, pairs.summary)

    def describe(self, data: TrainData) -> str:
        cfg = self._context().cfg
        dropout = (f", a share {cfg.proportion_empty_prompts:g} of the captions dropped to the empty prompt"
                   if cfg.proportion_empty_prompts else "")
        count = "a stream of" if getattr(self._pairs, "streaming", False) else len(self._pairs)
        return f"{self.method.title(self.keys)} on {count} pairs{dropout}"

    def make_batch(self, rows: list, generator: torch.Generator) -> tuple[PairBatch | None, dict[str, int]]:
        """Caption dropout (drawn first, per global sample), then encoding (or stacking the cached latents)."""
        ctx = self._context()
        p = ctx.cfg.proportion_empty_prompts
        drop = empty_prompt_mask(p, len(rows), generator, shard=self.shard)
        rows, dropped = drop_captions(rows, drop, self._empty)
        batch = to_pair_batch(rows, ctx.family, ctx.resolution, ctx.device)
        return batch, ({"empty_prompts": dropped} if p else {})

    def after_update(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def checkpoint_state(self):
        return self.ema.state_dict() if self.ema is not None else None

    def rebind(self, trainable) -> None:
        super().rebind(trainable)
        if self.ema is not None:  # nothing trained yet: the EMA starts at the (now sharded) weights, as before
            self.ema = WeightEma(trainable, self.ema.decay)

    def weights_note(self) -> dict[str, str]:
        if self.ema is None or self._context().cfg.train_mode == "lora":
            return {}
        name = self.family.denoiser_name
        return {name: "EMA of the trained weights (use_ema)", raw_folder(name): "the trained weights"}

    def save_outputs(self, out: Path) -> None:
        """The LoRA, or the whole network; with use_ema the EMA weights in unet/ (transformer/ for SD3, FLUX and
        CogVideoX) and the trained ones in unet_raw/ (transformer_raw/)."""
        if self.ema is None or self._context().cfg.train_mode == "lora":
            return super().save_outputs(out)
        unet, name = self.family.unet, self.family.denoiser_name
        with self.ema.swapped_in():
            save_network(unet, Path(out) / name)
        save_network(unet, Path(out) / raw_folder(name))

    def write_model_card(self, out: Path, data_summary: str) -> Path:
        ctx = self._context()
        return write_model_card(ctx.cfg, out, resolution=ctx.resolution, family=ctx.family.name,
                                data_summary=data_summary, method=self.method, keys=self.keys)


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


__all__ = ["PairBatch", "PreferenceRecipe", "count_unet_calls", "per_sample_mse"]
