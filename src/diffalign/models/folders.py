"""Which folder holds a whole denoiser: `unet/` (SD, SDXL) or `transformer/` (SD3, FLUX, CogVideoX).

A full fine-tune writes its network where a diffusers pipeline folder keeps it, under the family's component name
(`ModelFamily.denoiser_name`), so `<DenoiserClass>.from_pretrained(run, subfolder=name)` finds it; with an EMA the
EMA weights are in `name/` and the trained ones in `name_raw/`. Everything that takes a run folder, one of its
`checkpoint-N` folders or a pipeline folder and wants the whole network asks :func:`denoiser_folder` which of the
two it holds, and :func:`load_denoiser` loads it with the class its config.json names. Transformer runs written by
earlier versions, which put every family's network in `unet/`, are still found there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError
from .source import first_line

#: The component names a whole denoiser is saved under. `transformer` first: a transformer run folder that an older
#: diffalign had filled with `unet/` and a newer run replaced (overwrite_output_dir) holds the new one there.
DENOISER_FOLDERS: tuple[str, ...] = ("transformer", "unet")
#: Beside an EMA in `name/`: the trained weights (use_ema).
RAW_SUFFIX = "_raw"
#: Classes a denoiser folder's config.json may name (diffusers' own, loaded with from_pretrained: no custom code):
#: every model family's `denoiser_class`, written here because the families import this module
#: (tests/test_flow.py checks that the two agree).
DENOISER_CLASSES: tuple[str, ...] = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
                                     "CogVideoXTransformer3DModel")


def raw_folder(name: str) -> str:
    """`unet_raw` / `transformer_raw`: the trained weights of a full fine-tune with use_ema (`name/` is the EMA)."""
    return f"{name}{RAW_SUFFIX}"


def shown(name: str) -> str:
    """The denoiser as messages name it: 'UNet' or 'transformer'."""
    return "UNet" if name == "unet" else name


def denoiser_folder(path: str | os.PathLike) -> str | None:
    """'unet' or 'transformer': the subfolder of `path` (a run folder, a checkpoint-N folder, a pipeline folder)
    that holds a whole denoiser (its config.json); None when it holds neither."""
    p = Path(os.fspath(path)).expanduser()
    return next((name for name in DENOISER_FOLDERS if (p / name / "config.json").is_file()), None)


def weight_patterns() -> list[str]:
    """Upload patterns of the whole-network weights a run or checkpoint folder may hold (any family, EMA or not)."""
    return [f"{folder}/*" for name in DENOISER_FOLDERS for folder in (name, raw_folder(name))]


def _class_name(folder: Path) -> str:
    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return name if isinstance(name, str) else ""


def locate_denoiser(path: str | os.PathLike) -> tuple[str, str | None, str] | None:
    """(folder, subfolder, class name) of the whole denoiser `path` is or holds: a denoiser folder itself (config.json
    of a UNet or transformer class), or a folder with `unet/` or `transformer/`; None otherwise."""
    p = Path(os.fspath(path)).expanduser()
    own = _class_name(p) if (p / "config.json").is_file() else ""
    if "UNet" in own or "Transformer" in own:
        return str(p), None, own
    sub = denoiser_folder(p)
    if sub is None:
        return None
    return str(p), sub, _class_name(p / sub) or "UNet2DConditionModel"


def load_denoiser(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """The whole denoiser `path` is or holds (see :func:`locate_denoiser`), with the diffusers class its config.json
    names: a UNet2DConditionModel, or the transformer of SD3 / FLUX / CogVideoX."""
    import diffusers

    where = locate_denoiser(path)
    if where is None:
        raise UserError(f"{os.fspath(path)!r} is not a UNet or transformer folder, nor a folder with unet/ or "
                        "transformer/ (a pipeline, the run folder of a full fine-tune or one of its checkpoint-N "
                        "folders)")
    folder, sub, name = where
    if name not in DENOISER_CLASSES:
        raise UserError(f"{os.path.join(folder, sub or '')!r} holds a {name or 'model without _class_name'}, not a "
                        f"denoiser diffalign loads ({', '.join(DENOISER_CLASSES)})")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return getattr(diffusers, name).from_pretrained(folder, subfolder=sub, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the {name} of {os.fspath(path)!r}: {first_line(exc)}") from exc


__all__ = ["DENOISER_CLASSES", "DENOISER_FOLDERS", "denoiser_folder", "load_denoiser", "locate_denoiser",
           "raw_folder", "shown", "weight_patterns"]
