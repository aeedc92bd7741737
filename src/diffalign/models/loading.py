"""Find the family of a model and load it: as a training adapter (`load_family`) or a stock pipeline.

Family detection reads `_class_name` from `model_index.json`, the one field every diffusers pipeline folder
has, so a user never has to say "this is SDXL" for standard checkpoints; `family=` overrides it for pipelines
saved under another class name (e.g. an img2img variant with the same components).
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError
from .base import ModelFamily
from .cogvideox import CogVideoXFamily
from .flux import FluxFamily
from .sd import SDFamily
from .sd3 import SD3Family
from .sdxl import SDXLFamily
from .source import VaeRequest, first_line, resolve_source

#: Family name -> adapter class; None marks a family that has a name but no adapter yet.
FAMILIES: dict[str, type[ModelFamily] | None] = {"sd": SDFamily, "sdxl": SDXLFamily, "cogvideox": CogVideoXFamily,
                                                 "sd3": SD3Family, "flux": FluxFamily}

#: diffusers pipeline class (model_index.json `_class_name`) -> family name.
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "CogVideoXPipeline": "cogvideox",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def family_class(name: str) -> type[ModelFamily]:
    """The adapter class for a family name; `UserError` for unknown or not-yet-implemented families."""
    key = str(name).strip().lower()
    if key not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    cls = FAMILIES[key]
    if cls is None:
        ready = ", ".join(k for k, v in FAMILIES.items() if v is not None)
        raise UserError(f"model family {key!r} is not implemented yet; available now: {ready}")
    return cls


def detect_family(pretrained_model_name_or_path: str | os.PathLike) -> str:
    """The family name of a pipeline folder or hub id, from model_index.json `_class_name`."""
    source = resolve_source(pretrained_model_name_or_path)
    family = PIPELINE_FAMILIES.get(source.class_name)
    if family is None:
        known = ", ".join(f"{c} ({f})" for c, f in PIPELINE_FAMILIES.items())
        raise UserError(
            f"{source.path!r} is a {source.class_name or 'pipeline without _class_name'}, not one diffalign detects "
            f"({known}); pass family= explicitly if its components match one of them"
        )
    return family


def load_family(
    pretrained_model_name_or_path: str | os.PathLike, family: str | None = None, **kwargs
) -> ModelFamily:
    """Load the training adapter for a model; the family is detected unless given. kwargs: see from_pretrained."""
    cls = family_class(family if family is not None else detect_family(pretrained_model_name_or_path))
    return cls.from_pretrained(pretrained_model_name_or_path, **kwargs)


# Short scheduler names users type, and the diffusers class each stands for (any class name works too).
SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "dpm++_sde": "DPMSolverSDEScheduler", "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler for `name` (a short name of SCHEDULERS or a diffusers scheduler class name),
    built from the current scheduler's config as diffusers recommends."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)} or a diffusers scheduler "
                        "class name (e.g. DPMSolverMultistepScheduler)")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    vae_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    variant: str | None = None,
    scheduler: str | None = None,
):
    """A stock diffusers pipeline for generation (`DiffusionPipeline.from_pretrained`, no remote code), in
    `dtype` on `device`, from the weight files of `variant` (e.g. fp16) if given, with `scheduler` if given."""
    from diffusers import DiffusionPipeline

    source = resolve_source(pretrained_model_name_or_path)
    kwargs = dict(dtype=dtype, local_files_only=source.local_files_only)
    if variant is not None:
        kwargs["variant"] = variant
    if vae_path is not None:
        kwargs["vae"] = VaeRequest(vae_path).load(dtype)
    check_pipeline_class(source.path)
    try:
        pipe = DiffusionPipeline.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load pipeline {source.path!r}: {first_line(exc)}") from exc
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe.to(device)


def check_pipeline_class(path: str) -> None:
    """A local pipeline folder must name one of diffusers' own pipeline classes in model_index.json: a custom class
    would need its code (never run: no remote or custom code) and failed with an AttributeError traceback."""
    import json
    from pathlib import Path

    index = Path(path) / "model_index.json"
    if not index.is_file():
        return
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{index} is not a readable model index ({first_line(exc)}); restore the pipeline "
                        "folder") from None
    import diffusers

    if not isinstance(name, str) or not name.isidentifier() or not hasattr(diffusers, name):
        raise UserError(f"{index} names the pipeline class {name!r}, which is not one of diffusers' own pipelines; "
                        "diffalign runs no custom pipeline code: use a diffusers pipeline folder (e.g. "
                        "StableDiffusionPipeline)")
