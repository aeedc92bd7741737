"""Flow matching (rectified flow) maths for SD3 / SD3.5 and FLUX, in the shape the recipes already use.

Conventions (docs/methods.md#flow-matching-sd3-flux): a training timestep is an integer ``k`` in ``0..T-1``
(larger = noisier, as for the diffusion families) and stands for the noise level ``sigma_k`` of the model's
``FlowMatchEulerDiscreteScheduler`` (its training sigmas, shifted by ``shift`` unless the scheduler shifts per
resolution, as FLUX's does; ``sigma_{T-1} = 1`` is pure noise). Then

    x_t = (1 - sigma) x0 + sigma eps,    target  v = eps - x0,    x0_hat = x_t - sigma v.

:class:`FlowSchedule` exposes the same methods as :class:`~.schedule.NoiseSchedule` with ``a_t = 1 - sigma`` and
``s_t = sigma``, so the pair recipes, the Self-NPO teacher (its DDIM step from an x0 estimate IS the Euler step
``x_next = x_t + (sigma_next - sigma_t) v`` on the straight path) and the student run unchanged; only the
re-noising differs (:meth:`FlowSchedule.renoise`). :class:`FlowFamily` is what SD3 and FLUX share.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import UserError
from .base import ModelFamily

FLOW_PREDICTION = "flow"


def training_sigmas(scheduler_config) -> Tensor:
    """``sigma_k`` for k = 0..T-1, ascending (float64, CPU), from a FlowMatchEulerDiscreteScheduler config: the
    scheduler's training sigmas ``(T - j) / T``, shifted ``shift s / (1 + (shift - 1) s)`` unless the scheduler
    shifts dynamically (by resolution, at sampling time only), read from low noise to pure noise."""
    cfg = dict(scheduler_config)
    T = int(cfg.get("num_train_timesteps", 1000))
    sigmas = torch.arange(1, T + 1, dtype=torch.float64) / T  # ascending: 1/T .. 1
    shift = float(cfg.get("shift", 1.0) or 1.0)
    if not cfg.get("use_dynamic_shifting", False):
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


class FlowSchedule:
    """The flow-matching noise maths on ``sigmas`` (ascending, ``[T]``): see the module docstring."""

    prediction_type = FLOW_PREDICTION

    def __init__(self, sigmas: Tensor):
        self.sigmas = sigmas.detach().to("cpu", torch.float64)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def sigma(self, t: Tensor | int, ref: Tensor) -> Tensor:
        """``sigma_t`` per sample, float32, shaped ``[B]`` on ``ref``'s device."""
        t = torch.as_tensor(t).long()
        if t.ndim == 0:
            t = t.expand(ref.shape[0])
        return self.sigmas[t.cpu()].to(device=ref.device, dtype=torch.float32)

    def coeffs(self, t: Tensor | int, ref: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 - sigma_t, sigma_t)`` in float32, shaped to broadcast over ``ref`` ``[B, ...]``."""
        s = self.sigma(t, ref).view((-1,) + (1,) * (ref.ndim - 1))
        return 1.0 - s, s

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """``x_t = (1 - sigma) x0 + sigma eps``, in x0's dtype."""
        a, s = self.coeffs(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The velocity ``eps - x0`` (the same at every sigma)."""
        work = torch.promote_types(x0.dtype, torch.float32)  # half inputs subtract in float32
        return (noise.to(work) - x0.to(work)).to(x0.dtype)

    def pred_x0(self, x_t: Tensor, t: Tensor | int, model_output: Tensor) -> Tensor:
        """``x0_hat = x_t - sigma v``."""
        _, s = self.coeffs(t, x_t)
        out_dtype = torch.promote_types(x_t.dtype, model_output.dtype)
        return (x_t.float() - s * model_output.float()).to(out_dtype)

    def ddim_step(self, x_t: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """One Euler step of the straight-path ODE from ``t`` to ``t_next`` given the x0 estimate at ``x_t``:
        ``v = (x_t - x0_hat) / sigma_t``, ``x_next = x_t + (sigma_next - sigma_t) v`` (equal to the DDIM step with
        ``a = 1 - sigma``, ``s = sigma``: ``(1 - sigma_next) x0_hat + sigma_next eps_hat``)."""
        _, s = self.coeffs(t, x_t)
        _, s_next = self.coeffs(t_next, x_t)
        v = (x_t - x0_hat) / s
        return x_t + (s_next - s) * v

    def renoise(self, x_t: Tensor, t: Tensor, s: Tensor, noise: Tensor) -> Tensor:
        """Move ``x_t`` (level ``sigma_t``) to the noisier level ``sigma_s`` along the straight path::

            x_s = r x_t + sqrt(sigma_s^2 - r^2 sigma_t^2) z,    r = (1 - sigma_s) / (1 - sigma_t)

        If ``x_t = (1 - sigma_t) x0 + sigma_t eps`` then ``x_s = (1 - sigma_s) x0 + (r sigma_t eps + c z)`` whose
        noise part has variance ``r^2 sigma_t^2 + c^2 = sigma_s^2``: the marginal of level ``s``
        (docs/methods.md#self-npo-on-flow-models). ``t``, ``s``: integer ``[B]`` with ``s > t``.
        """
        if noise.shape != x_t.shape:
            raise ValueError(f"noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
        t, s = torch.as_tensor(t).long().cpu(), torch.as_tensor(s).long().cpu()
        if t.shape != (x_t.shape[0],) or s.shape != (x_t.shape[0],):
            raise ValueError(f"t and s must have shape [B] = [{x_t.shape[0]}]")
        if not bool((s > t).all()):
            raise ValueError(f"renoise needs s > t for every sample, got t={t.tolist()} s={s.tolist()}")
        sig_t, sig_s = self.sigmas[t], self.sigmas[s]  # float64; sig_t < 1 since t < s <= T-1
        r = (1 - sig_s) / (1 - sig_t)
        c = (sig_s**2 - (r * sig_t) ** 2).clamp_min(0.0).sqrt()
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        r = r.to(x_t.device, x_t.dtype).view(shape)
        c = c.to(x_t.device, x_t.dtype).view(shape)
        return r * x_t + c * noise


def flow_components(text_stack) -> tuple[str, ...]:
    """The pipeline components a flow family needs: its transformer, VAE and scheduler, and each text encoder of
    `text_stack` ((encoder subfolder, tokenizer subfolder, class) rows) with its tokenizer."""
    return ("transformer", "vae", "scheduler") + tuple(name for encoder, tokenizer, _ in text_stack
                                                        for name in (encoder, tokenizer))


class FlowFamily(ModelFamily):
    """What the flow-matching families (SD3, FLUX) share: a transformer held in ``unet`` (as CogVideoX), the
    FlowMatchEulerDiscreteScheduler's training sigmas as the schedule, and the transformer's timestep input."""

    denoiser_name = "transformer"
    is_flow: ClassVar[bool] = True
    #: What the transformer takes as ``timestep``: sigma * this (SD3: 1000; FLUX: 1, it multiplies by 1000 itself).
    timestep_scale: ClassVar[float] = 1000.0

    TEXT_STACK: ClassVar[tuple] = ()  # (encoder subfolder, tokenizer subfolder, default encoder class) per encoder

    @classmethod
    def _load(cls, source, vae, dtype: torch.dtype, variant: str | None) -> "FlowFamily":
        import diffusers

        common = load_flow_common(source, vae, dtype, variant, getattr(diffusers, cls.denoiser_class))
        tokenizers, encoders = load_text_stack(source, dtype, variant, cls.TEXT_STACK)
        return cls(text_encoders=encoders, tokenizers=tokenizers, **common)

    @classmethod
    def from_pipeline(cls, pipe, **kw) -> "FlowFamily":
        """The components of an in-memory pipeline, shared: its text encoders and tokenizers in TEXT_STACK order,
        a copy of its scheduler for the training maths."""
        from .base import _scalar_config

        return cls(unet=pipe.transformer, vae=pipe.vae,
                   noise_scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config), scheduler=pipe.scheduler,
                   text_encoders=[getattr(pipe, sub) for sub, _, _ in cls.TEXT_STACK],
                   tokenizers=[getattr(pipe, tok) for _, tok, _ in cls.TEXT_STACK],
                   pipeline_config=_scalar_config(pipe.config), **kw)

    @property
    def transformer(self):
        return self.unet

    @property
    def prediction_type(self) -> str:
        return FLOW_PREDICTION

    @property
    def alphas_cumprod(self) -> Tensor:
        raise UserError(f"the {self.name} family is a flow-matching model: it has sigmas, not alphas_cumprod")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.get("num_train_timesteps", 1000))

    @property
    def schedule(self) -> FlowSchedule:
        if getattr(self, "_schedule", None) is None:
            self._schedule = FlowSchedule(training_sigmas(self.noise_scheduler.config))
        return self._schedule

    def model_timesteps(self, t: Tensor | int, ref: Tensor) -> Tensor:
        """The transformer's ``timestep`` input of integer training timesteps ``t`` (per sample, float32)."""
        return self.schedule.sigma(t, ref) * self.timestep_scale

    @property
    def default_resolution(self) -> int:
        return int(self.sample_size) * self.vae_scale_factor

    @property
    def sample_size(self) -> int:
        return int(getattr(self.bare_unet.config, "sample_size", None) or 128)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        side = (resolution or self.default_resolution) // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), side, side)

    def _sched_from(self, scheduler) -> Any:
        return type(scheduler).from_config(scheduler.config)


def load_flow_common(source, vae_request, dtype, variant, transformer_class) -> dict:
    """Transformer, VAE and the FlowMatchEulerDiscreteScheduler of a pipeline folder (text encoders: the family)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from .base import _scalar_config, load_pipeline_vae
    from .source import load_component

    kw = dict(local_files_only=source.local_files_only)
    shown = source.path
    transformer = load_component(transformer_class.from_pretrained, "transformer", shown, source.path,
                                 subfolder="transformer", variant=variant, dtype=dtype, **kw)
    vae = load_pipeline_vae(AutoencoderKL, source, dtype, variant) if vae_request.path is None else vae_request.load(dtype)
    scheduler = load_component(FlowMatchEulerDiscreteScheduler.from_pretrained, "scheduler", shown, source.path,
                               subfolder="scheduler", **kw)
    return dict(unet=transformer, vae=vae, scheduler=scheduler,
                noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
                pipeline_config=_scalar_config(source.model_index))


def load_text_stack(source, dtype, variant, stack) -> tuple[list, list]:
    """(tokenizers, text encoders) of a pipeline folder; `stack` lists (encoder subfolder, tokenizer subfolder,
    default encoder class name). The classes model_index.json names are used (AutoTokenizer / the default when it
    names none that transformers has)."""
    import transformers

    from .source import load_component

    kw = dict(local_files_only=source.local_files_only)
    tokenizers, encoders = [], []
    for sub, tok_sub, default_cls in stack:
        tok_name = source.model_index.get(tok_sub, [None, "AutoTokenizer"])[1]
        tok_cls = getattr(transformers, str(tok_name), None) or transformers.AutoTokenizer
        tokenizers.append(load_component(tok_cls.from_pretrained, tok_sub, source.path, source.path, subfolder=tok_sub,
                                         **kw))
        enc_name = source.model_index.get(sub, [None, default_cls])[1]
        enc_cls = getattr(transformers, str(enc_name), None) or getattr(transformers, default_cls)
        encoders.append(load_component(enc_cls.from_pretrained, sub, source.path, source.path, subfolder=sub,
                                       variant=variant, dtype=dtype, **kw))
    return tokenizers, encoders


__all__ = ["FLOW_PREDICTION", "FlowFamily", "FlowSchedule", "load_flow_common", "load_text_stack", "training_sigmas"]
