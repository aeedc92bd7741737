"""``diffalign train`` with ``method: selfnpo``: the Self-NPO loop on accelerate (LoRA or full UNet).

Same structure as :func:`diffalign.training.loop.train`: every random draw (data order, crops, start indices,
noise, s) is a function of (seed, step, micro-batch, process), so ``resume_from_checkpoint: latest`` continues
exactly; checkpoints hold the student's trainable weights, the teacher EMA (``ema.safetensors``), the optimizer
and the LR scheduler. The output is the negative offset: the student's LoRA (``pytorch_lora_weights.safetensors``)
or its UNet (``unet/``), meant for the negative branch of classifier-free guidance only.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .setup import make_stream, start_run
from .steps import (backward_micro_batch, make_optimizer, open_run_log, optimizer_step, skip_micro_batch,
                    write_train_report)
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .guards import StepBoundary, check_disk_for_checkpoints
from .config import TrainConfig
from .loop import _step_generator, _validate
from .selfnpo import EmaTeacher, SelfNPOBatch, SelfNPORecipe


class _PromptItems:
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def item(self, i: int, epoch: int) -> dict:
        return {"caption": self.prompts[i]}


class _ImageItems:
    def __init__(self, data, transform, seed: int):
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self) -> int:
        return len(self.data)

    def item(self, i: int, epoch: int) -> dict | None:
        from ..data import deterministic_rng

        image = self.data.image(i)
        if image is None:
            return None
        return {"caption": self.data.caption(i), **self.transform(image, deterministic_rng(self.seed, epoch, i))}


def _load_data(cfg: TrainConfig, resolution: int):
    """(items for BatchStream, report dict, one-line summary)."""
    from ..data.prompts import ImageCaptions, ImageCaptionTransform, load_prompts

    if cfg.selfnpo_start == "noise":
        prompts = load_prompts(cfg.dataset_name, cfg.caption_column, split=cfg.dataset_split_name,
                               max_samples=cfg.max_train_samples)
        n_empty = sum(1 for p in prompts if not p.strip())
        summary = f"{len(prompts)} prompts from {cfg.dataset_name!r}" + (f" ({n_empty} empty)" if n_empty else "")
        return _PromptItems(prompts), {"prompts": len(prompts), "empty_prompts": n_empty}, summary
    data = ImageCaptions(cfg.dataset_name, image_column=cfg.image_columns[0], caption_column=cfg.caption_column,
                         split=cfg.dataset_split_name, strict=cfg.strict_data, max_samples=cfg.max_train_samples)
    transform = ImageCaptionTransform(resolution, random_flip=cfg.random_flip, center_crop=cfg.center_crop)
    return _ImageItems(data, transform, cfg.seed), data, data.summary()


def make_batch(items: list, family, resolution: int, uncond1, with_latents: bool) -> SelfNPOBatch | None:
    """Encode captions (and images) of a micro-batch; the unconditional branch shares the SDXL time ids."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    n = len(items)
    cond = family.encode_prompts([it["caption"] for it in items])
    size = (resolution, resolution)
    originals = [it.get("original_size", size) for it in items]
    crops = [it.get("crop_top_left", (0, 0)) for it in items]
    time_ids = family.time_ids(originals, crops, size)
    if time_ids is not None:
        cond = cond.replace(time_ids=time_ids.to(family.device))
    uncond = uncond1.repeat(n).replace(time_ids=cond.time_ids)
    latents = None
    if with_latents:
        pixels = torch.stack([it["pixels"] for it in items]).to(family.device)
        latents = family.encode_images(pixels)
    return SelfNPOBatch(cond, uncond, latents)


def train_selfnpo(cfg: TrainConfig) -> Path:
    """Run one Self-NPO job described by ``cfg`` (``method: selfnpo``); returns the output folder."""
    if cfg.method != "selfnpo":
        raise UserError(f"train_selfnpo needs method=selfnpo, got {cfg.method}")
    run = start_run(cfg)
    accelerator, out, family, resolution = run.accelerator, run.out, run.family, run.resolution
    rank, world, main, log = run.rank, run.world, run.main, run.log
    if cfg.ddim_grid > family.num_train_timesteps:
        raise UserError(f"ddim_grid={cfg.ddim_grid} exceeds the model's {family.num_train_timesteps} timesteps")

    lora = cfg.train_mode == "lora"
    if lora:
        family.add_lora(cfg.rank, cfg.lora_alpha, tuple(cfg.lora_target_modules), dropout=cfg.lora_dropout)
    else:
        family.enable_full_finetune()
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing()
    family.unet.train()
    named = {n: p for n, p in family.unet.named_parameters() if p.requires_grad}
    # Initialised at the base model: a zero-B LoRA, or a copy of the not-yet-trained UNet.
    teacher = EmaTeacher(family.unet, named, cfg.teacher_ema_decay, separate_copy=not lora)

    with accelerator.main_process_first():  # dataset files are prepared once, then read by the others
        items, data, data_summary = _load_data(cfg, resolution)
    stream = make_stream(items, cfg, rank, world, lambda: data_summary)
    with torch.no_grad():
        uncond1 = family.unconditional(1)

    optimizer, lr_scheduler = make_optimizer(cfg, list(named.values()), world)
    check_disk_for_checkpoints(out, list(named.values()), ema=True, cfg=cfg, log=log)  # the teacher is saved too

    unet, optimizer = accelerator.prepare(family.unet, optimizer)
    family.unet = unet
    base_unet = accelerator.unwrap_model(unet)
    recipe = SelfNPORecipe(family, teacher, start=cfg.selfnpo_start, guidance=cfg.teacher_guidance,
                           grid_steps=cfg.ddim_grid, teacher_steps=cfg.teacher_steps, loss=cfg.selfnpo_loss,
                           huber_c=cfg.huber_c,
                           latent_shape=family.latent_shape(cfg.resolution),  # video: (F', C, H', W')
                           shard=(rank, world),  # draws cover the global batch: same weights on any process count
                           start_range=cfg.selfnpo_start_range)

    started, counts = time.time(), {"skipped_micro_batches": 0}

    def report(status: str) -> dict:
        return {"status": status, "steps": step, "seconds": round(time.time() - started, 1), **counts,
                **boundary.nonfinite.state(), "data": data if isinstance(data, dict) else data.report()}

    def save(at: int) -> Path:
        return save_checkpoint(out, at, weights=named, optimizer=optimizer, lr_scheduler=lr_scheduler,
                               ema=teacher.state_dict(), extra=boundary.checkpoint_extra(**counts),
                               total_limit=cfg.checkpoints_total_limit)

    boundary = StepBoundary(cfg, out=out, accelerator=accelerator, main=main, log=log, what="selfnpo",
                            hint="lower learning_rate", save=save, report=report)
    step = 0
    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    if resume is not None:
        if not (resume / "ema.safetensors").is_file():
            raise UserError(f"checkpoint '{resume}' has no teacher EMA (ema.safetensors): it was not written by a "
                            "selfnpo run")
        state = load_checkpoint(resume, params=named, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                ema=teacher.state_dict(), method="selfnpo")
        step = state["global_step"]
        boundary.nonfinite.restore(state)
        counts["skipped_micro_batches"] = int(state.get("skipped_micro_batches", 0))
        log(f"resumed from {resume} at step {step}")
    if main:
        open_run_log(cfg, out, accelerator, step, report("running"))
        log(f"selfnpo ({cfg.selfnpo_start} start, {cfg.selfnpo_start_range} start range, K={cfg.teacher_steps} on "
            f"a {cfg.ddim_grid}-step grid, "
            f"w={cfg.teacher_guidance:g}) on {data_summary}; {world} process(es) x batch {cfg.train_batch_size} x "
            f"accumulation {cfg.gradient_accumulation_steps}")

    ga = cfg.gradient_accumulation_steps
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="train selfnpo", unit="step", disable=not main)
    with boundary.signals, contextlib.closing(stream):  # closing: the loading threads stop on any exit
        while step < cfg.max_train_steps:
            sums: dict[str, float] = {}
            for micro in range(ga):
                gen = _step_generator(cfg.seed, step, micro, 0)  # one generator on every process (see shard)
                with torch.no_grad():
                    batch = make_batch(stream.get(step * ga + micro), family, resolution, uncond1,
                                       with_latents=cfg.selfnpo_start == "images")
                if skip_micro_batch(accelerator, batch is None, step, micro, log):
                    counts["skipped_micro_batches"] += 1
                    continue
                backward_micro_batch(accelerator, unet, lambda: recipe(batch, gen), micro=micro, ga=ga, sums=sums)
            skipped, stop = optimizer_step(accelerator, list(named.values()), optimizer, lr_scheduler,
                                           cfg.max_grad_norm, sums, stop_requested=boundary.signals.received is not None)
            if skipped is None:  # a skipped update leaves the teacher where it was too
                teacher.update(named)
            step += 1
            boundary.end_step(step, skipped, stop, sums, bar)
            if main and cfg.validation_prompts and cfg.validation_steps and step % cfg.validation_steps == 0:
                _validate(cfg, family, base_unet, None, out, step, accelerator)
            accelerator.wait_for_everyone()
    bar.close()

    if main:
        family.unet = base_unet
        if lora:
            family.save_lora(out)
        else:
            base_unet.save_pretrained(out / "unet")
        if cfg.validation_prompts:
            _validate(cfg, family, base_unet, None, out, step, accelerator)
        write_selfnpo_model_card(cfg, out, resolution=resolution, family=family.name, data_summary=data_summary)
        write_train_report(out, report("finished"))
        log(f"saved to {out}")
    accelerator.end_training()
    return out


def write_selfnpo_model_card(cfg: TrainConfig, out: Path, *, resolution: int, family: str, data_summary: str) -> Path:
    """README.md saying what the weights are: a NEGATIVE model, for the negative branch of CFG only."""
    from ..toy.paths import resolve_model

    lora = cfg.train_mode == "lora"
    base = cfg.pretrained_model_name_or_path
    loadable = resolve_model(base)  # 'toy' -> the shipped folder, so the snippet runs as written
    grids = sorted((out / "validation").glob("step-*.png")) if (out / "validation").is_dir() else []
    load = (f'neg.load_lora_weights("{out}")  # reads pytorch_lora_weights.safetensors: theta_base + delta'
            if lora else f'neg.unet = UNet2DConditionModel.from_pretrained("{out}/unet")  # theta_base + delta')
    huber = f" (c = {cfg.huber_c:g})" if cfg.selfnpo_loss == "pseudo_huber" else ""
    start = ("pure noise and prompts only (data-free)" if cfg.selfnpo_start == "noise"
             else "noised latents of real images")
    start_range = ("official: any grid point, the teacher's steps clipped at t = 0"
                   if cfg.selfnpo_start_range == "official"
                   else f"interior: the top {cfg.ddim_grid - cfg.teacher_steps} grid points, always "
                        f"{cfg.teacher_steps} full steps")
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {base}",
        f"tags: [diffalign, selfnpo, negative-model, {'lora' if lora else 'full-finetune'}]",
        "---",
        f"# Self-NPO negative {'LoRA' if lora else 'UNet'} for {base}",
        "",
        "This is a **NEGATIVE model** (Self-NPO, Wang et al. 2025), trained with diffalign. Use it only in the "
        "unconditional / negative branch of classifier-free guidance, never as the positive model:",
        "",
        "    eps = eps_neg(x, t, c_neg) + g * (eps_pos(x, t, c) - eps_neg(x, t, c_neg))",
        "",
        "with the negative weights composed as `theta_neg = theta_base + alpha*eta + beta*delta` (`delta` = these "
        "weights minus the base, `eta` = an optional positive offset such as a preference LoRA; defaults "
        "alpha = beta = 1). A negative prompt, if any, goes to the negative model.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base}` ({family}) |",
        f"| method | selfnpo: student regressed onto an EMA teacher's {cfg.teacher_steps}-step DDIM x0 estimate "
        f"({cfg.ddim_grid}-step grid, guidance w = {cfg.teacher_guidance:g}) |",
        f"| trajectories start from | {start} |",
        f"| start range | {start_range} |",
        f"| teacher EMA decay | {cfg.teacher_ema_decay:g} |",
        f"| loss | {cfg.selfnpo_loss}{huber} |",
        f"| {'LoRA rank' if lora else 'trained'} | {cfg.rank if lora else 'full UNet'} |",
        f"| data | {data_summary} |",
        f"| steps | {cfg.max_train_steps} x batch {cfg.train_batch_size} x accumulation "
        f"{cfg.gradient_accumulation_steps} |",
        f"| learning rate | {cfg.learning_rate:g} ({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}) |",
        f"| resolution | {resolution} |",
        "",
        "## Use (negative branch only)",
        "",
        "```python",
        "from diffusers import DiffusionPipeline" + ("" if lora else ", UNet2DConditionModel"),
        f'pipe = DiffusionPipeline.from_pretrained("{loadable}")  # the positive model',
        f'neg = DiffusionPipeline.from_pretrained("{loadable}")   # becomes the negative model',
        load,
        "# at every sampling step: eps = eps_neg + g * (eps_pos - eps_neg),",
        "# eps_pos from pipe.unet with the prompt, eps_neg from neg.unet with the negative prompt ('' if none)",
        "```",
    ]
    if grids:
        lines += ["", "## Validation", "",
                  "Samples of the negative model itself as the positive model (top row; expected to look worse) and "
                  "of the base (bottom row, LoRA only), same prompts and seeds.", "",
                  f"![validation]({grids[-1].relative_to(out)})"]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["make_batch", "train_selfnpo", "write_selfnpo_model_card"]
