"""What the negative-guidance wrappers of every family share: the adapter names, the per-half adapter forward
(`sliced_adapter_batch`, and peft's own `mixed_adapter_batch` it must agree with), the wrapper base class and
`GuidanceInfo`, the record of what `attach_negative_guidance` set up."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import UserError

POS_ADAPTER = "npo_pos"
NEG_ADAPTER = "npo_neg"
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@contextlib.contextmanager
def mixed_adapter_batch(unet: torch.nn.Module, adapter_names: list[str]):
    """Run every peft LoRA layer of `unet` with one adapter per sample (peft's `adapter_names`) inside the block."""
    from peft.tuners.lora import LoraLayer

    def pre_hook(module, args, kwargs):
        kwargs["adapter_names"] = adapter_names
        return args, kwargs

    handles = [
        m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lora_layers(model: torch.nn.Module) -> list:
    """The peft LoRA layers of `model`."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def sliced_adapter_batch(unet: torch.nn.Module, parts: list[tuple[slice, str]], layers: list | None = None):
    """Like `mixed_adapter_batch` for contiguous halves: base layer on the whole batch, each adapter on its slice.

    Same sums as peft's mixed-batch forward, but slices are views (peft gathers index lists and scatters back),
    which is measurably cheaper per LoRA layer. Adapters are switched off for the base forward and restored after.
    `layers`: `lora_layers(unet)` when the caller keeps it (walking every module per call cost ~3% of a toy-UNet
    call); found here otherwise.
    """
    layers = lora_layers(unet) if layers is None else layers

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        for part, name in parts:
            if name not in module.lora_A:
                continue
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            delta = lora_b(lora_a(x[part].to(lora_a.weight.dtype))) * module.scaling[name]
            output[part] += delta.to(output.dtype)
        return output

    saved = [m._disable_adapters for m in layers]
    handles = []
    try:
        for m in layers:
            if m.merged:
                raise UserError("cannot run per-half adapters on a UNet with merged LoRA weights; unmerge first")
            m._disable_adapters = True
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, d in zip(layers, saved):
            m._disable_adapters = d


class GuidedDenoiser(torch.nn.Module):
    """What every negative-guidance wrapper shares: a positive model (with adapters on the fast path), an
    optional merged negative model (slow path), and attribute look-ups that fall through to the positive model
    so the pipeline sees its own UNet / transformer (config, dtype, device, ...)."""

    def __init__(self, positive, negative=None, pos_adapter: str = BASE, neg_adapter: str = NEG_ADAPTER):
        super().__init__()
        self.positive = positive
        self.negative = negative
        self.pos_adapter = pos_adapter
        self.neg_adapter = neg_adapter
        self._layers = [None]  # the positive model's LoRA layers, found at the first fast-path call

    def adapter_layers(self) -> list:
        """The positive model's LoRA layers (fast path), found once: attach/detach own the adapters meanwhile."""
        if self._layers[0] is None:
            self._layers[0] = lora_layers(self.positive)
        return self._layers[0]

    @property
    def fast(self) -> bool:
        return self.negative is None

    @property
    def dtype(self) -> torch.dtype:
        return self.positive.dtype

    @property
    def device(self) -> torch.device:
        return self.positive.device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # config, cache_context, ... of the real model
            return getattr(self._modules["positive"], name)


@dataclass
class GuidanceInfo:
    """What `attach_negative_guidance` set up: path, calls per step, the offsets and their weights."""

    fast: bool
    calls_per_step: int
    positive: str | None
    negative: str | None
    alpha: float
    beta: float
    rank: int | None = None  # rank of the composed negative LoRA (fast path; 0: none needed)
    positive_folded: bool = False  # fast path: the positive LoRA was added into the denoiser's base weights

    def record(self) -> dict:
        return {
            "negative_model": self.negative,
            "npo_alpha": self.alpha,
            "npo_beta": self.beta,
            "npo_path": "fast (one batched call per step)" if self.fast else "two-call (second UNet)",
        }
