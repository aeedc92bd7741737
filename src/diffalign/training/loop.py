"""The training loop on accelerate, one for every method: one optimizer step = `gradient_accumulation_steps`
micro-batches, each turned into per-sample losses by the method's recipe (protocol.py; which recipe: the method
table, methods.py).

Every random draw (data order, augmentation, caption dropout, noise, timesteps, a teacher's start points) is a
function of (seed, step, micro-batch, process): that is what makes `resume_from_checkpoint: latest` continue
exactly and N processes train like one. The loop owns the order: the data order comes from the BatchStream, the
rest from the step's generator, which the recipe draws from in a fixed order.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..safety.disk import DiskFull, failed_file, is_disk_full
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    remove_incomplete,
    resolve_resume,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .compile import compile_repeated_blocks
from .config import TrainConfig
from .fetch_guard import FetchFailures, add_fetch_failures
from .guards import StepBoundary, check_disk_for_checkpoints
from .hub import HubPush
from .methods import get_method
from .pair_data import load_config_pairs
from .protocol import RunContext
from .reference import AdaptersOff, FrozenCopy
from .run_log import open_run_log, run_finished, write_train_report
from .setup import make_stream, start_run
from .sharding import autocast_forward, load_sharded, save_sharded
from .steps import add_count, backward_micro_batch, make_optimizer, optimizer_step, skip_micro_batch
from .validation import ValidationGrids, save_grid

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..models import ModelFamily


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    from ..safety.seeds import step_seed

    return torch.Generator().manual_seed(step_seed(seed, step, micro, rank))


def _prepare_network(cfg: TrainConfig, family: ModelFamily, needs_reference: bool, log=print):
    """LoRA adapters or every UNet weight trainable; the frozen reference when the objective needs one (for a full
    fine-tune copied first, so it keeps the frozen dtype). Returns the reference or None."""
    reference = None
    if cfg.train_mode == "lora":
        family.add_lora(cfg.rank, cfg.lora_alpha, tuple(cfg.lora_target_modules), dropout=cfg.lora_dropout)
        if needs_reference:
            reference = AdaptersOff(family.unet)
    else:
        if needs_reference:
            reference = FrozenCopy.of(family.unet)
        family.enable_full_finetune()
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing()
    if cfg.torch_compile:
        n = compile_repeated_blocks(family.unet, cfg.torch_compile_mode)
        log(f"torch_compile: {n} repeated blocks of the {type(family.unet).__name__} compiled in place "
            f"(mode {cfg.torch_compile_mode}); the first steps include the compilation")
    family.unet.train()
    return reference


def _shard(sharder, family: ModelFamily, reference, recipe) -> dict:
    """Shard the trained network, the frozen reference copy (DPO, full) and the recipe's own networks (the Self-NPO
    teacher), then let the recipe find its trainable parameters again (fully_shard replaces them). Returns the
    trainable parameters by name: sharded, what the optimizer is built on."""
    sharder(family.unet)
    if isinstance(reference, FrozenCopy):
        sharder(reference.module, frozen=True)
    for module in recipe.own_networks():
        sharder(module, frozen=True)
    named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    recipe.rebind(named)
    return named


def train(cfg: TrainConfig) -> Path:
    """Run one training job described by `cfg`; returns the output folder."""
    run = start_run(cfg)
    accelerator, out, family, resolution = run.accelerator, run.out, run.family, run.resolution
    rank, world, main, log = run.rank, run.world, run.main, run.log
    hub = HubPush.start(cfg, log, main=main)  # push_to_hub: the repo exists (or the run stops) before training

    method = get_method(cfg.method)
    keys = method.keys(cfg)
    reference = _prepare_network(cfg, family, method.needs_reference(keys), log)
    named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    recipe = method.recipe(RunContext(cfg, method, keys, family, resolution, named, reference, accelerator.device,
                                      (rank, world), log))
    sharded = run.sharder is not None
    if sharded:  # FSDP2: the network, its reference and the recipe's copies (EMA, teacher) become sharded
        named = _shard(run.sharder, family, reference, recipe)
        log(run.sharder.plan.describe())

    with accelerator.main_process_first():  # one process builds the latent cache / dataset files, then the rest read them
        data = recipe.load_data()
    stream = make_stream(data.items, cfg, rank, world, data.summary)

    optimizer, lr_scheduler = make_optimizer(cfg, list(named.values()), world)
    extra = recipe.checkpoint_state()  # an EMA or a teacher: saved with every checkpoint
    check_disk_for_checkpoints(out, list(named.values()), ema=extra is not None, cfg=cfg, log=log)

    # The network the steps train through (a DDP wrapper under several processes) is handed to the recipe;
    # `family.unet` stays the bare module, for the outputs and validation. A sharded network is its own wrapper.
    if sharded:
        net, optimizer = family.unet, accelerator.prepare(optimizer)
        autocast_forward(net, accelerator)
    else:
        net, optimizer = accelerator.prepare(family.unet, optimizer)
    recipe.attach(net)

    started, counts = time.time(), {"skipped_micro_batches": 0}
    ga = cfg.gradient_accumulation_steps
    fetch = FetchFailures(cfg.max_skipped_share, cfg.train_batch_size * world, stream.per_epoch, ga, data.summary)

    def report(status: str) -> dict:
        return {"status": status, "steps": step, "seconds": round(time.time() - started, 1), **counts,
                **boundary.nonfinite.state(), **fetch.state(), "data": data.report()}

    def save(at: int) -> Path:
        if sharded:  # every process writes its part
            saved = save_sharded_checkpoint(
                out, at, write_shards=lambda folder: save_sharded(folder, net, optimizer, recipe.checkpoint_state()),
                lr_scheduler=lr_scheduler, extra=boundary.checkpoint_extra(**counts, **fetch.state(), **notes),
                total_limit=cfg.checkpoints_total_limit, write_weights=recipe.save_outputs, main=main,
                barrier=accelerator.wait_for_everyone)
        else:
            saved = save_checkpoint(out, at, weights=named, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                    ema=recipe.checkpoint_state(),
                                    extra=boundary.checkpoint_extra(**counts, **fetch.state(), **notes),
                                    total_limit=cfg.checkpoints_total_limit, write_weights=recipe.save_outputs)
        if main and hub is not None and cfg.hub_push_checkpoints:
            hub.push_checkpoint(saved)
        return saved

    notes = {"weights": recipe.weights_note()} if recipe.weights_note() else {}

    boundary = StepBoundary(cfg, out=out, accelerator=accelerator, main=main, log=log, what=cfg.method,
                            hint=recipe.stability_hint, save=save, report=report, collective_save=sharded)
    step = 0
    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    if resume is not None:
        recipe.check_checkpoint(resume)
        if sharded:
            state = load_sharded_checkpoint(
                resume, load_shards=lambda folder: load_sharded(folder, net, optimizer, recipe.checkpoint_state()),
                lr_scheduler=lr_scheduler, method=cfg.method)
        else:
            state = load_checkpoint(resume, params=named, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=extra,
                                    method=cfg.method)
        step = state["global_step"]
        boundary.nonfinite.restore(state)
        counts["skipped_micro_batches"] = int(state.get("skipped_micro_batches", 0))
        fetch.restore(state)
        log(f"resumed from {resume} at step {step}")
        if step >= cfg.max_train_steps and run_finished(out, step):
            log(f"nothing to do: the run finished at step {step} (max_train_steps={cfg.max_train_steps}) and its "
                f"outputs are in {out}; raise max_train_steps to train further")
            accelerator.end_training()
            return out
    if main:
        open_run_log(cfg, out, accelerator, step, report("running"))
        log(f"{recipe.describe(data)}; {world} process(es) x batch {cfg.train_batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} = global batch {cfg.global_batch_size(world)}")
        if cfg.beta_dpo is not None:
            log(f"beta_dpo {cfg.beta_dpo:g} (the diffusers script's convention, no 0.5 in the logit) trains as beta "
                f"{cfg.beta:g} here")

    grids = ValidationGrids(family, cfg, reference.module if isinstance(reference, FrozenCopy) else None)
    validated = None  # the step of the last grid
    try:
        bar = tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {cfg.method}", unit="step", disable=not main)
        with boundary.signals, contextlib.closing(stream):  # closing: the loading threads stop on any exit
            while step < cfg.max_train_steps:
                sums: dict[str, float] = {}
                for micro in range(ga):
                    # Every draw of a micro-batch (e.g. caption dropout, then noise and t) comes from one
                    # generator, drawn for the global batch, this process's rows kept: the same weights with
                    # 1 process x batch 2B as with 2 processes x batch B, and after a resume.
                    gen = _step_generator(cfg.seed, step, micro, 0)
                    items = stream.get(step * ga + micro)
                    add_fetch_failures(sums, items, world)  # counted over all processes with the step's metrics
                    with torch.no_grad():
                        batch, batch_counts = recipe.make_batch(items, gen)
                    if skip_micro_batch(accelerator, batch is None, step, micro, log):
                        counts["skipped_micro_batches"] += 1
                        continue
                    for name, count in batch_counts.items():
                        add_count(sums, name, count, world)
                    backward_micro_batch(accelerator, net, lambda: recipe.step(batch, gen), micro=micro, ga=ga,
                                         sums=sums)
                skipped, stop = optimizer_step(accelerator, list(named.values()), optimizer, lr_scheduler,
                                               cfg.max_grad_norm, sums,
                                               stop_requested=boundary.signals.received is not None, sharded=sharded)
                if skipped is None:  # a skipped update leaves an EMA or a teacher where it was too
                    recipe.after_update()
                fetch.record(step, sums)
                step += 1
                boundary.end_step(step, skipped, stop, sums, bar)
                boundary.stop_with(fetch.check(step, last=step >= cfg.max_train_steps))
                # Sharded: every process takes part in the sampling (its forward passes gather the weights).
                if (main or sharded) and cfg.validation_prompts and cfg.validation_steps and step % cfg.validation_steps == 0:
                    validated = _validate(grids, out, step, accelerator, write=main)
                accelerator.wait_for_everyone()
        bar.close()

        if sharded:  # the gathers of the final weights and of a last grid are collective; the main process writes
            recipe.save_outputs(out)
            if cfg.validation_prompts and validated != step:
                _validate(grids, out, step, accelerator, write=main)
        if main:
            if not sharded:
                recipe.save_outputs(out)
                if cfg.validation_prompts and validated != step:
                    _validate(grids, out, step, accelerator)
            recipe.write_model_card(out, data.summary())
            write_train_report(out, report("finished"))
            log(f"data: {data.summary()} (counts in train_report.json)")  # rows skipped while training are known now
            log(f"saved to {out}")
            if hub is not None:
                hub.push_final(out)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        error = _disk_full_error(out, step, exc, main)
        if main:  # no wait for the other processes: only this one writes, they fail at their next collective
            with contextlib.suppress(OSError):
                write_train_report(out, report(error.status))
        raise error from None
    if sharded:  # the processes tear the process group down together (one leaving early can abort the other's gloo)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _disk_full_error(out: Path, step: int, exc: BaseException, main: bool) -> DiskFull:
    """The DiskFull to stop with; our own half-written checkpoint (a `.checkpoint-N.tmp`) is removed to give the
    space back, and the newest complete checkpoint stays `latest`."""
    if main:
        remove_incomplete(out)
    found = list_checkpoints(out)
    where = (f"the last good checkpoint is {found[-1]}: free some space, then run the same command with "
             "--resume_from_checkpoint=latest" if found else "no checkpoint was written yet: free some space and "
             "start again")
    return DiskFull(f"the disk is full: a write in {out} failed at step {step}{failed_file(exc)}; {where}")


def _validate(grids: ValidationGrids, out: Path, step: int, accelerator: Accelerator, write: bool = True) -> int:
    """The validation grid of `step` (base row, trained row) into out/validation/ and the tensorboard tracker
    (`write=False`: sampled only, by a process of a sharded run that takes part in the main one's forwards)."""
    try:
        grid = grids.grid(step)
    finally:
        grids.family.unet.train()
    if not write:
        return step
    folder = out / "validation"
    folder.mkdir(exist_ok=True)
    save_grid(grid, folder / f"step-{step:06d}.png")
    tb = next((t for t in accelerator.trackers if t.name == "tensorboard"), None)
    if tb is not None:
        import numpy as np

        tb.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return step


__all__ = ["load_config_pairs", "train"]  # load_config_pairs: `diffalign cache` builds the cache a run will find
