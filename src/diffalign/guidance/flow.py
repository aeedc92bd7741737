"""Negative-branch CFG inside the stock SD3 and FLUX pipelines (flow-matching transformers).

The maths is the one of `unet.py`: the unconditional (negative-prompt) prediction comes from
`theta_neg = theta_base + alpha*eta + beta*delta`, the conditional one from `theta_base + eta`, and the pipeline
combines them as always (`v_neg + g*(v_pos - v_neg)`). How the two branches reach the transformer differs:

- `StableDiffusion3Pipeline` runs ONE call on the batch `[negative-prompt half; prompt half]` when
  `do_classifier_free_guidance` (guidance_scale > 1): as for the UNet pipelines, the fast path (every offset a
  LoRA) runs that call once with adapter `npo_neg` on the first half and `npo_pos` on the second
  (`sliced_adapter_batch`); the two-call path sends each half to its own model.
- `FluxPipeline` has true CFG (`true_cfg_scale > 1` with a negative prompt): it calls the transformer twice per
  step, the prompt inside `transformer.cache_context("cond")` and the negative prompt inside
  `cache_context("uncond")`. The wrapper reads that name: the fast path switches the one transformer's adapter
  per call (one model in memory, the two calls FLUX makes anyway), the two-call path sends the "uncond" call to
  the merged negative model. Without true CFG every call is a "cond" call and runs the positive weights.
  (FLUX-dev's distilled `guidance_scale` is an input of the transformer, untouched here.)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .denoiser import BASE, NEG_ADAPTER, GuidedDenoiser, sliced_adapter_batch
from .unet import _cfg_probe, _split

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


class NegativeGuidedFlowTransformer(GuidedDenoiser):
    """Looks like `pipe.transformer` of an SD3 / FLUX pipeline; routes the negative branch to the negative
    weights (see the module docstring). `negative is None`: fast path, `positive` holds both adapters."""

    def __init__(self, positive, negative=None, pos_adapter: str = BASE, neg_adapter: str = NEG_ADAPTER,
                 cfg_active=None):
        super().__init__(positive, negative, pos_adapter, neg_adapter)
        self._cfg_active = cfg_active
        #: The name of the pipeline's current cache_context ("cond" / "uncond": FLUX's true CFG), else None.
        self.branch: str | None = None

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        previous, self.branch = self.branch, name
        try:
            with self._modules["positive"].cache_context(name, **kwargs):
                yield
        finally:
            self.branch = previous

    def _is_cfg_batch(self, n: int) -> bool:
        if n % 2 or self._cfg_active is None:
            return False
        try:
            return bool(self._cfg_active())
        except AttributeError:  # outside a pipeline call
            return True

    def _run(self, model, adapter: str, kwargs: dict):
        if self.fast:
            with sliced_adapter_batch(self.positive, [(slice(0, kwargs["hidden_states"].shape[0]), adapter)],
                                      self.adapter_layers()):
                return self.positive(**kwargs)
        return model(**kwargs)

    def forward(self, hidden_states=None, *args, **kwargs):
        if args:
            raise TypeError("the guided transformer takes keyword arguments only, as the SD3 / FLUX pipelines call it")
        kwargs["hidden_states"] = hidden_states
        if self.branch is not None:  # FLUX true CFG: one call per branch
            negative = self.branch == "uncond"
            return self._run(self.negative if negative else self.positive,
                             self.neg_adapter if negative else self.pos_adapter, kwargs)
        n = hidden_states.shape[0]
        if not self._is_cfg_batch(n):
            return self._run(self.positive, self.pos_adapter, kwargs)
        if self.fast:
            parts = [(slice(0, n // 2), self.neg_adapter), (slice(n // 2, n), self.pos_adapter)]
            with sliced_adapter_batch(self.positive, parts, self.adapter_layers()):
                return self.positive(**kwargs)
        outs = []
        for model, part in ((self.negative, slice(0, n // 2)), (self.positive, slice(n // 2, n))):
            outs.append(model(**{k: _split(v, n, part) for k, v in kwargs.items()}))
        pred = torch.cat([o[0] if isinstance(o, tuple) else o.sample for o in outs])
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=pred)
        return (pred,)


def wrap_flow_transformer(pipe: DiffusionPipeline, positive, negative, pos_adapter: str = BASE):
    """The wrapper `attach_negative_guidance` puts in `pipe.transformer` of an SD3 or FLUX pipeline."""
    probe = _cfg_probe(pipe) if hasattr(type(pipe), "do_classifier_free_guidance") else None
    return NegativeGuidedFlowTransformer(positive.eval(), negative, pos_adapter=pos_adapter, cfg_active=probe)


def is_flow_pipeline(pipe) -> bool:
    """SD3 / SD3.5 and FLUX pipelines (their class names), whose transformer this module wraps."""
    return type(pipe).__name__.startswith(("StableDiffusion3", "Flux"))


__all__ = ["NegativeGuidedFlowTransformer", "is_flow_pipeline", "wrap_flow_transformer"]
