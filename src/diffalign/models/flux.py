"""FLUX.1 (dev, schnell): a `FluxTransformer2DModel` trained by flow matching (models/flow.py).

What differs from SD3, as `FluxPipeline` does it:

- prompts: the pooled output of CLIP-L (`Conditioning.text_embeds`, the transformer's `pooled_projections`) and
  the T5 hidden states (`max_sequence_length` tokens, 512 by default) as `encoder_hidden_states`; no CLIP hidden
  states. The text position ids are zeros `[L, 3]`, the image ones `(0, row, col)` per 2x2 patch;
- latents: the family keeps them as `[B, C, H, W]` (16 channels, `(z - 0.1159) * 0.3611` for FLUX's VAE), so the
  latent cache, the losses and Self-NPO see images; `predict` packs them into the 2x2 patch sequence
  `[B, H/2 * W/2, 4C]` the transformer takes and unpacks its output the same way (a per-element loss is the
  same on either layout);
- the transformer takes `timestep = sigma` (it multiplies by 1000 itself);
- FLUX-dev is guidance-distilled (`guidance_embeds`): every call gets the guidance value `training_guidance`
  (1.0 unless the run's `guidance_scale` says otherwise), as the diffusers FLUX training scripts pass it;
- true classifier-free guidance (`true_cfg_scale` with a negative prompt) is what the stock pipeline does with
  a negative prompt; the empty prompt is the unconditional branch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .base import Conditioning, _as_prompt_list, weight_dtype
from .flow import FlowFamily, flow_components

if TYPE_CHECKING:
    pass

#: `FluxPipeline.__call__`'s default T5 length (FLUX-dev; schnell was trained with 256).
FLUX_MAX_SEQUENCE_LENGTH = 512
#: `FluxPipeline.default_sample_size`: 128 latent pixels, 1024 image pixels.
FLUX_SAMPLE_SIZE = 128


def pack_latents(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: each 2x2 patch one token, channels then the 2x2 offsets."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise UserError(f"FLUX latents need an even height and width (2x2 patches), got {h}x{w}")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a latent of h x w."""
    b, n, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Position ids [(h/2)(w/2), 3] of the packed latent: (0, row, col) per patch, as the pipeline makes them."""
    rows = torch.arange(h // 2, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


# (encoder subfolder, tokenizer subfolder, default encoder class) of the pipeline folder
FLUX_TEXT_STACK = (
    ("text_encoder", "tokenizer", "CLIPTextModel"),
    ("text_encoder_2", "tokenizer_2", "T5EncoderModel"),
)


class FluxFamily(FlowFamily):
    """FLUX.1 adapter over `FluxPipeline` components (see the module docstring)."""

    TEXT_STACK = FLUX_TEXT_STACK
    denoiser_class = "FluxTransformer2DModel"

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    required_components = flow_components(FLUX_TEXT_STACK)
    timestep_scale = 1.0

    def __init__(self, *, max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH, training_guidance: float = 1.0, **kw):
        super().__init__(**kw)
        self.max_sequence_length = int(max_sequence_length)
        #: The guidance value a guidance-distilled transformer (FLUX-dev) gets during training (and Self-NPO).
        self.training_guidance = float(training_guidance)

    @property
    def sample_size(self) -> int:
        return FLUX_SAMPLE_SIZE

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.bare_unet.config, "guidance_embeds", False))

    # --------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> Conditioning:
        """T5 hidden states [B, L, D] and CLIP-L's pooled output [B, P], as `FluxPipeline.encode_prompt`."""
        prompts = _as_prompt_list(prompts)
        clip_tok, t5_tok = self.tokenizers
        clip, t5 = self.text_encoders
        ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        ids = t5_tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                     return_tensors="pt").input_ids
        hidden = t5(ids.to(t5.device), output_hidden_states=False)[0]
        return Conditioning(prompt_embeds=hidden.to(self.device, self.dtype),
                            text_embeds=pooled.to(self.device, self.dtype))

    # ------------------------------------------------------------------------------------------ prediction
    def predict(self, x_t: Tensor, t: Tensor | int, cond: Conditioning, *, net=None, **kwargs: Any) -> Tensor:
        """The velocity for latents [B, C, H, W]: packed into 2x2 patches, the transformer called with sigma
        (and the training guidance when it has guidance embeddings), the output unpacked."""
        net = self.unet if net is None else net
        if cond.text_embeds is None:
            raise ValueError("FLUX conditioning needs text_embeds (CLIP's pooled output); use encode_prompts()")
        if x_t.ndim != 4:
            raise UserError(f"FLUX latents are [B, C, H, W], got shape {tuple(x_t.shape)}")
        dtype = weight_dtype(net)
        cond = cond.to(x_t.device, dtype)
        b, _, h, w = x_t.shape
        timestep = self.model_timesteps(t, x_t).to(x_t.dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.training_guidance, device=x_t.device, dtype=torch.float32)
        text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype)
        out = net(hidden_states=pack_latents(x_t), timestep=timestep, guidance=guidance,
                  pooled_projections=cond.text_embeds, encoder_hidden_states=cond.prompt_embeds, txt_ids=text_ids,
                  img_ids=image_ids(h, w, x_t.device, dtype), return_dict=False, **kwargs)[0]
        return unpack_latents(out, h, w)

    def pipeline_components(self) -> dict[str, Any]:
        return dict(transformer=self.unet, vae=self.vae,
                    text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                    text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1])


__all__ = ["FLUX_MAX_SEQUENCE_LENGTH", "FluxFamily", "image_ids", "pack_latents", "unpack_latents"]
