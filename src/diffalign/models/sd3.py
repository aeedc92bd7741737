"""Stable Diffusion 3 / 3.5: an MMDiT (`SD3Transformer2DModel`) trained by flow matching (models/flow.py).

Prompts are encoded exactly as `StableDiffusion3Pipeline.encode_prompt` does (clip_skip None): the penultimate
hidden states of CLIP-L and CLIP-G concatenated on the feature axis and zero-padded to T5's width, followed by
the T5 hidden states (`max_sequence_length` tokens, 256 by default) along the sequence; the pooled embedding is
the projected CLIP-L and CLIP-G embeddings concatenated (`Conditioning.text_embeds`, the transformer's
`pooled_projections`). Latents are `(z - shift_factor) * scaling_factor` (1.5305 and 0.0609 for SD3/3.5's VAE),
which `ModelFamily.encode_images` already does. The transformer takes `timestep = sigma * 1000`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .base import Conditioning, _as_prompt_list, weight_dtype
from .flow import FlowFamily, flow_components
from .sd import _tokenize

if TYPE_CHECKING:
    pass

#: `StableDiffusion3Pipeline.__call__`'s default T5 length.
SD3_MAX_SEQUENCE_LENGTH = 256


# (encoder subfolder, tokenizer subfolder, default encoder class) of the pipeline folder
SD3_TEXT_STACK = (
    ("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
    ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
    ("text_encoder_3", "tokenizer_3", "T5EncoderModel"),
)


class SD3Family(FlowFamily):
    """SD3 / SD3.5 adapter over `StableDiffusion3Pipeline` components (see the module docstring)."""

    TEXT_STACK = SD3_TEXT_STACK
    denoiser_class = "SD3Transformer2DModel"

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    required_components = flow_components(SD3_TEXT_STACK)
    timestep_scale = 1000.0

    def __init__(self, *, max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH, **kw):
        super().__init__(**kw)
        self.max_sequence_length = int(max_sequence_length)

    # --------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> Conditioning:
        """(prompt_embeds [B, 77 + L_t5, D_t5], pooled [B, P_L + P_G]) as the stock pipeline makes them."""
        prompts = _as_prompt_list(prompts)
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = _tokenize(tokenizer, prompts).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(prompts)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(prompt_embeds=torch.cat([clip.to(t5.dtype), t5], dim=-2).to(self.device, self.dtype),
                            text_embeds=torch.cat(pooled, dim=-1).to(self.device, self.dtype))

    def _t5(self, prompts: list[str]) -> Tensor:
        tokenizer, encoder = self.tokenizers[2], self.text_encoders[2]
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0]

    # ------------------------------------------------------------------------------------------ prediction
    def predict(self, x_t: Tensor, t: Tensor | int, cond: Conditioning, *, net=None, **kwargs: Any) -> Tensor:
        """The transformer's velocity for latents [B, C, H, W] at integer training timesteps `t`."""
        net = self.unet if net is None else net
        if cond.text_embeds is None:
            raise ValueError("SD3 conditioning needs text_embeds (the pooled embedding); use encode_prompts()")
        cond = cond.to(x_t.device, weight_dtype(net))
        timestep = self.model_timesteps(t, x_t)
        return net(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                   pooled_projections=cond.text_embeds, return_dict=False, **kwargs)[0]

    def pipeline_components(self) -> dict[str, Any]:
        return dict(transformer=self.unet, vae=self.vae,
                    text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                    text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1],
                    text_encoder_3=self.text_encoders[2], tokenizer_3=self.tokenizers[2])


__all__ = ["SD3Family", "SD3_MAX_SEQUENCE_LENGTH"]
