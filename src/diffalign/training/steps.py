"""The parts of one optimizer step, for every method: a micro-batch's forward and backward
(DDP sync only on the last micro-batch), the optimizer update (skipped on a non-finite loss or gradient, see
guards.py). The step's records are written by run_log.py."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import UserError
from .guards import agree, grads_finite
from .sharding import clip_grad_norm

if TYPE_CHECKING:
    from accelerate import Accelerator


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
            raise UserError("use_8bit_adam needs bitsandbytes: pip install 'diffalign[bnb]' (or set "
                            "use_8bit_adam=false)") from None
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        # Fused AdamW (one kernel for all weights) on CUDA. On the CPU torch 2.13 has it too, but its updates differ
        # from the default's in the last bits (measured: up to 6e-8 after 5 steps), so CPU runs keep the default and
        # stay byte-identical to earlier runs.
        if _all_cuda(params):
            kwargs["fused"] = True
        optimizer = torch.optim.AdamW(params, **kwargs)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles,
                                 power=cfg.lr_power)
    return optimizer, lr_scheduler


def _all_cuda(params: list) -> bool:
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


def backward_micro_batch(accelerator: Accelerator, unet, forward: Callable, *, micro: int, ga: int, sums: dict):
    """Run `forward()` (-> StepResult) for micro-batch `micro` of `ga`, backpropagate loss/ga, add to `sums`."""
    # DDP: gradients are all-reduced only on the last micro-batch of an optimizer step.
    with (accelerator.no_sync(unet) if micro < ga - 1 else contextlib.nullcontext()):
        with accelerator.autocast():
            result = forward()
            loss = result.losses.mean()
        accelerator.backward(loss / ga)
    # Summed on the device: a .item() per micro-batch would stall a GPU's queue every time (issue 8).
    sums["loss"] = sums.get("loss", 0.0) + loss.detach() / ga
    for k, v in result.metrics.items():
        sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / ga
    if micro == ga - 1:
        # A non-finite loss is not raised here: optimizer_step skips the update. It reads the loss averaged
        # over processes, so every process decides the same (guards.py).
        sums_to_host(accelerator, sums)
    return result


def skip_micro_batch(accelerator: Accelerator, empty: bool, step: int, micro: int, log) -> bool:
    """True when this micro-batch is to be skipped on every process: some process has no usable row in it (all
    its images failed to decode). The processes must agree: one that skipped alone would leave the others in the
    gradient all-reduce (a hang; gloo aborts the job). The other processes' rows of that micro-batch are dropped
    with it (counted in `skipped_micro_batches`). One tiny collective per micro-batch, with several processes only.
    """
    skip = agree(accelerator, empty)[0]
    if skip and accelerator.num_processes > 1 and accelerator.is_main_process:
        log(f"warning: step {step + 1}, micro-batch {micro}: a process has no usable row (images that failed to "
            "decode); every process skips this micro-batch")
    return skip


def sums_to_host(accelerator: Accelerator, sums: dict) -> None:
    """Replace the step's sums (device tensors or floats) by floats averaged over all processes, in place:
    one host sync and one all-reduce per optimizer step, so the logged loss is the global batch's."""
    keys = sorted(sums)
    if not keys:
        return
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(accelerator.device).reshape(())
                          for k in keys])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    sums.update(zip(keys, values.tolist()))


def add_count(sums: dict, key: str, count: int, world: int) -> None:
    """Add this process's ``count`` to the step's ``sums[key]`` so that the logged value is the GLOBAL batch's
    total: :func:`sums_to_host` averages every key over the ``world`` processes, hence ``world x count``. Call it
    before the micro-batch's :func:`backward_micro_batch` (the last one reduces the sums)."""
    sums[key] = sums.get(key, 0.0) + float(count * world)


def optimizer_step(accelerator: Accelerator, params: list, optimizer, lr_scheduler, max_grad_norm, sums: dict,
                   stop_requested: bool = False, sharded: bool = False) -> tuple[str | None, bool]:
    """Clip, step, schedule, zero; records lr and grad_norm in `sums`.

    Returns (skipped, stop): `skipped` is None, "loss" or "gradient" when a non-finite value made this update
    be skipped (weights, optimizer state and LR schedule untouched), or "fp16_overflow" for GradScaler's own
    skip; `stop` is `stop_requested` agreed over all processes (a signal reached any of them). `sharded`: the
    parameters are FSDP2-sharded (sharding.py), clipped on the norm over every process's shards.
    """
    if any(torch.is_tensor(v) for v in sums.values()):  # the last micro-batch was skipped (no usable rows)
        sums_to_host(accelerator, sums)
    if not max_grad_norm:
        grad_norm = None
    elif sharded:
        grad_norm = clip_grad_norm(params, max_grad_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    grad_bad = not math.isfinite(float(grad_norm)) if grad_norm is not None else not grads_finite(params)
    loss_bad = not math.isfinite(sums.get("loss", 0.0))  # already averaged over processes: the same everywhere
    grad_bad, stop = agree(accelerator, grad_bad, stop_requested)
    skipped = "loss" if loss_bad else "gradient" if grad_bad else None
    if getattr(accelerator, "scaler", None) is not None and skipped:
        # fp16: GradScaler must see every step (it skips inf/nan gradients itself and lowers its scale).
        if not grad_bad:
            optimizer.zero_grad(set_to_none=True)  # a bad loss with finite gradients: give AdamW nothing to apply
        optimizer.step()
        skipped = "loss" if loss_bad else "fp16_overflow"
    elif skipped is None:
        optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums["lr"] = lr_scheduler.get_last_lr()[0]
    if grad_norm is not None:
        sums["grad_norm"] = float(grad_norm)
    return skipped, stop
