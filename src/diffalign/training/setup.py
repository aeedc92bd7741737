"""What the training loop does first: check the config, open the run folder, start accelerate, load
the model family with its frozen parts frozen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..fsutil import ensure_writable_dir
from ..models import load_family
from ..processes import check_joined, cpu_process_group
from .batches import BatchStream
from .checkpoint import list_checkpoints, read_state, remove_incomplete, resolve_resume
from .resume_config import record_changes, resume_changes
from .sharding import Sharder, check_supported, requested_plan


@dataclass
class Run:
    accelerator: object
    out: Path
    family: object
    resolution: int
    rank: int
    world: int
    main: bool
    log: Callable[[str], None]
    sharder: object = None  # a sharding.Sharder when the launch asked for FSDP (configs/accelerate/fsdp.yaml)


def frozen_weight_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype weights that are never trained are stored in, as the diffusers training scripts do: the text
    encoders, the VAE (kept float32 when its config asks for `force_upcast`, as SDXL's does), the UNet under
    a LoRA and the DPO reference copy of a full fine-tune. Trained weights (LoRA, a fully fine-tuned UNet, the
    EMA and the Self-NPO teacher) stay float32. Halves the frozen weights' memory under fp16/bf16
    (CogVideoX-5b's T5-XXL: 19 GB -> 9.5 GB)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(mixed_precision), torch.float32)


# The package each tracker needs, and how to install it.
_TRACKER_PACKAGES = {"wandb": ("wandb", "pip install wandb"), "tensorboard": ("tensorboard", "pip install tensorboard")}


def check_tracker(report_to: str | None) -> None:
    """Stop before the model loads when the chosen tracker's package is missing (accelerate would log nothing
    and say nothing)."""
    import importlib.util

    if report_to is None:
        return
    module, install = _TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"report_to: {report_to} needs the {module} package, which is not installed: {install} "
                        "(or set report_to: tensorboard / none)")


def start_run(cfg) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    cfg.validate()
    out = ensure_writable_dir(cfg.output_dir, flag="--output_dir")
    check_run_folder(cfg, out)
    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    changes = resume_changes(cfg, out, resume)  # refuses a changed model, method, LoRA shape or data
    report_to = None if cfg.report_to in (None, "none") else cfg.report_to
    check_tracker(report_to)
    plan = requested_plan()  # FSDP asked by the launcher: taken from accelerate, applied by diffalign (sharding.py)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / (cfg.logging_dir or "logs"))),
        cpu=cpu_process_group(),
    )
    check_joined(accelerator.num_processes, "every process would train alone and write the same folder")
    check_distributed_type(str(accelerator.distributed_type))
    main = accelerator.is_main_process
    sharder = None
    if plan is not None and accelerator.num_processes > 1:
        check_supported(cfg, accelerator)
        sharder = Sharder(plan, accelerator.device, accelerator.num_processes)
    elif plan is not None:
        print("FSDP asked with 1 process: nothing to shard, training as a single process", flush=True)
    if main:
        record_changes(out, changes, int(read_state(resume).get("global_step", 0)) if changes else 0,
                       lambda msg: print(msg, flush=True))
        removed, ignored = remove_incomplete(out)  # half-written or half-deleted by a killed run
        for p in removed:
            print(f"removed {p.name}: a checkpoint write or deletion that was interrupted", flush=True)
        for p in ignored:
            print(f"warning: {p} is not a complete checkpoint (a file is missing or truncated): it is ignored; "
                  "delete it or copy it again", flush=True)
    family = load_family(cfg.pretrained_model_name_or_path,
                         pretrained_vae_model_name_or_path=cfg.pretrained_vae_model_name_or_path,
                         dtype=frozen_weight_dtype(accelerator.mixed_precision))
    # Sharded: the trained network stays in CPU memory until it is sharded; fully_shard moves each process's
    # part to the device, so no GPU ever holds the whole network (or its reference/teacher copies).
    for module in (family.vae, *family.text_encoders) if sharder is not None else (family,):
        module.to(accelerator.device)
    apply_flow_settings(cfg, family)
    for module in (family.vae, *family.text_encoders):
        module.requires_grad_(False).eval()
    set_seed(cfg.seed)  # LoRA initialisation is reproducible from the seed
    return Run(accelerator, out, family, cfg.resolution or family.default_resolution, accelerator.process_index,
               accelerator.num_processes, main, (lambda msg: print(msg, flush=True)) if main else (lambda msg: None),
               sharder)


def apply_flow_settings(cfg, family) -> None:
    """The FLUX-dev training guidance (`guidance_scale`); refused for a model without guidance embeddings."""
    if getattr(family, "guidance_embeds", False):
        family.training_guidance = float(cfg.guidance_scale)
    elif cfg.guidance_scale != 1.0:
        raise UserError(f"guidance_scale={cfg.guidance_scale:g} applies to a transformer with guidance embeddings "
                        f"(FLUX-dev); the {family.name} model has none: remove it")


def make_stream(items, cfg, rank: int, world: int, describe: Callable[[], str]):
    """The BatchStream over `items`, or a UserError saying why there is not even one batch of usable rows."""
    if getattr(items, "streaming", False):  # streaming=true: batches in stream order (data/streaming.py)
        return items.batches(cfg.train_batch_size, rank, world, workers=cfg.dataloader_num_workers)
    try:
        return BatchStream(items, cfg.train_batch_size, cfg.seed, rank, world, workers=cfg.dataloader_num_workers)
    except ValueError as exc:
        raise UserError(f"{exc}: nothing to train on ({describe()}); fix the data (the counts say what was skipped "
                        "and why) or lower train_batch_size") from None


def check_run_folder(cfg, out: Path) -> None:
    """A fresh run (no resume_from_checkpoint) must not start in a folder holding another run's checkpoints:
    a later `resume_from_checkpoint: latest` would mix the two runs."""
    found = list_checkpoints(out)
    if found and not cfg.resume_from_checkpoint:
        raise UserError(f"output_dir '{out}' already holds checkpoints of an earlier run (newest: {found[-1].name}): "
                        "pass --resume_from_checkpoint=latest to continue it, or choose a new output_dir")
    named = cfg.resume_from_checkpoint not in (None, "", "latest")  # a named checkpoint is checked by itself
    if not found and not named and not cfg.overwrite_output_dir and _finished(out):
        raise UserError(f"output_dir '{out}' holds a finished run (train_report.json says finished) and no checkpoint "
                        "to resume from: a new run would replace its weights and metrics; choose a new output_dir, "
                        "or pass --overwrite_output_dir=true to replace it")


def _finished(out: Path) -> bool:
    import json

    try:
        return json.loads((out / "train_report.json").read_text(encoding="utf-8")).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def check_distributed_type(kind: str) -> None:
    """Stop under DeepSpeed (or accelerate's own FSDP wrapping), which this loop does not use, before any work.

    Sharded training is FSDP2 applied by diffalign itself (sharding.py): launched with configs/accelerate/fsdp.yaml,
    accelerate runs as plain multi-process and never reports FSDP. DeepSpeed would take over accumulation,
    clipping and the optimizer step (the NaN guard could not skip an update) and split states diffalign's
    checkpoints could not save.
    """
    name = kind.rsplit(".", 1)[-1]
    if name in ("FSDP", "DEEPSPEED"):
        raise UserError(f"distributed_type {name} (from the accelerate config) is not supported by diffalign train: "
                        "for sharded full fine-tuning launch with configs/accelerate/fsdp.yaml (FSDP2, applied by "
                        "diffalign), otherwise with configs/accelerate/ddp.yaml; docs/scaling.md explains")
