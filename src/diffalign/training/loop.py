"""The training loop on accelerate: one optimizer step = `gradient_accumulation_steps` micro-batches.

Every random draw (data order, augmentation, noise, timesteps) is a function of (seed, step, micro-batch,
process), which is what makes `resume_from_checkpoint: latest` continue exactly.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import lora_disabled
from .batches import CachedItems, PixelPairs, drop_captions, empty_prompt_mask, to_pair_batch
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig
from .guards import StepBoundary, check_disk_for_checkpoints
from .model_card import write_model_card
from .setup import make_stream, start_run
from .steps import (add_count, backward_micro_batch, make_optimizer, open_run_log, optimizer_step,
                    skip_micro_batch, write_train_report)
from .recipes import PreferenceRecipe, sample_noise_and_t
from .validation import validation_grid


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank)


def load_config_pairs(cfg: TrainConfig):
    """The preference pairs a config trains on: one call for `diffalign train` and `diffalign cache`, so a cache
    built ahead of time has the fingerprint the run looks for (every data key is part of it)."""
    from ..data import load_pairs

    return load_pairs(cfg.dataset_name, split=cfg.dataset_split_name, caption_column=cfg.caption_column,
                      image_columns=tuple(cfg.image_columns), label_columns=tuple(cfg.label_columns), ties=cfg.ties,
                      strict=cfg.strict_data, max_samples=cfg.max_train_samples, min_size=cfg.min_image_size or 0)


def _load_data(cfg: TrainConfig, family, resolution: int, log):
    from ..data import PairTransform

    if family.is_video:  # pairs of clips (CogVideoX, issue 10): see data/video_pairs.py
        from ..data.video_pairs import load_video_pairs

        return load_video_pairs(cfg, family)
    pairs = load_config_pairs(cfg)
    if cfg.use_cache:
        from ..data import build_cache, fingerprint, open_cache

        cache_dir = Path(cfg.cache_dir or Path(cfg.output_dir) / "cache")
        key = fingerprint(pairs, family, resolution=resolution)
        cached = open_cache(cache_dir, key)
        if cached is None:
            log(f"no matching latent cache in {cache_dir}: building it")
            build_cache(pairs, family, resolution=resolution, cache_dir=cache_dir)
            cached = open_cache(cache_dir, key)
        log(f"using the latent cache in {cache_dir} ({len(cached)} pairs; no random flips when cached)")
        return pairs, CachedItems(cached)
    transform = PairTransform(resolution, random_flip=cfg.random_flip, center_crop=cfg.center_crop)
    return pairs, PixelPairs(pairs, transform, cfg.seed)


def _empty_prompt(cfg: TrainConfig, family, items) -> dict | None:
    """What caption dropout puts in place of a cached pair's embeddings: the encoded "" as the cache stores text
    (None when nothing is dropped, or when items carry captions that are encoded with their batch)."""
    if not cfg.proportion_empty_prompts or not isinstance(items, CachedItems):
        return None
    from ..data.cache import cached_text

    with torch.no_grad():
        return {k: v[0] for k, v in cached_text(family, [""]).items()}


def train(cfg: TrainConfig) -> Path:
    """Run one training job described by `cfg`; returns the output folder."""
    if cfg.method == "selfnpo":
        from .selfnpo_loop import train_selfnpo

        return train_selfnpo(cfg)
    run = start_run(cfg)
    accelerator, out, family, resolution = run.accelerator, run.out, run.family, run.resolution
    rank, world, main, log = run.rank, run.world, run.main, run.log

    ref_unet = None
    if cfg.train_mode == "lora":
        family.add_lora(cfg.rank, cfg.lora_alpha, tuple(cfg.lora_target_modules), dropout=cfg.lora_dropout)
    else:
        uses_reference = cfg.method == "dpo" or (cfg.method == "npo" and cfg.npo_objective == "dpo")
        if uses_reference:
            ref_unet = copy.deepcopy(family.unet).requires_grad_(False).eval()
        family.enable_full_finetune()
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing()
    family.unet.train()
    named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}

    with accelerator.main_process_first():  # one process builds the latent cache / dataset files, then the rest read them
        pairs, items = _load_data(cfg, family, resolution, log)
    stream = make_stream(items, cfg, rank, world, pairs.summary)
    empty = _empty_prompt(cfg, family, items)

    optimizer, lr_scheduler = make_optimizer(cfg, list(named.values()), world)
    ema = {n: p.detach().clone().float() for n, p in named.items()} if cfg.use_ema else None
    check_disk_for_checkpoints(out, list(named.values()), ema=ema is not None, cfg=cfg, log=log)

    unet, optimizer = accelerator.prepare(family.unet, optimizer)
    family.unet = unet
    base_unet = accelerator.unwrap_model(unet)
    recipe = PreferenceRecipe(family, cfg.method, beta=cfg.beta, loss_type=cfg.loss_type, mapo_preset=cfg.mapo_preset,
                              npo_objective=cfg.npo_objective, ref_unet=ref_unet,
                              disable_adapters=lambda: lora_disabled(base_unet))

    started, counts = time.time(), {"skipped_micro_batches": 0}

    def report(status: str) -> dict:
        return {"status": status, "steps": step, "seconds": round(time.time() - started, 1), **counts,
                **boundary.nonfinite.state(), "data": pairs.report()}

    def save(at: int) -> Path:
        return save_checkpoint(out, at, weights=named, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                               extra=boundary.checkpoint_extra(**counts), total_limit=cfg.checkpoints_total_limit)

    boundary = StepBoundary(cfg, out=out, accelerator=accelerator, main=main, log=log, what=cfg.method,
                            hint="lower learning_rate or beta", save=save, report=report)
    step = 0
    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    if resume is not None:
        state = load_checkpoint(resume, params=named, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                                method=cfg.method)
        step = state["global_step"]
        boundary.nonfinite.restore(state)
        counts["skipped_micro_batches"] = int(state.get("skipped_micro_batches", 0))
        log(f"resumed from {resume} at step {step}")
    if main:
        open_run_log(cfg, out, accelerator, step, report("running"))
        dropout = (f"; a share {cfg.proportion_empty_prompts:g} of the captions dropped to the empty prompt"
                   if cfg.proportion_empty_prompts else "")
        log(f"{cfg.method} on {len(pairs)} pairs; {world} process(es) x batch {cfg.train_batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} = global batch {world * cfg.train_batch_size * cfg.gradient_accumulation_steps}"
            f"{dropout}")

    ga = cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc=f"train {cfg.method}", unit="step", disable=not main)
    with boundary.signals, contextlib.closing(stream):  # closing: the loading threads stop on any exit
        while step < cfg.max_train_steps:
            sums: dict[str, float] = {}
            for micro in range(ga):
                # Every draw of a micro-batch (caption dropout, then noise and t) comes from one generator, drawn for
                # the global batch, this process's rows kept: the same weights with 1 process x batch 2B as with 2
                # processes x batch B, and after a resume.
                gen = _step_generator(cfg.seed, step, micro, 0)
                rows = stream.get(step * ga + micro)
                drop = empty_prompt_mask(cfg.proportion_empty_prompts, len(rows), gen, shard=(rank, world))
                rows, dropped = drop_captions(rows, drop, empty)
                batch = to_pair_batch(rows, family, resolution, accelerator.device)
                if skip_micro_batch(accelerator, batch is None, step, micro, log):
                    counts["skipped_micro_batches"] += 1
                    continue
                if cfg.proportion_empty_prompts:
                    add_count(sums, "empty_prompts", dropped, world)
                noise, t = sample_noise_and_t(batch.latents_w.shape, family.num_train_timesteps, gen,
                                              accelerator.device, shard=(rank, world))
                backward_micro_batch(accelerator, unet, lambda: recipe(batch, noise, t), micro=micro, ga=ga, sums=sums)
            skipped, stop = optimizer_step(accelerator, list(named.values()), optimizer, lr_scheduler,
                                           cfg.max_grad_norm, sums, stop_requested=boundary.signals.received is not None)
            if ema is not None and skipped is None:
                with torch.no_grad():
                    for n, p in named.items():
                        ema[n].lerp_(p.detach().float(), 1 - cfg.ema_decay)
            step += 1
            boundary.end_step(step, skipped, stop, sums, bar)
            if main and cfg.validation_prompts and cfg.validation_steps and step % cfg.validation_steps == 0:
                _validate(cfg, family, base_unet, ref_unet, out, step, accelerator)
            accelerator.wait_for_everyone()
    bar.close()

    if main:
        family.unet = base_unet
        _save_outputs(cfg, family, named, ema, out)
        if cfg.validation_prompts:
            _validate(cfg, family, base_unet, ref_unet, out, step, accelerator)
        write_model_card(cfg, out, resolution=resolution, family=family.name, data_summary=pairs.summary())
        write_train_report(out, report("finished"))
        log(f"data: {pairs.summary()} (counts in train_report.json)")  # rows skipped while training are known now
        log(f"saved to {out}")
    accelerator.end_training()
    return out


def _save_outputs(cfg: TrainConfig, family, named, ema, out: Path) -> None:
    if cfg.train_mode == "lora":
        family.save_lora(out)
        return
    unet = family.unet
    if ema is not None:
        raw = {n: p.detach().clone() for n, p in named.items()}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(ema[n].to(p.dtype))
        unet.save_pretrained(out / "unet")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(raw[n])
        unet.save_pretrained(out / "unet_raw")
    else:
        unet.save_pretrained(out / "unet")


def _validate(cfg, family, base_unet, ref_unet, out: Path, step: int, accelerator) -> None:
    saved = family.unet
    family.unet = base_unet
    try:
        grid = validation_grid(family, cfg, ref_unet=ref_unet)
    finally:
        family.unet = saved
        base_unet.train()
    folder = out / "validation"
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    tb = next((t for t in accelerator.trackers if t.name == "tensorboard"), None)
    if tb is not None:
        import numpy as np

        tb.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
