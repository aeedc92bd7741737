"""Negative-branch CFG inside the stock UNet pipelines (SD, SDXL), by swapping `pipe.unet` for a thin wrapper.

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

import weakref
from typing import TYPE_CHECKING

import torch

from .denoiser import BASE, NEG_ADAPTER, GuidedDenoiser, sliced_adapter_batch
from .offsets import compose_dense_unet

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _split(value, n: int, part: slice):
    """The `part` of a batch-shaped argument (tensors with leading dim n, also inside dicts); others unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[part]
    if isinstance(value, dict):
        return {k: _split(v, n, part) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_split(v, n, part) for v in value)
    return value


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
            with sliced_adapter_batch(self.positive, parts, self.adapter_layers()):
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


def _cfg_probe(pipe: DiffusionPipeline):
    ref = weakref.ref(pipe)

    def active() -> bool:
        p = ref()
        return True if p is None else p.do_classifier_free_guidance

    return active


def wrap_unet(pipe: DiffusionPipeline, positive, negative, pos_adapter: str = BASE) -> NegativeGuidedUNet:
    """The wrapper `attach_negative_guidance` puts in `pipe.unet`; it asks the pipeline whether a batch is a CFG batch."""
    return NegativeGuidedUNet(positive, negative, pos_adapter=pos_adapter, neg_adapter=NEG_ADAPTER,
                              cfg_active=_cfg_probe(pipe))


def export_negative_unet(pipe: DiffusionPipeline, out_dir, negative=None, positive=None, alpha: float = 1.0, beta: float = 1.0):
    """Write the composed negative UNet (`theta_base + alpha*eta + beta*delta`) as a diffusers UNet folder."""
    unet = compose_dense_unet(pipe.unet, type(pipe), positive, negative, alpha, beta)
    unet.save_pretrained(str(out_dir))
    return out_dir


__all__ = ["NegativeGuidedUNet", "export_negative_unet", "wrap_unet"]
