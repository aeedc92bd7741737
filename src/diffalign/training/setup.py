"""What every training loop does first: check the config, open the run folder, start accelerate, load
the model family with its frozen parts frozen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..fsutil import ensure_writable_dir
from ..models import load_family


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


def start_run(cfg) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from ..toy.paths import resolve_model

    cfg.validate()
    out = ensure_writable_dir(cfg.output_dir)
    report_to = None if cfg.report_to in (None, "none") else cfg.report_to
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / (cfg.logging_dir or "logs"))),
    )
    main = accelerator.is_main_process
    family = load_family(resolve_model(cfg.pretrained_model_name_or_path),
                         pretrained_vae_model_name_or_path=cfg.pretrained_vae_model_name_or_path)
    family.to(accelerator.device)
    for module in (family.vae, *family.text_encoders):
        module.requires_grad_(False).eval()
    set_seed(cfg.seed)  # LoRA initialisation is reproducible from the seed
    return Run(accelerator, out, family, cfg.resolution or family.default_resolution, accelerator.process_index,
               accelerator.num_processes, main, (lambda msg: print(msg, flush=True)) if main else (lambda msg: None))
