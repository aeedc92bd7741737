"""The recipe protocol: what the training loop (loop.py) asks of a method.

A recipe turns dataset items into batches and one batch into per-sample losses; the loop does everything else
(accelerate, accumulation, the optimizer step and its guards, checkpoints, resume, signals, logging, validation).
One recipe instance serves one run. In the loop's order:

1. ``Method.recipe(ctx)`` builds it from a :class:`RunContext`, before accelerate wraps the network: a teacher or
   an EMA copies the network here;
2. ``load_data()`` -> :class:`TrainData` (once, the main process first);
3. ``attach(net)``: the network a step trains through, as accelerate prepared it (a DDP wrapper under several
   processes);
4. per micro-batch: ``make_batch(rows, generator)`` (items to a batch, under ``torch.no_grad``), then
   ``step(batch, generator)`` -> :class:`StepResult`. Every random draw of both comes from ``generator``, the
   loop's (seed, step, micro-batch) generator, the same on every process: a draw covers the global batch and
   this process keeps its rows (timesteps.py), which is what makes resume exact and N processes equal 1;
5. ``after_update()`` after every optimizer update that was applied (not after a skipped one);
   A sharded run (training/sharding.py) shards the network and ``own_networks()`` between steps 1 and 2, then
   calls ``rebind(trainable)`` with the sharded parameters;
6. ``checkpoint_state()``: tensors saved in every checkpoint beside the trainable weights and restored on resume
   (``check_checkpoint(path)`` first refuses a checkpoint the recipe cannot resume from); every checkpoint also
   holds the loadable weights, written by ``save_outputs(folder)`` (``weights_note()`` says what each holds when
   a name alone does not);
7. at the end (main process): ``save_outputs(out)``, the last validation grid, ``write_model_card(out, summary)``.

:class:`RecipeBase` gives the defaults of the optional parts (no after-update hook, no extra state, the trained
LoRA or UNet as output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor


@dataclass
class StepResult:
    """Per-sample losses (the loop reduces) and detached scalar metrics for logging (0-d tensors or floats:
    the loop keeps them on the device and reads them once per optimizer step, not per micro-batch)."""

    losses: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainData:
    """What a run trains on: ``items`` for the BatchStream (``len()`` and ``item(i, epoch)``), the counts for
    train_report.json (``report()``) and one line for the logs and the model card (``summary()``)."""

    items: Any
    report: Callable[[], dict]
    summary: Callable[[], str]


@dataclass
class RunContext:
    """What the loop tells a recipe when a run starts.

    ``trainable``: the network's trainable parameters by name. ``reference``: the frozen reference (reference.py)
    when the method table says the objective needs one, else None. ``shard = (rank, world)``.
    """

    cfg: Any
    method: Any  # its row of the method table
    keys: Any  # cfg's section for that method
    family: Any
    resolution: int
    trainable: dict[str, torch.nn.Parameter]
    reference: Any
    device: Any
    shard: tuple[int, int]
    log: Callable[[str], None]


class Recipe(Protocol):
    """See the module docstring for when the loop calls what."""

    #: The end of the non-finite-loss error's advice ("...; {hint}, or train in full precision").
    stability_hint: str

    def load_data(self) -> TrainData: ...

    def attach(self, net) -> None: ...

    def describe(self, data: TrainData) -> str:
        """The run in a few words for its first log line ("dpo on 24 pairs")."""

    def make_batch(self, rows: list, generator: torch.Generator) -> tuple[Optional[Any], dict[str, int]]:
        """This process's items of a micro-batch -> (batch, or None when no row is usable; counts of this process
        to log as global sums, e.g. ``{"empty_prompts": 2}``)."""

    def step(self, batch, generator: torch.Generator) -> StepResult: ...

    def after_update(self) -> None: ...

    def checkpoint_state(self) -> Optional[dict[str, Tensor]]: ...

    def check_checkpoint(self, path: Path) -> None: ...

    def weights_note(self) -> dict[str, str]: ...

    def save_outputs(self, out: Path) -> None: ...

    def write_model_card(self, out: Path, data_summary: str) -> Path: ...


class RecipeBase:
    """Defaults of the optional parts of :class:`Recipe`; ``self.run`` is the :class:`RunContext` (None when a
    recipe is built directly, as the tests and benchmarks do: then only its maths are available)."""

    stability_hint = "lower learning_rate"
    run: Optional[RunContext] = None
    _net = None

    def attach(self, net) -> None:
        self._net = net

    @property
    def net(self):
        """The network a step trains through: what :meth:`attach` gave, else the family's own."""
        return self._net if self._net is not None else self.family.unet

    def _context(self) -> RunContext:
        if self.run is None:
            raise RuntimeError(f"{type(self).__name__} was built without a run (RunContext): only its step maths "
                               "can be used; build it with for_run(ctx) to train")
        return self.run

    def after_update(self) -> None:
        """Nothing to do after an update."""

    def own_networks(self) -> list[torch.nn.Module]:
        """Networks of the recipe's own (a teacher copy) that a sharded run shards like the trained one."""
        return []

    def rebind(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        """The trainable parameters after sharding replaced them (sharding.py; the values are unchanged): a recipe
        holding parameters or copies of them (an EMA) takes the new ones here."""
        if self.run is not None:
            self.run.trainable = trainable

    def checkpoint_state(self) -> Optional[dict[str, Tensor]]:
        return None

    def check_checkpoint(self, path: Path) -> None:
        """Any checkpoint of the same method resumes."""

    def weights_note(self) -> dict[str, str]:
        """What each folder written by :meth:`save_outputs` holds, when a name alone does not say it (state.json of
        every checkpoint records it)."""
        return {}

    def save_outputs(self, out: Path) -> None:
        """The trained weights: the LoRA (pytorch_lora_weights.safetensors) or the whole network, in the folder a
        pipeline keeps it in (unet/, or transformer/ for SD3, FLUX and CogVideoX: models/folders.py)."""
        ctx = self._context()
        from .sharding import save_lora, save_network

        if ctx.cfg.train_mode == "lora":
            save_lora(ctx.family, out)
        else:
            save_network(ctx.family.unet, Path(out) / ctx.family.denoiser_name)


__all__ = ["Recipe", "RecipeBase", "RunContext", "StepResult", "TrainData"]
