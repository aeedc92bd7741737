"""The one interface every model family implements, and the maths they share.

Training recipes (DPO, MaPO, Self-NPO, SFT) only talk to `ModelFamily`: encode prompts and images, predict with
a given network (`predict(..., net=...)`), and the family's noise schedule (`schedule`) to noise a latent, ask for
the regression target and turn a prediction back into an x0 estimate. Everything that differs between SD1.x/2.x,
SDXL and CogVideoX - text encoders, pooled embeddings, micro-conditioning, the pipeline class used to save LoRAs -
lives in the subclass, so a recipe never branches on the family.

Noise maths (models/schedule.py, docs/methods.md#conventions-shared-by-every-method): `x_t = a_t x0 + s_t eps`
with `a_t = sqrt(abar_t)`, `s_t = sqrt(1 - abar_t)`, target `eps` (epsilon) or `v = a_t eps - s_t x0`
(v-prediction), read from the scheduler config.
"""

from __future__ import annotations

import abc
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from . import lora as _lora
from .conditioning import Conditioning
from .schedule import NoiseSchedule
from .source import ModelSource, VaeRequest, load_component, resolve_source

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_HALF = (torch.float16, torch.bfloat16)


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt (use '' for the unconditional one)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


def bare_module(net):
    """The module inside DDP / FSDP wrappers (`.module`), or `net` itself."""
    while not hasattr(net, "config") and isinstance(getattr(net, "module", None), torch.nn.Module):
        net = net.module
    return net


def weight_dtype(net) -> torch.dtype:
    """The dtype of a network's first floating weight (through DDP / FSDP wrappers). diffusers' `unet.dtype` walks
    every submodule looking for casting hooks on each call: ~4% of a toy training step, which asks several times
    (issue 8 profile)."""
    net = bare_module(net)
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), None) or net.dtype


def _scalar_config(config) -> dict[str, Any]:
    """Pipeline-level options of a model_index/pipe.config (e.g. force_zeros_for_empty_prompt), not components."""
    return {k: v for k, v in dict(config).items() if not isinstance(v, (list, tuple))}


def load_pipeline_vae(vae_cls, source: ModelSource, dtype: torch.dtype, variant: str | None):
    """The pipeline folder's own `vae/` as `vae_cls`, in `dtype`, except float32 when a half dtype is asked and
    its config says `force_upcast` (SDXL's VAE overflows in fp16)."""
    kw = dict(local_files_only=source.local_files_only)
    vae_dtype = dtype
    if dtype in _HALF:
        config = load_component(vae_cls.load_config, "vae", source.path, source.path, subfolder="vae", **kw)
        if config.get("force_upcast", False):
            vae_dtype = torch.float32
    return load_component(vae_cls.from_pretrained, "vae", source.path, source.path, subfolder="vae", variant=variant,
                          dtype=vae_dtype, **kw)


class ModelFamily(abc.ABC):
    """One diffusion model family behind the interface the training recipes use (see module docstring).

    Holds the UNet (the only trainable part), the frozen VAE and text encoders, a DDPM `noise_scheduler` for
    training maths and the pipeline's own `scheduler` for sampling with `make_pipeline()`.
    """

    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    #: model_index.json entries this family needs; checked before loading so a wrong family fails clearly.
    required_components: ClassVar[tuple[str, ...]] = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    #: The denoiser's pipeline component name ("transformer" for DiT families such as CogVideoX). The module itself
    #: is always held in `self.unet`, so recipes and loops never branch on it; this names folders and LoRA prefixes.
    denoiser_name: ClassVar[str] = "unet"
    #: The denoiser's diffusers class: what loads `denoiser_name/` of a pipeline or of a full fine-tune's run folder.
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    #: Video families have 5-D latents (B, F', C, H', W') and clips of frames instead of images.
    is_video: ClassVar[bool] = False

    def __init__(self, *, unet, vae, noise_scheduler, scheduler, text_encoders, tokenizers, pipeline_config=None):
        self.unet = unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.scheduler = scheduler
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers)
        self.pipeline_config = dict(pipeline_config or {})
        # Only the UNet is ever trained; freezing here means a recipe cannot train the VAE by accident.
        for module in (self.vae, *self.text_encoders):
            module.requires_grad_(False)
            module.eval()

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        pretrained_vae_model_name_or_path: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        variant: str | None = None,
    ) -> "ModelFamily":
        """Load the components of a diffusers pipeline folder or hub id (never with remote code).

        A separate VAE (e.g. SDXL's fp16-fixed VAE) can be given. When none is given and the VAE asks for
        `force_upcast` (SDXL's does: it overflows in fp16), the VAE stays in float32 as the diffusers scripts do.
        """
        source = resolve_source(pretrained_model_name_or_path)
        missing = [c for c in cls.required_components if not source.has_component(c)]
        if missing:
            raise UserError(
                f"{source.path!r} ({source.class_name or 'unknown pipeline'}) has no {', '.join(missing)}, "
                f"which the {cls.name!r} family needs; check the path or pass the right family"
            )
        family = cls._load(source, VaeRequest(pretrained_vae_model_name_or_path), dtype, variant)
        return family.to(device)

    @classmethod
    @abc.abstractmethod
    def _load(cls, source: ModelSource, vae: "VaeRequest", dtype: torch.dtype, variant: str | None) -> "ModelFamily":
        """Build the family from a resolved source (subclasses load their text encoders)."""

    @classmethod
    @abc.abstractmethod
    def from_pipeline(cls, pipe: DiffusionPipeline) -> "ModelFamily":
        """Wrap the components of an in-memory diffusers pipeline (modules are shared, not copied)."""

    @classmethod
    def _from_unet_pipeline(cls, pipe: DiffusionPipeline, text_encoders: list, tokenizers: list) -> "ModelFamily":
        """`from_pipeline` of a UNet pipeline (SD, SDXL): its modules shared, a DDPM noise scheduler from its
        scheduler config for the training maths, its own scheduler kept for sampling."""
        from diffusers import DDPMScheduler

        return cls(unet=pipe.unet, vae=pipe.vae, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                   scheduler=pipe.scheduler, text_encoders=text_encoders, tokenizers=tokenizers,
                   pipeline_config=_scalar_config(pipe.config))

    @staticmethod
    def _load_common(source: ModelSource, vae_request: "VaeRequest", dtype: torch.dtype, variant: str | None) -> dict:
        import diffusers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        kw = dict(local_files_only=source.local_files_only)
        shown = source.path
        unet = load_component(
            UNet2DConditionModel.from_pretrained, "unet", shown, source.path, subfolder="unet", variant=variant,
            dtype=dtype, **kw,
        )
        vae = load_pipeline_vae(AutoencoderKL, source, dtype, variant) if vae_request.path is None else vae_request.load(dtype)
        # Training noise maths use DDPM (as the diffusers training scripts do): its add_noise is the closed form,
        # unlike e.g. Euler's sigma-based one. The pipeline's own scheduler is kept for sampling.
        noise_scheduler = load_component(
            DDPMScheduler.from_pretrained, "scheduler", shown, source.path, subfolder="scheduler", **kw
        )
        scheduler_cls = getattr(diffusers, str(source.model_index["scheduler"][1]), None)
        if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, diffusers.SchedulerMixin)):
            scheduler_cls = DDPMScheduler
        # Loaded from its own file: from_config(ddpm.config) would drop options DDPM lacks (set_alpha_to_one).
        scheduler = load_component(
            scheduler_cls.from_pretrained, "scheduler", shown, source.path, subfolder="scheduler", **kw
        )
        pipeline_config = _scalar_config(source.model_index)
        return dict(
            unet=unet,
            vae=vae,
            noise_scheduler=noise_scheduler,
            scheduler=scheduler,
            pipeline_config=pipeline_config,
        )

    def to(self, device: torch.device | str) -> "ModelFamily":
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
        return self

    # ---------------------------------------------------------------------------------------------- basics
    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.unet)

    @property
    def device(self) -> torch.device:
        return self.bare_unet.device

    @property
    def bare_unet(self):
        """The UNet itself, also when `self.unet` was given in a DDP / FSDP wrapper (`.module`)."""
        return bare_module(self.unet)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t for t = 0..T-1 (float32, CPU): the only schedule quantity the training maths need."""
        return self.noise_scheduler.alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """Pixel size the pipeline samples at by default (UNet sample size times the VAE factor)."""
        return int(self.bare_unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, resolution: int | None = None) -> tuple[int, ...]:
        """Per-sample latent shape, e.g. for sampling pure noise: (C, H/f, W/f) here, (F', C, H', W') for video."""
        side = (resolution or self.default_resolution) // self.vae_scale_factor
        return (int(self.bare_unet.config.in_channels), side, side)

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    # --------------------------------------------------------------------------------------------- prompts
    @abc.abstractmethod
    def encode_prompts(self, prompts: str | Sequence[str]) -> Conditioning:
        """Encode prompts exactly as the family's diffusers pipeline does ('' gives the empty-prompt embedding)."""

    def unconditional(self, n: int) -> Conditioning:
        """What the stock pipeline uses for the unconditional CFG branch when no negative prompt is given."""
        return self.encode_prompts([""] * n)

    def time_ids(self, original_sizes, crop_top_lefts=None, target_size=None) -> Tensor | None:
        """Micro-conditioning ids; families without it (SD) ignore sizes and return None."""
        return None

    def _added_cond_kwargs(self, cond: Conditioning, batch: int) -> dict | None:
        return None

    # ---------------------------------------------------------------------------------------------- images
    def encode_images(
        self, images: Tensor, chunk_size: int = 8, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Pixels [N,3,H,W] in [-1,1] -> scaled latents, `chunk_size` images at a time (the VAE is the memory peak).

        The posterior mean by default (deterministic, cacheable); a sample when `sample=True` or a generator is
        given. Latents are `(z - shift_factor) * scaling_factor`, the convention the UNet was trained on.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects [N,3,H,W] images, got shape {tuple(images.shape)}")
        sample = sample or generator is not None
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        vae_param = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for chunk in images.split(max(1, int(chunk_size))):
                dist = self.vae.encode(chunk.to(vae_param.device, vae_param.dtype)).latent_dist
                z = dist.sample(generator=generator) if sample else dist.mean
                out.append((z - shift) * cfg.scaling_factor)
        return torch.cat(out).to(self.dtype)

    def decode_latents(self, latents: Tensor, chunk_size: int = 8) -> Tensor:
        """Scaled latents -> pixels in [-1,1] (clamped, as the pipeline's post-processing clamps)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        vae_param = next(self.vae.parameters())
        out = []
        for chunk in latents.split(max(1, int(chunk_size))):
            z = chunk.to(vae_param.device, vae_param.dtype) / cfg.scaling_factor + shift
            out.append(self.vae.decode(z, return_dict=False)[0])
        return torch.cat(out).clamp(-1, 1)

    # ------------------------------------------------------------------------------------------ noise maths
    @property
    def schedule(self) -> NoiseSchedule:
        """The training noise maths (models/schedule.py) of this family's scheduler: what the recipes use."""
        return NoiseSchedule(self.alphas_cumprod, self.prediction_type)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """x_t = a_t x0 + s_t eps (forward process, docs/methods.md#conventions-shared-by-every-method)."""
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The regression target for the family's prediction type: eps, v = a_t eps - s_t x0, or x0."""
        return self.schedule.target(x0, noise, t)

    def pred_x0(self, x_t: Tensor, t: Tensor | int, model_output: Tensor) -> Tensor:
        """x0 estimate from a model output: (x_t - s_t eps)/a_t for epsilon, a_t x_t - s_t v for v-prediction."""
        return self.schedule.pred_x0(x_t, t, model_output)

    def predict(self, x_t: Tensor, t: Tensor | int, cond: Conditioning, *, net=None, **unet_kwargs: Any) -> Tensor:
        """The denoiser's raw output (eps or v) for noisy latents `x_t` at timesteps `t` under `cond`.

        `net` is the network to call: the family's own UNet when None, else e.g. the trained UNet as accelerate
        wrapped it, a frozen reference copy or an EMA teacher. It is an argument, never swapped into `self.unet`,
        so an exception inside the call cannot leave another network in the family. `cond` is cast to the dtype
        of the network called.
        """
        net = self.unet if net is None else net
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        cond = cond.to(x_t.device, weight_dtype(net))
        return net(
            x_t,
            t,
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs=self._added_cond_kwargs(cond, x_t.shape[0]),
            return_dict=False,
            **unet_kwargs,
        )[0]

    # -------------------------------------------------------------------------------------- training modes
    def add_lora(
        self,
        rank: int,
        alpha: float | None = None,
        target_modules: Sequence[str] = _lora.DEFAULT_TARGET_MODULES,
        adapter_name: str = "default",
        dropout: float = 0.0,
    ) -> None:
        """Add a trainable LoRA (peft) to the UNet; the base weights are frozen. See `lora.add_lora`."""
        _lora.add_lora(self.unet, rank, alpha, target_modules, adapter_name, dropout)

    def save_lora(self, out_dir: str | os.PathLike, adapter_name: str = "default", state_dict: dict | None = None) -> Path:
        """Write `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(out_dir)` reads (`state_dict`: the
        UNet's weights gathered from its shards, when it is sharded)."""
        return _lora.save_lora(self.unet, self.pipeline_class, out_dir, adapter_name, state_dict=state_dict)

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default", trainable: bool = False) -> str:
        """Load a LoRA file (or folder holding one) into this UNet; returns the adapter name."""
        return _lora.load_lora_into_unet(self.unet, self.pipeline_class, path, adapter_name, trainable)

    def lora_disabled(self) -> AbstractContextManager:
        """Context in which the UNet runs without its adapters: the LoRA-DPO reference model."""
        return _lora.lora_disabled(self.unet)

    def enable_full_finetune(self, upcast: bool = True) -> None:
        """Make every UNet weight trainable (text encoders and VAE stay frozen).

        With `upcast`, a half-precision UNet is moved to float32 first: mixed-precision training needs float32
        master weights (the diffusers scripts refuse to fine-tune a half UNet).
        """
        if _lora.has_lora(self.unet):
            raise UserError("the UNet has LoRA adapters: choose either LoRA training or full fine-tuning, not both")
        if upcast and self.unet.dtype in _HALF:
            self.unet.to(torch.float32)
        self.unet.requires_grad_(True)
        for module in (self.vae, *self.text_encoders):
            module.requires_grad_(False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------ generation
    @abc.abstractmethod
    def pipeline_components(self) -> dict[str, Any]:
        """Keyword arguments for the pipeline class built from this family's (shared) modules."""

    def make_pipeline(self, scheduler=None, *, net=None):
        """A stock diffusers pipeline sharing this family's modules (validation images during training); `net`
        in place of the family's own denoiser (e.g. a frozen reference copy), without touching `self.unet`."""
        components = self.pipeline_components()
        components["scheduler"] = scheduler if scheduler is not None else self.scheduler
        if net is not None:
            components[self.denoiser_name] = net
        return self.pipeline_class(**components)
