"""Negative-branch CFG inside stock diffusers pipelines, by swapping `pipe.unet` for a thin wrapper.

`eps = eps_neg(x, t, c_neg) + g * (eps_pos(x, t, c) - eps_neg(x, t, c_neg))` (Diffusion-NPO / Self-NPO) is the
stock CFG combination `uncond + g * (cond - uncond)` once the unconditional half of the batch is predicted by
the negative model. The stock `StableDiffusionPipeline` / `StableDiffusionXLPipeline` run the UNet on the batch
`[negative-prompt half; prompt half]`, so the wrapper only has to route the first half to the negative weights and
the second half to the positive weights; the pipeline's own code keeps doing schedulers, `guidance_rescale`,
SDXL added conditions, `num_images_per_prompt` and generators. The user's negative prompt (or "") is what the
pipeline encodes into the first half, so it reaches the negative model.

Fast path (every offset a LoRA): one UNet holds adapter "npo_pos" (eta) and adapter "npo_neg", the pre-composed
`alpha*eta + beta*delta` (`offsets.compose_lora_factors`: factors concatenated, rank r_eta + r_delta, scales
folded in), and both halves run in ONE network call with one adapter per half. Composing first is what makes
"one adapter per sample" enough: peft's mixed-batch forward (`adapter_names`) picks exactly one adapter per
sample and cannot weight two. The per-half forward itself is `sliced_adapter_batch`: base layer on the whole
batch, then each adapter's `B(A(x[half])) * scaling` added to its half. It is the same sum peft's mixed batch
computes (`mixed_adapter_batch` gives peft's version; the tests check they agree), but on slice views instead of
gathered index lists, which was measurably cheaper on the toy model (CFG ratio 1.32 -> 1.14).

Slow path (some offset is a full UNet): a second, merged UNet in memory and two network calls per step.
`diffalign extract-lora` turns a full fine-tune into a LoRA to get back to the fast path.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch

from ..errors import UserError
from .offsets import (
    Offset,
    add_factor_adapter,
    as_offset,
    compose_dense_unet,
    compose_lora_factors,
    lora_factors,
    load_unet,
    read_lora,
)

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def sliced_adapter_batch(unet: torch.nn.Module, parts: list[tuple[slice, str]]):
    """Like `mixed_adapter_batch` for contiguous halves: base layer on the whole batch, each adapter on its slice.

    Same sums as peft's mixed-batch forward, but slices are views (peft gathers index lists and scatters back),
    which is measurably cheaper per LoRA layer. Adapters are switched off for the base forward and restored after.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]

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


def _split(value, n: int, part: slice):
    """The `part` of a batch-shaped argument (tensors with leading dim n, also inside dicts); others unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[part]
    if isinstance(value, dict):
        return {k: _split(v, n, part) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_split(v, n, part) for v in value)
    return value


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


class NegativeGuidedUNet(GuidedDenoiser):
    """Looks like the pipeline's UNet; predicts the first half of a CFG batch with the negative model.

    Fast path: `negative is None`, `positive` carries both adapters, one call with a mixed adapter batch.
    Slow path: `negative` is a second UNet; the batch is split and each half goes to its own UNet (two calls).
    Batches that are not CFG batches (guidance off, as `cfg_active()` reports) go to the positive model only.
    """

    def __init__(self, positive, negative=None, pos_adapter: str = BASE, neg_adapter: str = NEG_ADAPTER, cfg_active=None):
        super().__init__(positive, negative, pos_adapter, neg_adapter)
        self._cfg_active = cfg_active

    def _is_cfg_batch(self, n: int) -> bool:
        if n % 2:
            return False
        if self._cfg_active is None:
            return True
        try:
            return bool(self._cfg_active())
        except AttributeError:  # called outside a pipeline call: assume a CFG batch
            return True

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        n = sample.shape[0]
        cfg = self._is_cfg_batch(n)
        if self.fast:
            half = n // 2
            parts = [(slice(0, half), self.neg_adapter), (slice(half, n), self.pos_adapter)] if cfg else [
                (slice(0, n), self.pos_adapter)]
            with sliced_adapter_batch(self.positive, parts):
                return self.positive(sample, timestep, encoder_hidden_states, *args, **kwargs)
        if not cfg:
            return self.positive(sample, timestep, encoder_hidden_states, *args, **kwargs)
        halves = (slice(0, n // 2), slice(n // 2, n))
        outs = []
        for model, part in zip((self.negative, self.positive), halves):
            outs.append(
                model(
                    _split(sample, n, part),
                    _split(timestep, n, part),
                    _split(encoder_hidden_states, n, part),
                    *[_split(a, n, part) for a in args],
                    **{k: _split(v, n, part) for k, v in kwargs.items()},
                )
            )
        pred = torch.cat([o[0] if isinstance(o, tuple) else o.sample for o in outs], dim=0)
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=pred)
        return (pred,)


@dataclass
class GuidanceInfo:
    """What `attach_negative_guidance` set up: path, calls per step, the offsets and their weights."""

    fast: bool
    calls_per_step: int
    positive: str | None
    negative: str | None
    alpha: float
    beta: float
    rank: int | None = None  # rank of the composed negative LoRA (fast path)

    def record(self) -> dict:
        return {
            "negative_model": self.negative,
            "npo_alpha": self.alpha,
            "npo_beta": self.beta,
            "npo_path": "fast (one batched call per step)" if self.fast else "two-call (second UNet)",
        }


def _cfg_probe(pipe):
    ref = weakref.ref(pipe)

    def active() -> bool:
        p = ref()
        return True if p is None else p.do_classifier_free_guidance

    return active


def _is_video_pipeline(pipe) -> bool:
    """A pipeline whose denoiser is `transformer` (CogVideoX), not `unet`."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def _set_unet(pipe, unet) -> None:
    # Bypass DiffusionPipeline.__setattr__: the wrapper is not a diffusers component to record in the config.
    object.__setattr__(pipe, "unet", unet)


def attach_negative_guidance(
    pipe,
    negative=None,
    positive=None,
    alpha: float = 1.0,
    beta: float = 1.0,
    force_two_calls: bool = False,
) -> GuidanceInfo:
    """Make `pipe` sample with negative-branch CFG: `theta_neg = theta_base + alpha*eta + beta*delta`.

    `pipe` is a stock SD/SDXL pipeline holding the base model (no LoRA loaded yet). `positive` (eta) and
    `negative` (delta) are LoRA files/folders or UNet folders (taken as their difference to `pipe.unet`).
    A positive LoRA is loaded with `pipe.load_lora_weights` (its text-encoder part, if any, then serves both
    prompts). `force_two_calls` builds the slow path even for LoRAs (reference and benchmarks).
    Undo with `detach_negative_guidance(pipe)`.
    """
    from ..models.lora import load_lora_into_pipeline

    if _is_video_pipeline(pipe):  # CogVideoX: a transformer called with keywords, see guidance/video.py
        from .video import attach_video_negative_guidance

        return attach_video_negative_guidance(pipe, negative, positive, alpha, beta, force_two_calls)
    if isinstance(pipe.unet, NegativeGuidedUNet):
        raise UserError("negative guidance is already attached to this pipeline; detach it first")
    if getattr(pipe.unet, "peft_config", None):
        raise UserError(
            "the pipeline's UNet already has LoRA adapters; pass the positive LoRA as positive= (--lora) so both "
            "branches are composed from it, or fuse it first (pipe.fuse_lora(); pipe.unload_lora_weights())"
        )
    eta, delta = as_offset(positive), as_offset(negative)
    if delta is None and eta is None:
        raise UserError("negative guidance needs a negative model (delta) or a positive offset (eta)")
    alpha, beta = float(alpha), float(beta)
    probe = _cfg_probe(pipe)
    base = pipe.unet
    lora_only = all(o is None or o.is_lora for o in (eta, delta))
    info = GuidanceInfo(
        fast=lora_only and not force_two_calls,
        calls_per_step=1 if lora_only and not force_two_calls else 2,
        positive=eta.path if eta else None,
        negative=delta.path if delta else None,
        alpha=alpha,
        beta=beta,
    )
    if info.fast:
        pos_name = BASE
        terms = []
        if eta is not None:
            pos_name = load_lora_into_pipeline(pipe, eta.path, adapter_name=POS_ADAPTER)
            terms.append((alpha, lora_factors(base, pos_name)))
        if delta is not None:
            terms.append((beta, read_lora(base, type(pipe), delta.path)))
        factors, rank = compose_lora_factors(terms)
        add_factor_adapter(base, NEG_ADAPTER, factors, rank)
        info.rank = rank
        base.eval()
        wrapper = NegativeGuidedUNet(base, None, pos_adapter=pos_name, neg_adapter=NEG_ADAPTER, cfg_active=probe)
        logger.info("NPO guidance: fast path, one batched UNet call per step (negative LoRA rank %d)", rank)
    else:
        negative_unet = compose_dense_unet(base, type(pipe), eta, delta, alpha, beta).eval()
        if eta is None:
            positive_unet = base
        elif eta.is_lora:
            load_lora_into_pipeline(pipe, eta.path, adapter_name=POS_ADAPTER)
            positive_unet = base
        else:
            positive_unet = load_unet(eta.path, dtype=base.dtype).to(base.device).eval()
        wrapper = NegativeGuidedUNet(positive_unet, negative_unet, cfg_active=probe)
        wrapper._base = [base]  # kept outside the module tree, to restore on detach
        logger.warning(
            "NPO guidance: two-call path (an offset is a full UNet, or forced): a second UNet is held in memory and each step makes two "
            "UNet calls; `diffalign extract-lora` makes a LoRA of it for the one-call fast path"
        )
    _set_unet(pipe, wrapper)
    pipe._npo_guidance = info
    return info


def detach_negative_guidance(pipe) -> None:
    """Restore the pipeline's own UNet; the adapters added for guidance are removed."""
    if _is_video_pipeline(pipe):
        from .video import detach_video_negative_guidance

        return detach_video_negative_guidance(pipe)
    wrapper = pipe.unet
    if not isinstance(wrapper, NegativeGuidedUNet):
        return
    base = wrapper.__dict__.get("_base", [wrapper.positive])[0]
    _set_unet(pipe, base)
    if NEG_ADAPTER in (getattr(base, "peft_config", None) or {}):
        base.delete_adapters([NEG_ADAPTER])
    if any(POS_ADAPTER in names for names in pipe.get_list_adapters().values()):
        pipe.delete_adapters([POS_ADAPTER])
    pipe.__dict__.pop("_npo_guidance", None)


def export_negative_unet(pipe, out_dir, negative=None, positive=None, alpha: float = 1.0, beta: float = 1.0):
    """Write the composed negative UNet (`theta_base + alpha*eta + beta*delta`) as a diffusers UNet folder."""
    unet = compose_dense_unet(pipe.unet, type(pipe), positive, negative, alpha, beta)
    unet.save_pretrained(str(out_dir))
    return out_dir


__all__ = [
    "NegativeGuidedUNet",
    "GuidanceInfo",
    "Offset",
    "attach_negative_guidance",
    "detach_negative_guidance",
    "export_negative_unet",
    "mixed_adapter_batch",
    "sliced_adapter_batch",
]
