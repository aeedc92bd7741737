"""Weight offsets of the negative model, `theta_neg = theta_base + alpha*eta + beta*delta`.

The maths: docs/methods.md#negative-branch-guidance-at-inference.

An offset is either a LoRA file (low rank, `B @ A * scaling` per module) or a full UNet folder taken as its
difference to the base UNet. Two ways to turn offsets into a negative model:

* `compose_lora_factors`: when every offset is a LoRA the composed offset is again low rank. Concatenating the
  factors, `A_neg = [A_eta; A_delta]` and `B_neg = [alpha*s_eta*B_eta, beta*s_delta*B_delta]`, gives
  `B_neg @ A_neg = alpha*s_eta*B_eta@A_eta + beta*s_delta*B_delta@A_delta` exactly, at rank r_eta + r_delta and
  scaling 1. This is what lets both CFG branches share one network call (see `unet.py`).
* `compose_dense_unet`: a merged copy of the base UNet (a second UNet in memory), needed when an offset is a
  full UNet, and what `diffalign export-negative` writes.

`extract_lora` (extract.py) goes the other way: a truncated SVD of a full fine-tune's difference on every Linear
and Conv layer, so a full-UNet offset can use the fast path at a chosen rank.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..models.folders import load_denoiser, locate_denoiser
from ..models.lora import LORA_WEIGHT_NAME, load_lora_into_unet, resolve_lora_file

#: module name -> (A weight, B weight, scaling); the module's LoRA delta is `B @ A * scaling` (conv: 1x1 B).
LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class Offset:
    """One weight offset: `kind` is 'lora' (a LoRA file) or 'unet' (a whole model, minus the base: a UNet folder,
    or a folder with unet/ or transformer/)."""

    kind: str
    path: str

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"


def resolve_offset(path: str | os.PathLike) -> Offset:
    """Classify a path: LoRA file/folder, or a whole model (a diffusers UNet or transformer folder, or a folder with
    unet/ or transformer/: a pipeline, the run folder of a full fine-tune or one of its checkpoints)."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_dir() and not (p / LORA_WEIGHT_NAME).is_file() and locate_denoiser(p) is not None:
        return Offset("unet", str(p))
    try:
        return Offset("lora", resolve_lora_file(text))
    except UserError as exc:
        raise UserError(
            f"{text!r} is neither a LoRA (.safetensors file or folder) nor a UNet folder (config.json of a UNet, "
            f"or a pipeline or run folder with unet/ or transformer/): {exc}"
        ) from exc


def as_offset(value) -> Offset | None:
    if value is None or isinstance(value, Offset):
        return value
    return resolve_offset(value)


# The whole denoiser of a UNet (or transformer) folder, or of a folder with `unet/` or `transformer/` (pipeline, run
# or checkpoint folder): the name the guidance code has always used for models/folders.py's loader.
load_unet = load_denoiser


def lora_factors(unet: torch.nn.Module, adapter_name: str) -> LoraFactors:
    """The (A, B, scaling) of one peft adapter on every module it touches (detached copies)."""
    from peft.tuners.lora import LoraLayer

    out: LoraFactors = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if module.use_dora.get(adapter_name, False):
            raise UserError("DoRA adapters cannot be composed into a negative model; use a plain LoRA")
        a = module.lora_A[adapter_name].weight.detach().clone()
        b = module.lora_B[adapter_name].weight.detach().clone()
        out[name] = (a, b, float(module.scaling[adapter_name]))
    return out


def read_lora(unet: torch.nn.Module, pipeline_class, path: str, inplace: bool = True) -> LoraFactors:
    """Factors of a LoRA file as it would load into `unet` (any format `pipe.load_lora_weights` reads).

    The file is loaded as a temporary adapter and removed again. `inplace=False` uses a scratch copy of the UNet,
    so a UNet that must stay free of peft layers (e.g. one about to be saved) is never touched.
    """
    target = unet if inplace else copy.deepcopy(unet)
    name = "_diffalign_read"
    load_lora_into_unet(target, pipeline_class, path, adapter_name=name)
    try:
        return lora_factors(target, name)
    finally:
        if inplace:
            target.delete_adapters(name)


def _lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense weight delta `scaling * B @ A` of a Linear or Conv2d LoRA (B is a 1x1 conv for conv layers)."""
    if a.ndim == 2:
        return scaling * (b.float() @ a.float())
    # Conv: A is (r, in, kh, kw), B is (out, r, 1, 1).
    delta = b.float().flatten(1) @ a.float().flatten(1)
    return scaling * delta.reshape(b.shape[0], *a.shape[1:])


def fold_adapter(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Add one peft adapter's `scaling * B @ A` into the base weights of every layer it touches (a fused LoRA).

    Returns the original weights (CPU copies, keyed by module name) for `unfold_weights`, which restores them
    bit for bit. The adapter itself stays in place; delete it after folding or it counts twice.
    """
    from peft.tuners.lora import LoraLayer

    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            if module.use_dora.get(adapter_name, False):
                raise UserError("DoRA adapters cannot be folded into the base weights; use a plain LoRA")
            weight = module.get_base_layer().weight
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            delta = _lora_delta(a, b, float(module.scaling[adapter_name])).reshape(weight.shape)
            saved[name] = weight.detach().to("cpu", copy=True)
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return saved


def unfold_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the base weights `fold_adapter` returned."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, original in saved.items():
            weight = modules[name].get_base_layer().weight
            weight.copy_(original.to(weight.device))


def compose_lora_factors(terms: list[tuple[float, LoraFactors]]) -> tuple[LoraFactors, int]:
    """Sum of `coef * LoRA` terms as one LoRA of scaling 1 (factors concatenated, zero-padded to one rank).

    Returns the factors and the common rank. Exact: `sum_i coef_i*s_i*B_i@A_i == B @ A` for every module.
    """
    modules = sorted({m for _, f in terms for m in f})
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
    for coef, factors in terms:
        for m, (a, b, s) in factors.items():
            parts[m].append((a.float(), b.float() * (float(coef) * s)))
    rank = max((sum(a.shape[0] for a, _ in p) for p in parts.values()), default=1)
    out: LoraFactors = {}
    for m, p in parts.items():
        a = torch.cat([a for a, _ in p], dim=0)
        b = torch.cat([b for _, b in p], dim=1)
        pad = rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
        out[m] = (a, b, 1.0)
    return out, rank


def add_factor_adapter(unet: torch.nn.Module, adapter_name: str, factors: LoraFactors, rank: int) -> None:
    """Add a peft adapter (lora_alpha = rank, scaling 1) whose weights are the given factors."""
    from peft import LoraConfig

    if not factors:
        raise UserError("the composed negative LoRA touches no module")
    config = LoraConfig(r=int(rank), lora_alpha=int(rank), target_modules=list(factors), init_lora_weights=True)
    unet.add_adapter(config, adapter_name=adapter_name)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, (a, b, _) in factors.items():
            layer = modules[name]
            wa, wb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            wa.copy_(a.reshape(wa.shape).to(wa.dtype))
            wb.copy_(b.reshape(wb.shape).to(wb.dtype))
    for param in unet.parameters():
        param.requires_grad_(False)


def _plain_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without LoRA weights, keyed as a plain UNet (peft's `.base_layer` removed)."""
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}


def unet_difference(base: torch.nn.Module, tuned: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`tuned - base` per parameter (float32), for parameters that differ; shapes and names must match."""
    base_sd, tuned_sd = _plain_state(base), _plain_state(tuned)
    if set(base_sd) != set(tuned_sd):
        missing = sorted(set(base_sd) ^ set(tuned_sd))[:3]
        raise UserError(f"the UNet does not match the base architecture (differing keys, e.g. {missing})")
    out = {}
    for k, v in base_sd.items():
        t = tuned_sd[k]
        if t.shape != v.shape:
            raise UserError(f"the UNet does not match the base architecture: {k} has shape {tuple(t.shape)}")
        d = t.float() - v.float()
        if torch.any(d != 0):
            out[k] = d
    return out


def _dense_offset(base_unet, pipeline_class, offset: Offset) -> dict[str, torch.Tensor]:
    """An offset as dense per-parameter deltas keyed like `base_unet.state_dict()`."""
    if offset.is_lora:
        factors = read_lora(base_unet, pipeline_class, offset.path, inplace=False)
        return {f"{m}.weight": _lora_delta(a, b, s) for m, (a, b, s) in factors.items()}
    tuned = load_unet(offset.path, dtype=torch.float32)
    return unet_difference(base_unet, tuned)


def compose_dense_unet(base_unet, pipeline_class, positive=None, negative=None, alpha: float = 1.0, beta: float = 1.0):
    """A new UNet with weights `theta_base + alpha*eta + beta*delta` (the base UNet is left unchanged).

    `base_unet` must carry no LoRA layers (load the positive LoRA through `positive=` instead).
    """
    if getattr(base_unet, "peft_config", None):
        raise UserError("the base UNet already has LoRA adapters; pass the positive LoRA as positive= instead")
    out = copy.deepcopy(base_unet)
    state = _plain_state(out)
    with torch.no_grad():
        for coef, offset in ((alpha, as_offset(positive)), (beta, as_offset(negative))):
            if offset is None or coef == 0:
                continue
            for key, delta in _dense_offset(base_unet, pipeline_class, offset).items():
                if key not in state:
                    raise UserError(f"offset {offset.path!r} has weights for {key!r}, which the base UNet lacks")
                param = state[key]
                param.copy_((param.float() + float(coef) * delta.to(param.device)).to(param.dtype))
    return out
