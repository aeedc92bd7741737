"""LoRA on the UNet: add (peft), save in the format `pipe.load_lora_weights()` reads, load back, switch off.

Why the save path is fixed: `unet.save_lora_adapter()` writes keys without the `unet.` prefix, and
`pipe.load_lora_weights()` then matches nothing and only logs a warning, so a user would ship a LoRA that silently
does nothing. We save through `PipelineClass.save_lora_weights(unet_lora_layers=...)` as the diffusers training
scripts do, with the peft config as metadata so a non-default alpha survives the round trip. For the same reason
`load_lora_into_pipeline` checks that a load actually added an adapter and raises otherwise.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import UserError
from .folders import locate_denoiser
from .source import first_line, hub_offline

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def denoiser_component(pipeline_class) -> str:
    """'unet' (SD, SDXL) or 'transformer' (DiT pipelines such as CogVideoX): the LoRA key prefix and the keyword
    names of the pipeline class's save/load methods (`unet_lora_layers` vs `transformer_lora_layers`)."""
    modules = getattr(pipeline_class, "_lora_loadable_modules", None) or ["unet"]
    return "unet" if "unet" in modules else "transformer"


def has_lora(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_parameters(model: torch.nn.Module, adapter_name: str | None = None) -> list[torch.nn.Parameter]:
    """The LoRA weights of `model` (of one adapter when a name is given)."""
    out = []
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        if adapter_name is None or f".{adapter_name}." in f"{name}.":
            out.append(param)
    return out


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    adapter_name: str = "default",
    dropout: float = 0.0,
) -> None:
    """Freeze the UNet and add a peft LoRA whose weights are the only trainable parameters.

    `alpha` defaults to `rank` (scale 1), the diffusers scripts' choice. `init_lora_weights=True` makes B zero,
    so the model starts exactly at the base. LoRA weights of a half-precision UNet are kept in float32: the
    optimizer and grad scaler need float32 trainable parameters.
    """
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise UserError(f"the UNet already has a LoRA adapter named {adapter_name!r}; pick another adapter_name")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha) if alpha is not None else int(rank),
        lora_dropout=float(dropout),
        init_lora_weights=True,
        target_modules=list(target_modules),
    )
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as exc:
        raise UserError(f"cannot add LoRA to the UNet with target_modules={list(target_modules)}: {first_line(exc)}") from exc
    for param in lora_parameters(unet, adapter_name):
        param.requires_grad_(True)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def save_lora(unet: torch.nn.Module, pipeline_class, out_dir: str | os.PathLike, adapter_name: str = "default",
              state_dict: dict | None = None) -> Path:
    """Save one adapter as `out_dir/pytorch_lora_weights.safetensors` with `unet.`-prefixed diffusers keys
    (`transformer.` for a DiT pipeline class such as CogVideoXPipeline). `state_dict`: the UNet's weights to take
    the adapter from instead of its own (a sharded UNet's, gathered: training/sharding.py)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in (getattr(unet, "peft_config", None) or {}):
        raise UserError(f"the UNet has no LoRA adapter named {adapter_name!r}; call add_lora() or load_lora() first")
    state = get_peft_model_state_dict(unet, state_dict=state_dict, adapter_name=adapter_name)
    component = denoiser_component(pipeline_class)
    # UNet LoRAs use diffusers' `lora.down/up` names (the SD scripts' format); transformer LoRAs keep peft's
    # `lora_A/B`, the format diffusers' CogVideoX LoRA script writes and hub CogVideoX LoRAs use. diffusers renames
    # only the attention projections: a LoRA that also touches other layers (convs, feed-forward, embeddings) would
    # come out half renamed, and the loader, seeing peft keys, would then drop every renamed one without a word. So
    # such a LoRA keeps peft's names throughout, which `pipe.load_lora_weights` reads as they are.
    if component == "unet":
        converted = convert_state_dict_to_diffusers(state)
        if not any(".lora_A." in k or ".lora_B." in k for k in converted):
            state = converted
    layers = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(
        str(out),
        **{f"{component}_lora_layers": layers,
           f"{component}_lora_adapter_metadata": unet.peft_config[adapter_name].to_dict()},
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return out / LORA_WEIGHT_NAME


def _is_checkpoint(p: Path) -> bool:
    """A training checkpoint folder: its resume state is `trainable.safetensors`, or `sharded/` (FSDP runs)."""
    return (p / "state.json").is_file() and ((p / "trainable.safetensors").is_file() or (p / "sharded").is_dir())


def _full_weights(p: Path) -> str | None:
    """"its weights are the UNet in FOLDER (give it to ...), not a LoRA" when `p` holds the whole network of a full
    fine-tune; None otherwise."""
    where = locate_denoiser(p)
    if where is None or where[1] is None:
        return None
    _, sub, cls = where
    unet = "UNet" in cls
    use = (f"{'--negative-model, ' if unet else ''}extract-lora --tuned, or "
           f"{cls}.from_pretrained(..., subfolder={sub!r})")
    return f"its weights are the {'UNet' if unet else 'transformer'} in {p / sub} (give it to {use}), not a LoRA"


def _checkpoint_without_lora(p: Path, text: str) -> UserError:
    full = _full_weights(p)
    if full is not None:
        return UserError(f"{text!r} is a checkpoint of a full fine-tune: {full}")
    return UserError(f"{text!r} is a training checkpoint that holds only the resume state (trainable.safetensors, "
                     f"written before checkpoints also held {LORA_WEIGHT_NAME}): it can only be resumed from "
                     "(--resume_from_checkpoint), not loaded; pick a checkpoint written by this version")


def weights_step(path: str | os.PathLike | None) -> int | None:
    """The training step of weights from a diffalign run: N for `RUN/checkpoint-N` (or a file in it), the last step
    for a finished `RUN` folder (or a file in it); None for anything else."""
    import json

    if path is None:
        return None
    p = Path(os.fspath(path)).expanduser()
    folder = p.parent if p.is_file() else p
    for name, key in (("state.json", "global_step"), ("train_report.json", "steps")):
        try:
            info = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or (name == "train_report.json" and info.get("status") != "finished"):
            continue
        if isinstance(info.get(key), int):
            return info[key]
    return None


def step_record(**paths) -> dict[str, int]:
    """`{"lora_step": N, ...}` for the given weights paths that come from a diffalign run (a manifest records which
    step of a run made the images)."""
    return {f"{k}_step": step for k, path in paths.items() if (step := weights_step(path)) is not None}


def resolve_lora_file(path: str | os.PathLike) -> str:
    """A local LoRA file, or the one LoRA file in a folder (a run folder or any of its `checkpoint-N` folders);
    hub ids pass through when online."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_file():
        return str(p)
    if p.is_dir():
        if (p / LORA_WEIGHT_NAME).is_file():
            return str(p / LORA_WEIGHT_NAME)
        if _is_checkpoint(p):
            raise _checkpoint_without_lora(p, text)
        full = _full_weights(p)
        if full is not None and (p / "train_report.json").is_file():
            raise UserError(f"{text!r} is the run folder of a full fine-tune: {full}")
        candidates = sorted(f.name for f in p.glob("*.safetensors"))
        if len(candidates) == 1:
            return str(p / candidates[0])
        if not candidates:
            raise UserError(f"LoRA folder {text!r} has no {LORA_WEIGHT_NAME} (nor any .safetensors file)")
        raise UserError(f"LoRA folder {text!r} has several .safetensors files {candidates}; give the file itself")
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not hub_offline():
        return text
    raise UserError(f"LoRA file {text!r} does not exist; give the .safetensors file or the folder that holds it")


def _key_sample(path: str) -> str:
    """A few of the file's keys, for error messages that must say what was found."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception:
        return "(keys unreadable)"
    shown = ", ".join(repr(k) for k in keys[:3])
    return f"{len(keys)} keys, e.g. {shown}" if keys else "no keys"


def load_lora_into_unet(
    unet: torch.nn.Module,
    pipeline_class,
    path: str | os.PathLike,
    adapter_name: str = "default",
    trainable: bool = False,
) -> str:
    """Load a LoRA file (diffusers, peft or kohya format) into a bare UNet as adapter `adapter_name`.

    Uses the pipeline class's converters, so whatever `pipe.load_lora_weights` accepts works here. Raises
    `UserError` if none of the file's keys belong to the UNet.
    """
    file = resolve_lora_file(path)
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise UserError(f"the UNet already has a LoRA adapter named {adapter_name!r}; pick another adapter_name")
    component = denoiser_component(pipeline_class)
    try:
        if component == "unet":
            state_dict, alphas, metadata = pipeline_class.lora_state_dict(file, return_lora_metadata=True)
            pipeline_class.load_lora_into_unet(
                state_dict, network_alphas=alphas, unet=unet, adapter_name=adapter_name, metadata=metadata
            )
        else:  # DiT mixins return no network alphas (the alpha travels in the metadata)
            import inspect

            state_dict, metadata = pipeline_class.lora_state_dict(file, return_lora_metadata=True)
            extra = {}  # FLUX's loader also takes kohya-style network alphas (none in a diffusers/peft file)
            if "network_alphas" in inspect.signature(pipeline_class.load_lora_into_transformer).parameters:
                extra["network_alphas"] = None
            pipeline_class.load_lora_into_transformer(
                state_dict, transformer=unet, adapter_name=adapter_name, metadata=metadata, **extra
            )
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"cannot load LoRA {file!r} into the UNet: {first_line(exc)} ({_key_sample(file)})") from exc
    if adapter_name not in (getattr(unet, "peft_config", None) or {}):
        raise UserError(
            f"LoRA {file!r} has no weights for this {'UNet' if component == 'unet' else component} "
            f"({_key_sample(file)}); "
            f"expected diffusers keys starting with '{component}.'"
            + (" (or a kohya file with 'lora_unet_' keys)" if component == "unet" else "")
        )
    from .lora_check import check_adapter_loaded

    check_adapter_loaded({component: unet}, adapter_name, file, pipeline_class)
    for param in lora_parameters(unet, adapter_name):
        param.requires_grad_(trainable)
    return adapter_name


def load_lora_into_pipeline(pipe: DiffusionPipeline, path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """`pipe.load_lora_weights(path)` for generation, but failing loudly when nothing was loaded.

    diffusers only logs a warning when no key of the file matches the pipeline's modules (e.g. a LoRA for another
    architecture, or a file saved with `unet.save_lora_adapter`). We compare the pipeline's adapters before and
    after and raise `UserError` naming the file and the keys it holds. Returns the new adapter's name.
    """
    file = resolve_lora_file(path)
    before = {k: set(v) for k, v in pipe.get_list_adapters().items()}
    from diffusers.utils import logging as diffusers_logging

    # diffusers warns "No LoRA keys associated to ..." for each component a file does not touch; whether
    # anything matched at all is decided below, so its warnings would only repeat (or blur) that verdict.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(file, adapter_name=adapter_name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"cannot load LoRA {file!r}: {first_line(exc)} ({_key_sample(file)})") from exc
    finally:
        diffusers_logging.set_verbosity(verbosity)
    after = pipe.get_list_adapters()
    added = sorted({name for comp, names in after.items() for name in names if name not in before.get(comp, set())})
    if not added:
        raise UserError(
            f"LoRA {file!r} matched no module of {type(pipe).__name__} ({_key_sample(file)}); "
            f"expected diffusers keys starting with '{denoiser_component(type(pipe))}.'/'text_encoder.' or a kohya "
            "file for this architecture"
        )
    from .lora_check import check_adapter_loaded

    components = {name: getattr(pipe, name, None) for name in ("unet", "transformer", "text_encoder", "text_encoder_2")}
    check_adapter_loaded(components, added[0], file, type(pipe))
    return added[0]


@contextlib.contextmanager
def lora_disabled(unet: torch.nn.Module) -> Iterator[None]:
    """Run the UNet as its base model (adapters off), e.g. the reference model of LoRA Diffusion-DPO."""
    if not has_lora(unet):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
