"""CogVideoX (THUDM/CogVideoX-2b, -5b): a text-to-video DiT behind the same `ModelFamily` interface.

What differs from the image families, and why the code looks the way it does:

- The denoiser is `CogVideoXTransformer3DModel` (`pipe.transformer`). It is held in the attribute `unet` all the
  same, so the recipes, the Self-NPO teacher and the training loop (which pass it, or a copy of it, to `predict`
  as `net`) run unchanged; `family.transformer` is the readable alias. LoRA files use the `transformer.` key prefix that
  `CogVideoXPipeline.load_lora_weights` reads (`lora.denoiser_component`).
- Latents are 5-D `(B, F', C, H', W')`: frames first, as the transformer takes them. The VAE
  (`AutoencoderKLCogVideoX`) works on `(B, C, F, H, W)`, compresses time 4x (`F' = (F - 1) / 4 + 1`, so a clip has
  `4k + 1` frames) and space 8x, and latents are `z * scaling_factor` (1.15258426 for 2b, 0.7 for 5b).
- Noise maths use the model's own `CogVideoXDDIMScheduler` schedule: it shifts the SNR (`snr_shift_scale`, 3.0 for
  2b) and rescales to zero terminal SNR, so a DDPM built from the same config would train on the wrong `abar_t`.
  CogVideoX predicts v.
- Prompts are T5 hidden states of `max_sequence_length` = 226 tokens, padded, no attention mask, exactly as
  `CogVideoXPipeline._get_t5_prompt_embeds`; the unconditional branch is the encoded "" as the stock pipeline
  does, or all zeros (`zero_unconditional=True`, what CogVideoX itself was trained with).
- 5b uses 3-D rotary positional embeddings computed from the latent size; `predict` builds them the way the
  pipeline's `_prepare_rotary_positional_embeddings` does (with diffusers' own helpers) and caches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .base import Conditioning, ModelFamily, _as_prompt_list, _scalar_config, load_pipeline_vae, weight_dtype
from .source import ModelSource, load_component

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

#: `CogVideoXPipeline.__call__`'s default T5 length; the transformer was trained on 226-token prompts.
MAX_SEQUENCE_LENGTH = 226
LAYOUTS = ("BFCHW", "BCFHW")


def _scheduler_class(name: str | None):
    import diffusers

    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = diffusers.CogVideoXDDIMScheduler
    return cls


class CogVideoXFamily(ModelFamily):
    """CogVideoX adapter over `CogVideoXPipeline` components (see the module docstring)."""

    name = "cogvideox"
    pipeline_class_name = "CogVideoXPipeline"
    required_components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
    denoiser_name = "transformer"
    denoiser_class = "CogVideoXTransformer3DModel"
    is_video = True

    def __init__(self, *, zero_unconditional: bool = False, max_sequence_length: int = MAX_SEQUENCE_LENGTH, **kw):
        super().__init__(**kw)
        self.zero_unconditional = bool(zero_unconditional)
        self.max_sequence_length = int(max_sequence_length)
        cfg = self.transformer.config
        # The clip the pipeline samples by default (49 frames of 480x720 for the released models); training
        # without explicit sizes uses it too. Plain attributes: set them to train at another size.
        self.num_frames = int(cfg.sample_frames)
        self.height = int(cfg.sample_height) * self.vae_scale_factor
        self.width = int(cfg.sample_width) * self.vae_scale_factor
        self._rotary_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def _load(cls, source: ModelSource, vae, dtype: torch.dtype, variant: str | None) -> "CogVideoXFamily":
        import transformers
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

        kw = dict(local_files_only=source.local_files_only)
        shown = source.path
        transformer = load_component(
            CogVideoXTransformer3DModel.from_pretrained, "transformer", shown, source.path, subfolder="transformer",
            variant=variant, dtype=dtype, **kw,
        )
        if vae.path is None:
            vae_module = load_pipeline_vae(AutoencoderKLCogVideoX, source, dtype, variant)
        else:  # a separate video VAE folder (config.json of an AutoencoderKLCogVideoX)
            vae_module = load_component(AutoencoderKLCogVideoX.from_pretrained, "VAE", str(vae.path), str(vae.path),
                                        dtype=dtype)
        # The tokenizer class model_index.json names (T5Tokenizer); T5EncoderModel for the encoder.
        tok_name = source.model_index.get("tokenizer", [None, "T5Tokenizer"])[1]
        tok_cls = getattr(transformers, str(tok_name), None) or transformers.AutoTokenizer
        tokenizer = load_component(tok_cls.from_pretrained, "tokenizer", shown, source.path, subfolder="tokenizer", **kw)
        text_encoder = load_component(
            transformers.T5EncoderModel.from_pretrained, "text_encoder", shown, source.path, subfolder="text_encoder",
            variant=variant, dtype=dtype, **kw,
        )
        sched_cls = _scheduler_class(source.model_index.get("scheduler", [None, None])[1])
        scheduler = load_component(sched_cls.from_pretrained, "scheduler", shown, source.path, subfolder="scheduler", **kw)
        return cls(
            unet=transformer,
            vae=vae_module,
            noise_scheduler=sched_cls.from_config(scheduler.config),
            scheduler=scheduler,
            text_encoders=[text_encoder],
            tokenizers=[tokenizer],
            pipeline_config=_scalar_config(source.model_index),
        )

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline, **kw) -> "CogVideoXFamily":
        return cls(
            unet=pipe.transformer,
            vae=pipe.vae,
            # Its own class, not DDPM: the SNR shift and zero terminal SNR live in the CogVideoX schedulers.
            noise_scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
            scheduler=pipe.scheduler,
            text_encoders=[pipe.text_encoder],
            tokenizers=[pipe.tokenizer],
            pipeline_config=_scalar_config(pipe.config),
            **kw,
        )

    # ---------------------------------------------------------------------------------------------- basics
    @property
    def transformer(self):
        return self.unet

    @property
    def temporal_compression(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    @property
    def default_resolution(self) -> int:
        """The native height (480 for the released models); `height`/`width` hold the full native size."""
        return self.height

    def latent_frames(self, num_frames: int) -> int:
        k = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % k:
            raise UserError(f"CogVideoX clips need {k}k+1 frames (1, {k + 1}, {2 * k + 1}, ..., 49), got {num_frames}")
        return (num_frames - 1) // k + 1

    def latent_shape(self, resolution: int | None = None, num_frames: int | None = None) -> tuple[int, ...]:
        """Per-sample latent shape (F', C, H', W'): `resolution` gives a square clip, None the native size."""
        height, width = (resolution, resolution) if resolution else (self.height, self.width)
        f = self.vae_scale_factor
        if height % f or width % f:
            raise UserError(f"video height and width must be multiples of {f}, got {height}x{width}")
        frames = self.latent_frames(num_frames or self.num_frames)
        return (frames, int(self.bare_unet.config.in_channels), height // f, width // f)

    # --------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> Conditioning:
        """T5 hidden states as `CogVideoXPipeline.encode_prompt` makes them (226 tokens, padded, no mask)."""
        prompts = _as_prompt_list(prompts)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids
        hidden = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return Conditioning(prompt_embeds=hidden.to(self.device, self.dtype))

    def unconditional(self, n: int) -> Conditioning:
        """The encoded "" (the stock pipeline's negative branch), or zeros with `zero_unconditional`."""
        cond = self.encode_prompts([""] * n)
        if self.zero_unconditional:
            cond = cond.replace(prompt_embeds=torch.zeros_like(cond.prompt_embeds))
        return cond

    # ---------------------------------------------------------------------------------------------- videos
    def _as_bcfhw(self, videos: Tensor, layout: str | None) -> Tensor:
        if videos.ndim != 5:
            raise UserError(f"videos must be 5-D (B, F, 3, H, W) or (B, 3, F, H, W), got shape {tuple(videos.shape)}")
        if layout is None:
            frames_first, channels_first = videos.shape[2] == 3, videos.shape[1] == 3
            if frames_first and channels_first:
                raise UserError(f"videos of shape {tuple(videos.shape)} are ambiguous (3 frames or 3 channels?); "
                                "pass layout='BFCHW' or 'BCFHW'")
            if not (frames_first or channels_first):
                raise UserError(f"videos must have 3 colour channels at dim 1 or 2, got shape {tuple(videos.shape)}")
            layout = "BFCHW" if frames_first else "BCFHW"
        if layout not in LAYOUTS:
            raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        out = videos.permute(0, 2, 1, 3, 4) if layout == "BFCHW" else videos
        if out.shape[1] != 3:
            raise UserError(f"layout {layout} puts {out.shape[1]} channels where 3 are needed ({tuple(videos.shape)})")
        return out

    def encode_videos(
        self, videos: Tensor, chunk_size: int = 1, *, layout: str | None = None, sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Pixels in [-1, 1], (B, F, 3, H, W) or (B, 3, F, H, W) -> latents (B, F', C, H', W') * scaling_factor.

        `chunk_size` videos go through the VAE at a time (it is the memory peak: 49 frames of 480x720 take
        gigabytes of activations; `vae.enable_tiling()` / `enable_slicing()` cut that further). The posterior
        mean by default (deterministic, cacheable); a sample when `sample=True` or a generator is given.
        """
        x = self._as_bcfhw(videos, layout)
        self.latent_frames(x.shape[2])
        if x.shape[-1] % self.vae_scale_factor or x.shape[-2] % self.vae_scale_factor:
            raise UserError(f"video height and width must be multiples of {self.vae_scale_factor}, got "
                            f"{x.shape[-2]}x{x.shape[-1]}")
        sample = sample or generator is not None
        vae_param = next(self.vae.parameters())
        out = []
        with torch.no_grad():
            for chunk in x.split(max(1, int(chunk_size))):
                dist = self.vae.encode(chunk.to(vae_param.device, vae_param.dtype)).latent_dist
                z = dist.sample(generator=generator) if sample else dist.mean
                out.append((z * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4))
        return torch.cat(out).to(self.dtype)

    def encode_images(self, images: Tensor, chunk_size: int = 1, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
        """Videos (5-D, see `encode_videos`) or images [N, 3, H, W] as one-frame clips -> 5-D latents.

        The training loop calls `encode_images` on whatever pixels the data gives them, so video pairs and
        image pairs both work here.
        """
        if images.ndim == 4:
            images = images.unsqueeze(1)
        return self.encode_videos(images, chunk_size, sample=sample, generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, chunk_size: int = 1) -> Tensor:
        """Latents (B, F', C, H', W') -> videos (B, F, 3, H, W) in [-1, 1], as `CogVideoXPipeline.decode_latents`."""
        if latents.ndim != 5:
            raise UserError(f"CogVideoX latents are (B, F', C, H', W'), got shape {tuple(latents.shape)}")
        vae_param = next(self.vae.parameters())
        out = []
        for chunk in latents.split(max(1, int(chunk_size))):
            z = chunk.permute(0, 2, 1, 3, 4).to(vae_param.device, vae_param.dtype) / self.vae.config.scaling_factor
            out.append(self.vae.decode(z).sample.permute(0, 2, 1, 3, 4))
        return torch.cat(out).clamp(-1, 1)

    # ------------------------------------------------------------------------------------------ prediction
    def rotary_embeddings(self, latent_frames: int, latent_height: int, latent_width: int, device) -> tuple | None:
        """(cos, sin) 3-D rotary embeddings for a latent grid, or None when the model uses sinusoidal ones."""
        cfg = self.bare_unet.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        key = (latent_frames, latent_height, latent_width, str(device))
        if key not in self._rotary_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p, p_t = cfg.patch_size, cfg.patch_size_t
            grid = (latent_height // p, latent_width // p)
            base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
            if p_t is None:  # CogVideoX 1.0: the grid is placed inside the base grid, as the pipeline does
                crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
                emb = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=grid,
                                              temporal_size=latent_frames, device=device)
            else:  # CogVideoX 1.5: frames patched in pairs, "slice" grid
                emb = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                              temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                              max_size=(base_h, base_w), device=device)
            self._rotary_cache[key] = emb
        return self._rotary_cache[key]

    def predict(self, x_t: Tensor, t: Tensor | int, cond: Conditioning, *, net=None, **kwargs: Any) -> Tensor:
        """The transformer's raw output (v for the released models) for latents (B, F', C, H', W'); `net` as in
        `ModelFamily.predict` (the family's own transformer when None)."""
        net = self.unet if net is None else net
        if x_t.ndim != 5:
            raise UserError(f"CogVideoX latents are (B, F', C, H', W'), got shape {tuple(x_t.shape)}")
        p_t = self.bare_unet.config.patch_size_t
        if p_t is not None and x_t.shape[1] % p_t:
            raise UserError(f"this CogVideoX patches {p_t} latent frames together; got {x_t.shape[1]} latent frames")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        cond = cond.to(x_t.device, weight_dtype(net))
        kwargs.setdefault("image_rotary_emb", self.rotary_embeddings(x_t.shape[1], x_t.shape[3], x_t.shape[4],
                                                                     x_t.device))
        return net(hidden_states=x_t, encoder_hidden_states=cond.prompt_embeds, timestep=t, return_dict=False,
                         **kwargs)[0]

    # ------------------------------------------------------------------------------------------ generation
    def pipeline_components(self) -> dict[str, Any]:
        return dict(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, transformer=self.unet)

    def preview_images(self, pipe: DiffusionPipeline, prompts: Sequence[str], generators, *, resolution: int | None = None,
                       guidance_scale: float = 6.0, num_inference_steps: int = 50) -> np.ndarray:
        """uint8 (N, H, 3W, 3): first, middle and last frame of each prompt's clip side by side (validation grids)."""
        height, width = (resolution, resolution) if resolution else (self.height, self.width)
        frames = pipe(list(prompts), height=height, width=width, num_frames=self.num_frames,
                      guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generators,
                      output_type="np").frames
        frames = np.asarray(frames)  # (N, F, H, W, 3) in [0, 1]
        picks = sorted({0, frames.shape[1] // 2, frames.shape[1] - 1})
        strip = np.concatenate([frames[:, i] for i in picks], axis=2)
        return (strip * 255).round().astype(np.uint8)


__all__ = ["CogVideoXFamily", "LAYOUTS", "MAX_SEQUENCE_LENGTH"]
