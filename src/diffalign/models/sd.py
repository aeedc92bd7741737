"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, no micro-conditioning; epsilon or v-prediction.

The prediction type comes from the scheduler config (SD2-768 and our `sd-v` toy use v-prediction), so the same
adapter serves both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from .base import Conditioning, ModelFamily, _as_prompt_list
from .source import ModelSource, load_component

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _tokenize(tokenizer, prompts: list[str]):
    # The pipelines' convention: pad to the model length and truncate (CLIP has a fixed context).
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


class SDFamily(ModelFamily):
    """SD1.x/2.x adapter over `StableDiffusionPipeline` components."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    @classmethod
    def _load(cls, source: ModelSource, vae, dtype: torch.dtype, variant: str | None) -> "SDFamily":
        from transformers import CLIPTextModel, CLIPTokenizer

        common = cls._load_common(source, vae, dtype, variant)
        kw = dict(local_files_only=source.local_files_only)
        tokenizer = load_component(CLIPTokenizer.from_pretrained, "tokenizer", source.path, source.path,
                                   subfolder="tokenizer", **kw)
        text_encoder = load_component(
            CLIPTextModel.from_pretrained, "text_encoder", source.path, source.path, subfolder="text_encoder", variant=variant,
            dtype=dtype, **kw,
        )
        return cls(text_encoders=[text_encoder], tokenizers=[tokenizer], **common)

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline) -> "SDFamily":
        return cls._from_unet_pipeline(pipe, [pipe.text_encoder], [pipe.tokenizer])

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str]) -> Conditioning:
        """Last hidden state of the CLIP text encoder, as `StableDiffusionPipeline.encode_prompt` (clip_skip=None)."""
        prompts = _as_prompt_list(prompts)
        inputs = _tokenize(self.tokenizer, prompts)
        device = self.text_encoder.device
        mask = inputs.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        hidden = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        return Conditioning(prompt_embeds=hidden.to(self.device, self.dtype))

    def pipeline_components(self) -> dict[str, Any]:
        return dict(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
