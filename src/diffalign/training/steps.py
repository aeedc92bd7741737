"""The parts of one optimizer step that every training loop shares: a micro-batch's forward and backward
(DDP sync only on the last micro-batch, NaN stop), the optimizer update, and logging the step."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError


def make_optimizer(cfg, params: list, num_processes: int):
    """AdamW (8-bit when asked and bitsandbytes is installed) at the (scale_lr-scaled) learning rate, and its
    LR schedule; the scheduler is stepped once per optimizer step, whatever the number of processes."""
    from diffusers.optimization import get_scheduler

    kwargs = dict(lr=cfg.scaled_learning_rate(num_processes), betas=(cfg.adam_beta1, cfg.adam_beta2),
                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("use_8bit_adam needs bitsandbytes: pip install 'diffalign[bnb]' (or set use_8bit_adam=false)") from None
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **kwargs)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles,
                                 power=cfg.lr_power)
    return optimizer, lr_scheduler


def backward_micro_batch(accelerator, unet, forward: Callable, *, micro: int, ga: int, step: int, sums: dict,
                         what: str, hint: str, out: Path):
    """Run `forward()` (-> StepResult) for micro-batch `micro` of `ga`, backpropagate loss/ga, add to `sums`."""
    # DDP: gradients are all-reduced only on the last micro-batch of an optimizer step.
    with (accelerator.no_sync(unet) if micro < ga - 1 else contextlib.nullcontext()):
        with accelerator.autocast():
            result = forward()
            loss = result.losses.mean()
        if not torch.isfinite(loss):
            raise UserError(f"the {what} loss became {loss.item()} at step {step} (micro-batch {micro}); {hint}, "
                            f"or train in full precision (mixed_precision=no); the last good checkpoint is in {out}")
        accelerator.backward(loss / ga)
    sums["loss"] = sums.get("loss", 0.0) + loss.item() / ga
    for k, v in result.metrics.items():
        sums[k] = sums.get(k, 0.0) + v / ga
    return result


def optimizer_step(accelerator, params: list, optimizer, lr_scheduler, max_grad_norm, sums: dict) -> None:
    """Clip, step, schedule, zero; records lr and grad_norm in `sums`."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums["lr"] = lr_scheduler.get_last_lr()[0]
    if grad_norm is not None:
        sums["grad_norm"] = float(grad_norm)


def log_step(accelerator, out: Path, main: bool, step: int, sums: dict, bar) -> None:
    """Trackers, plus metrics.jsonl in the run folder whatever tracker is configured, and the progress bar."""
    accelerator.log(sums, step=step)
    if main:
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in sums.items()}}) + "\n")
    bar.update(1)
    bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4g}")
