"""`attach_negative_guidance`: negative-branch CFG in a stock pipeline, whatever its denoiser.

`theta_neg = theta_base + alpha*eta + beta*delta` predicts the negative half of every CFG batch. The steps are
the same for every family: refuse a pipeline already wrapped or holding adapters, read the offsets, then either
compose LoRA offsets into one adapter (fast path: one network call per step; the positive LoRA folded into the
base weights, the negative half alone running an adapter) or merge them into a second model
(two calls). What differs is the denoiser, described by a `Denoiser`: the pipeline attribute that holds it
(`unet` for SD / SDXL, `transformer` for CogVideoX), the wrapper that routes the halves (unet.py, video.py) and
whether full-model offsets can be composed for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import UserError
from ..models.lora import load_lora_into_pipeline
from .denoiser import BASE, NEG_ADAPTER, POS_ADAPTER, GuidanceInfo, GuidedDenoiser
from .flow import is_flow_pipeline, wrap_flow_transformer
from .offsets import (
    add_factor_adapter,
    as_offset,
    compose_dense_unet,
    compose_lora_factors,
    fold_adapter,
    load_unet,
    lora_factors,
    read_lora,
    unfold_weights,
)
from .unet import wrap_unet
from .video import unwatch_cfg, wrap_transformer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Denoiser:
    """A family's denoiser as negative guidance sees it."""

    attribute: str  # the pipeline component: "unet" or "transformer"
    shown: str  # its name in messages
    wrap: Callable[..., GuidedDenoiser]  # (pipe, positive, negative, pos_adapter) -> the wrapper
    full_offsets: bool  # full-model offsets (a tuned denoiser folder) can be composed
    unwrap: Callable[..., None] = lambda pipe: None  # undo what `wrap` did to the pipeline besides the attribute
    lora_hint: str = ""  # how the user passes the positive LoRA
    fast_calls: int = 1  # network calls per CFG step on the fast path (FLUX's true CFG makes two anyway)


UNET = Denoiser("unet", "UNet", wrap_unet, full_offsets=True, lora_hint=" (--lora)")
TRANSFORMER = Denoiser("transformer", "transformer", wrap_transformer, full_offsets=False, unwrap=unwatch_cfg)
#: SD3 / FLUX (guidance/flow.py): SD3's CFG is one call on both halves, FLUX's true CFG two calls of one model.
FLOW = Denoiser("transformer", "transformer", wrap_flow_transformer, full_offsets=False)
FLUX = Denoiser("transformer", "transformer", wrap_flow_transformer, full_offsets=False, fast_calls=2)


def pipeline_denoiser(pipe: DiffusionPipeline) -> Denoiser:
    """`TRANSFORMER` for a pipeline whose denoiser is `transformer` (CogVideoX), `UNET` otherwise."""
    if is_flow_pipeline(pipe):
        return FLUX if type(pipe).__name__.startswith("Flux") else FLOW
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        return TRANSFORMER
    return UNET


def _install(pipe: DiffusionPipeline, denoiser: Denoiser, module) -> None:
    # Bypass DiffusionPipeline.__setattr__: the wrapper is not a diffusers component to record in the config.
    object.__setattr__(pipe, denoiser.attribute, module)


def attach_negative_guidance(
    pipe: DiffusionPipeline,
    negative=None,
    positive=None,
    alpha: float = 1.0,
    beta: float = 1.0,
    force_two_calls: bool = False,
) -> GuidanceInfo:
    """Make `pipe` sample with negative-branch CFG: `theta_neg = theta_base + alpha*eta + beta*delta`.

    `pipe` is a stock SD / SDXL / CogVideoX pipeline holding the base model (no LoRA loaded yet). `positive`
    (eta) and `negative` (delta) are LoRA files/folders or, for UNet pipelines, UNet folders (taken as their
    difference to `pipe.unet`). A positive LoRA is loaded with `pipe.load_lora_weights` (its text-encoder part,
    if any, then serves both prompts). `force_two_calls` builds the slow path even for LoRAs (reference and
    benchmarks). Undo with `detach_negative_guidance(pipe)`.
    """
    denoiser = pipeline_denoiser(pipe)
    base = getattr(pipe, denoiser.attribute)
    if isinstance(base, GuidedDenoiser):
        raise UserError("negative guidance is already attached to this pipeline; detach it first")
    if getattr(base, "peft_config", None):
        raise UserError(
            f"the pipeline's {denoiser.shown} already has LoRA adapters; pass the positive LoRA as positive="
            f"{denoiser.lora_hint} so both branches are composed from it, or fuse it first (pipe.fuse_lora(); "
            "pipe.unload_lora_weights())"
        )
    eta, delta = as_offset(positive), as_offset(negative)
    if delta is None and eta is None:
        raise UserError("negative guidance needs a negative model (delta) or a positive offset (eta)")
    if not denoiser.full_offsets:
        for offset in (eta, delta):
            if offset is not None and not offset.is_lora:
                raise UserError(f"{offset.path!r} is a full model folder; guidance on a {denoiser.shown} composes LoRA "
                                "offsets only (train the negative model with train_mode=lora, or make a LoRA of it "
                                "with `diffalign extract-lora`)")
    alpha, beta = float(alpha), float(beta)
    lora_only = all(o is None or o.is_lora for o in (eta, delta))
    info = GuidanceInfo(
        fast=lora_only and not force_two_calls,
        calls_per_step=denoiser.fast_calls if lora_only and not force_two_calls else 2,
        positive=eta.path if eta else None,
        negative=delta.path if delta else None,
        alpha=alpha,
        beta=beta,
    )
    if info.fast:
        # The positive LoRA is folded into the base weights (a fused LoRA: the positive half of the batch runs the
        # plain model, as plain CFG with a fused LoRA would), so only the negative half carries an adapter: the
        # remainder `(alpha-1)*eta + beta*delta`, rank r_eta + r_delta (r_delta alone when alpha == 1).
        terms = []
        folded: dict = {}
        if eta is not None:
            pos_name = load_lora_into_pipeline(pipe, eta.path, adapter_name=POS_ADAPTER)
            eta_factors = lora_factors(base, pos_name)
            if eta_factors:
                folded = fold_adapter(base, pos_name)
                base.delete_adapters([pos_name])
            if alpha != 1.0:
                terms.append((alpha - 1.0, eta_factors))
        if delta is not None:
            terms.append((beta, read_lora(base, type(pipe), delta.path)))
        info.rank = 0
        if terms:
            factors, rank = compose_lora_factors(terms)
            add_factor_adapter(base, NEG_ADAPTER, factors, rank)
            info.rank = rank
        info.positive_folded = bool(folded)
        base.eval()
        wrapper = denoiser.wrap(pipe, base, None, BASE)
        wrapper._folded = [folded]  # the base weights before folding, restored on detach
        logger.info("NPO guidance: fast path, one batched %s call per step (positive LoRA folded into the weights: "
                    "%s, negative LoRA rank %d)", denoiser.shown, "yes" if folded else "no", info.rank)
    else:
        negative_model = compose_dense_unet(base, type(pipe), eta, delta, alpha, beta).eval()
        if eta is None:
            positive_model = base
        elif eta.is_lora:
            load_lora_into_pipeline(pipe, eta.path, adapter_name=POS_ADAPTER)
            positive_model = base
        else:
            positive_model = load_unet(eta.path, dtype=base.dtype).to(base.device).eval()
        wrapper = denoiser.wrap(pipe, positive_model, negative_model)
        wrapper._base = [base]  # kept outside the module tree, to restore on detach
        logger.warning(
            "NPO guidance: two-call path (an offset is a full model, or forced): a second %s is held in memory and "
            "each step makes two %s calls; `diffalign extract-lora` makes a LoRA of it for the one-call fast path",
            denoiser.shown, denoiser.shown,
        )
    _install(pipe, denoiser, wrapper)
    pipe._npo_guidance = info
    return info


def detach_negative_guidance(pipe: DiffusionPipeline) -> None:
    """Restore the pipeline's own denoiser; the adapters added for guidance are removed."""
    denoiser = pipeline_denoiser(pipe)
    wrapper = getattr(pipe, denoiser.attribute)
    if not isinstance(wrapper, GuidedDenoiser):
        return
    base = wrapper.__dict__.get("_base", [wrapper.positive])[0]
    folded = wrapper.__dict__.get("_folded", [None])[0]
    if folded:
        unfold_weights(base, folded)
    _install(pipe, denoiser, base)
    denoiser.unwrap(pipe)
    if NEG_ADAPTER in (getattr(base, "peft_config", None) or {}):
        base.delete_adapters([NEG_ADAPTER])
    if any(POS_ADAPTER in names for names in pipe.get_list_adapters().values()):
        pipe.delete_adapters([POS_ADAPTER])
    pipe.__dict__.pop("_npo_guidance", None)


__all__ = ["Denoiser", "FLOW", "FLUX", "TRANSFORMER", "UNET", "attach_negative_guidance", "detach_negative_guidance",
           "pipeline_denoiser"]
