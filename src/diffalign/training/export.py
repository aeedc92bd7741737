"""`diffalign export --lora DIR --format kohya`: a kohya / ComfyUI / A1111-keyed copy of a diffusers LoRA.

kohya keys name each module with underscores (`lora_unet_down_blocks_1_..._to_q.lora_down.weight`), call
A and B `lora_down` and `lora_up`, and carry each module's `alpha` as a scalar tensor: the scale applied at
load time is alpha / rank, so it must travel with the file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..models import resolve_lora_file


def _alpha_by_rank(metadata: dict | None, rank: int) -> float:
    """lora_alpha from the adapter metadata the diffusers saver writes (`unet.lora_alpha` inside a JSON
    string); rank (scale 1) when there is none."""
    for value in (metadata or {}).values():
        try:
            config = json.loads(value)
        except (ValueError, TypeError):
            continue
        if isinstance(config, dict):
            alpha = next((v for k, v in config.items() if k == "lora_alpha" or k.endswith(".lora_alpha")), None)
            if isinstance(alpha, (int, float)):
                return float(alpha)
    return float(rank)


# diffusers writes `.lora.down/.lora.up`; peft-style files use `.lora_A/.lora_B`: both are accepted.
_DOWN = (".lora.down.weight", ".lora_A.weight")
_UP = (".lora.up.weight", ".lora_B.weight")


def to_kohya(state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    prefixes = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
    for key, tensor in state_dict.items():
        prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p)), None)
        suffix = next((x for x in _DOWN + _UP if key.endswith(x)), None)
        if prefix is None or suffix is None:
            raise UserError(f"unexpected key '{key}' in a diffusers LoRA file: expected unet./text_encoder. keys "
                            "ending in .lora.down/.lora.up.weight or .lora_A/.lora_B.weight")
        module = key[len(prefix): -len(suffix)]
        name = prefixes[prefix] + module.replace(".", "_")
        if suffix in _DOWN:
            out[f"{name}.lora_down.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(_alpha_by_rank(metadata, tensor.shape[0]))
        else:
            out[f"{name}.lora_up.weight"] = tensor
    return out


def export_kohya(lora: str | Path, out_file: str | Path | None = None) -> Path:
    """Write the kohya copy of `lora`. The input is never changed: an output that is the input file is refused, and
    the output is written under a temporary name and renamed, so a failed write leaves no half file."""
    import os

    source = resolve_lora_file(lora)
    out = Path(out_file) if out_file else Path(source).with_name(Path(source).stem + "_kohya.safetensors")
    if out.exists() and _same_file(out, Path(source)) or out.resolve() == Path(source).resolve():
        raise UserError(f"--out '{out}' is the input LoRA file itself: exporting would destroy it; give another "
                        "--out (default: beside the input, *_kohya.safetensors)")
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give the output .safetensors file name")
    try:
        with safe_open(str(source), framework="pt") as f:
            metadata = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a file that is not safetensors
        raise UserError(f"LoRA file '{source}' is not a readable safetensors file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); export reads the "
                        ".safetensors files diffalign train writes (.bin pickles are never loaded)") from None
    if not state:
        raise UserError(f"LoRA file '{source}' holds no tensors")
    converted = to_kohya(state, metadata)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp),
                  metadata={"ss_network_module": "networks.lora"})
        os.replace(tmp, out)
    except Exception as exc:  # OSError, or safetensors' own error wrapping one
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UserError(f"cannot write '{out}' ({reason}): choose another --out or fix the folder's permissions or "
                        "free space") from None
    return out


def _same_file(a: Path, b: Path) -> bool:
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
