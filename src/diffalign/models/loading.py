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
from .sd import SDFamily
from .sdxl import SDXLFamily
from .source import VaeRequest, first_line, resolve_source

#: Family name -> adapter class; None marks a family that has a name but no adapter yet.
FAMILIES: dict[str, type[ModelFamily] | None] = {"sd": SDFamily, "sdxl": SDXLFamily, "cogvideox": CogVideoXFamily}

#: diffusers pipeline class (model_index.json `_class_name`) -> family name.
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "CogVideoXPipeline": "cogvideox",
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


def load_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    vae_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """A stock diffusers pipeline for generation (`DiffusionPipeline.from_pretrained`, no remote code)."""
    from diffusers import DiffusionPipeline

    source = resolve_source(pretrained_model_name_or_path)
    kwargs = dict(dtype=dtype, local_files_only=source.local_files_only)
    if vae_path is not None:
        kwargs["vae"] = VaeRequest(vae_path).load(dtype)
    check_pipeline_class(source.path)
    try:
        pipe = DiffusionPipeline.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load pipeline {source.path!r}: {first_line(exc)}") from exc
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
