"""`diffalign extract-lora`: a LoRA from a full fine-tune's difference, and how much of the difference it keeps.

Every Linear and Conv2d layer the target modules name (all of them by default, as kohya's extractor does) gets
the truncated SVD of its weight difference `tuned - base`: `B = U_r S_r`, `A = V_r^T`, scaling 1. A conv kernel
(out, in, kh, kw) is decomposed as the (out, in*kh*kw) matrix and saved in the LoRA form peft and diffusers load
for conv layers: A a (r, in, kh, kw) conv with the layer's stride and padding, B a 1x1 conv (out, r, 1, 1).

What a LoRA cannot hold: biases, normalisation weights, and the singular values beyond rank r. The report
gives, per layer group, the share of the squared weight difference `||tuned - base||^2` (over every parameter
of the UNet) the group holds and the share the LoRA keeps; the total kept is exact-or-not at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models.loading import load_pipeline
from ..models.lora import denoiser_component, save_lora
from ..models.source import resolve_model
from .offsets import add_factor_adapter, load_unet

#: Groups of parameters no LoRA can hold.
NOT_LORA = "biases and norms (no LoRA form)"
NOT_TARGETED = "Linear/Conv layers outside --target-modules"
#: Default share (percent) of the squared difference below which extract-lora warns.
DEFAULT_WARN_BELOW = 90.0


def layer_group(name: str, module: torch.nn.Module) -> str:
    """The group of a Linear or Conv2d layer in the report, from its place in a diffusers UNet."""
    if isinstance(module, torch.nn.Conv2d):
        if ".resnets." in f".{name}.":
            return "conv: resnets"
        if ".attentions." in f".{name}.":
            return "conv: attention proj_in/out"
        return "conv: conv_in/out, down/upsamplers"
    if ".attn" in f".{name}":
        return "linear: attention to_q/k/v/out"
    if "time_emb" in name or "add_embedding" in name or "time_embedding" in name:
        return "linear: time and added embeddings"
    return "linear: proj_in/out, feed-forward"


def _decomposable(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and module.groups == 1


def _targeted(name: str, target_modules) -> bool:
    return target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules)


@dataclass
class ExtractionReport:
    """Squared Frobenius norms of the difference: per group, what it holds and what the LoRA keeps."""

    rank: int
    held: dict[str, float] = field(default_factory=dict)
    kept: dict[str, float] = field(default_factory=dict)

    def add(self, group: str, held: float, kept: float = 0.0) -> None:
        self.held[group] = self.held.get(group, 0.0) + held
        self.kept[group] = self.kept.get(group, 0.0) + kept

    @property
    def total(self) -> float:
        return sum(self.held.values())

    def share(self, group: str | None = None) -> tuple[float, float]:
        """(percent of the whole difference the group holds, percent of it the LoRA keeps); group None: all."""
        total = self.total
        if total == 0:
            return 0.0, 100.0
        if group is None:
            return 100.0, 100.0 * sum(self.kept.values()) / total
        return 100.0 * self.held[group] / total, 100.0 * self.kept[group] / total

    @property
    def kept_percent(self) -> float:
        return self.share()[1]

    def lines(self) -> list[str]:
        groups = sorted(self.held, key=lambda g: -self.held[g])
        width = max(len(g) for g in groups + ["total"])
        out = [f"share of the squared weight difference ||tuned - base||^2, at rank {self.rank}:",
               f"  {'layer group':<{width}}  holds    LoRA keeps"]
        for g in groups:
            held, kept = self.share(g)
            out.append(f"  {g:<{width}}  {held:5.1f}%   {kept:5.1f}%")
        out.append(f"  {'total':<{width}}  100.0%   {self.kept_percent:5.1f}%")
        return out

    def warning(self, warn_below: float) -> str | None:
        if self.kept_percent >= warn_below:
            return None
        return (f"warning: the rank-{self.rank} LoRA keeps {self.kept_percent:.1f}% of the squared weight difference "
                f"(below {warn_below:g}%): it is an approximation of the fine-tune. Raise --rank, or see which "
                "groups lose most above (biases and norms have no LoRA form)")


def decompose_difference(base_unet, tuned_unet, rank: int, target_modules=None):
    """Truncated SVD of `tuned - base` on every Linear/Conv2d layer `target_modules` names (None: all).

    Returns (factors, report): factors as in `offsets.LoraFactors` (module -> (A, B, 1.0), zero-padded to `rank`
    where a layer's difference has fewer singular values), and the :class:`ExtractionReport` over every parameter.
    Exact when `rank` is at least the rank of each layer's difference and only weights of targeted layers differ.
    """
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    base_params = dict(base_unet.named_parameters())
    tuned_params = dict(tuned_unet.named_parameters())
    if set(base_params) != set(tuned_params):
        missing = sorted(set(base_params) ^ set(tuned_params))[:3]
        raise UserError(f"the tuned UNet does not match the base architecture (differing parameters, e.g. {missing})")
    tuned_modules = dict(tuned_unet.named_modules())
    report = ExtractionReport(rank)
    factors = {}
    covered = set()
    for name, module in base_unet.named_modules():
        if not _decomposable(module):
            continue
        key = f"{name}.weight"
        other = tuned_modules.get(name)
        if other is None or other.weight.shape != module.weight.shape:
            raise UserError(f"the tuned UNet does not match the base at {name!r}")
        covered.add(key)
        diff = other.weight.detach().double() - module.weight.detach().double()
        held = float(diff.pow(2).sum())
        if not _targeted(name, target_modules):
            report.add(NOT_TARGETED, held)
            continue
        matrix = diff.flatten(1)  # conv: (out, in*kh*kw)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, s.shape[0])
        report.add(layer_group(name, module), held, float(s[:r].pow(2).sum()))
        b = (u[:, :r] * s[:r]).float()
        a = vh[:r].float()
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        if diff.ndim == 4:  # the conv LoRA form: A a kernel like the layer's, B a 1x1 conv
            a = a.reshape(rank, *diff.shape[1:])
            b = b.reshape(b.shape[0], rank, 1, 1)
        factors[name] = (a, b, 1.0)
    for key, param in base_params.items():
        if key not in covered:
            report.add(NOT_LORA, float((tuned_params[key].detach().double() - param.detach().double()).pow(2).sum()))
    if not factors:
        raise UserError(f"no Linear or Conv2d layer of the UNet matches --target-modules {list(target_modules)}")
    return factors, report


def extract_lora_factors(base_unet, tuned_unet, rank: int, target_modules=None):
    """The factors of :func:`decompose_difference` alone."""
    return decompose_difference(base_unet, tuned_unet, rank, target_modules)[0]


def extract_lora(base_path: str, tuned_path: str, rank: int, out_dir: str, target_modules=None,
                 warn_below: float = DEFAULT_WARN_BELOW, log=print, warn=None) -> Path:
    """`diffalign extract-lora`: save the rank-`rank` LoRA of `tuned - base` as
    `out_dir/pytorch_lora_weights.safetensors`; report (through `log`) the share of the difference it keeps per
    layer group, and warn (through `warn`, default `log`) when the total is below `warn_below` percent."""

    pipe = load_pipeline(resolve_model(base_path))
    base = getattr(pipe, denoiser_component(type(pipe)))  # the UNet, or the transformer of SD3 / FLUX / CogVideoX
    tuned = load_unet(str(resolve_model(tuned_path)), dtype=base.dtype)
    factors, report = decompose_difference(base, tuned, rank, target_modules)
    if report.total == 0:
        raise UserError(f"the UNet {tuned_path!r} equals the base: there is no difference to extract")
    for line in report.lines():
        log(line)
    message = report.warning(warn_below)
    if message:
        (warn or log)(message)
    add_factor_adapter(base, "default", factors, rank)
    return save_lora(base, type(pipe), out_dir, adapter_name="default")


__all__ = ["DEFAULT_WARN_BELOW", "ExtractionReport", "decompose_difference", "extract_lora", "extract_lora_factors",
           "layer_group"]
