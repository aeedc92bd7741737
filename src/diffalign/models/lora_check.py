"""After a LoRA load: every adapter weight the load created holds a value from the file, and every weight of the
file went somewhere (issue 22, defect 2).

diffusers/peft create the adapter's modules from the file's config, then copy the file's tensors in; a weight the
file lacks (a truncated or hand-edited file) stays an uninitialised placeholder on the `meta` device, and a
key that names no module (renamed keys) is dropped with at most a warning. Either way the "loaded" LoRA gives
black or wrong images with exit code 0. `check_adapter_loaded` refuses both, naming the weights.
"""

from __future__ import annotations

import torch

from ..errors import UserError

_SUFFIXES = (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight",
             ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")


def _adapter_params(module: torch.nn.Module, adapter: str):
    for name, param in module.named_parameters():
        if "lora_" in name and f".{adapter}." in f"{name}.":
            yield name, param


def _file_modules(file: str, pipeline_class) -> dict[str, list[str]] | None:
    """component -> module paths the file's (converted) LoRA keys name, or None when the file cannot be read so."""
    try:
        out = pipeline_class.lora_state_dict(file)
    except Exception:  # the load itself succeeded; a converter that cannot be re-run only costs this check
        return None
    state = out[0] if isinstance(out, tuple) else out
    modules: dict[str, list[str]] = {}
    for key in state:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or "." not in key:
            continue
        component, rest = key.split(".", 1)
        modules.setdefault(component, []).append(rest[: -len(suffix)])
    return modules


def check_adapter_loaded(components: dict[str, torch.nn.Module], adapter: str, file: str, pipeline_class) -> None:
    """Raise UserError when weights of adapter `adapter` in `components` ({'unet': unet, 'text_encoder': ...})
    received no value from `file`, or when keys of the file matched no module."""
    placeholders, loaded = [], set()
    for comp, module in components.items():
        if module is None:
            continue
        for name, param in _adapter_params(module, adapter):
            if param.device.type == "meta":
                placeholders.append(f"{comp}.{name}")
            else:
                loaded.add((comp, name.split(".lora_")[0]))
    if placeholders:
        shown = ", ".join(placeholders[:3]) + (f" and {len(placeholders) - 3} more" if len(placeholders) > 3 else "")
        raise UserError(f"LoRA {file!r} is incomplete: {len(placeholders)} adapter weights it configures have no "
                        f"value in the file ({shown}); the images would be black or wrong. Use the complete file "
                        "(pytorch_lora_weights.safetensors as written by diffalign train)")
    modules = _file_modules(file, pipeline_class)
    if modules is None:
        return
    unused = [f"{comp}.{m}" for comp, names in modules.items() if comp in components
              for m in sorted(set(names)) if (comp, m) not in loaded]
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise UserError(f"LoRA {file!r}: {len(unused)} of its modules match no module of the model ({shown}); "
                        "renamed keys or a LoRA for another architecture: the rest would load without them. Use an "
                        "unmodified file for this model")
