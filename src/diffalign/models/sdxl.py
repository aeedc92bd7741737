"""SDXL: two CLIP text encoders, a pooled embedding and size/crop micro-conditioning (`time_ids`).

The prompt convention must equal `StableDiffusionXLPipeline.encode_prompt`, or a model trained here would be
sampled with embeddings it never saw: penultimate hidden states of both encoders concatenated on the feature
axis, pooled (projected) embedding from encoder 2 only, no attention mask. Time ids are
`(orig_h, orig_w, crop_top, crop_left, target_h, target_w)` per image, as in the SDXL training scripts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from .base import Conditioning, ModelFamily, _as_prompt_list
from .sd import _tokenize
from .source import ModelSource, load_component

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

Size = tuple[int, int]


class SDXLFamily(ModelFamily):
    """SDXL adapter over `StableDiffusionXLPipeline` components."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    required_components = ModelFamily.required_components + ("text_encoder_2", "tokenizer_2")

    @classmethod
    def _load(cls, source: ModelSource, vae, dtype: torch.dtype, variant: str | None) -> "SDXLFamily":
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        common = cls._load_common(source, vae, dtype, variant)
        kw = dict(local_files_only=source.local_files_only)
        shown = source.path
        tokenizers = [
            load_component(CLIPTokenizer.from_pretrained, sub, shown, source.path, subfolder=sub, **kw)
            for sub in ("tokenizer", "tokenizer_2")
        ]
        text_encoders = [
            load_component(model_cls.from_pretrained, sub, shown, source.path, subfolder=sub, variant=variant, dtype=dtype, **kw)
            for model_cls, sub in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
        ]
        return cls(text_encoders=text_encoders, tokenizers=tokenizers, **common)

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline) -> "SDXLFamily":
        return cls._from_unet_pipeline(pipe, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])

    # --------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: str | Sequence[str],
        original_sizes: Sequence[Size] | None = None,
        crop_top_lefts: Sequence[Size] | None = None,
        target_size: Size | Sequence[Size] | None = None,
    ) -> Conditioning:
        """Embeddings as `StableDiffusionXLPipeline.encode_prompt` makes them, plus per-image time ids.

        Sizes default to the pipeline's default resolution, uncropped (what sampling uses).
        """
        prompts = _as_prompt_list(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = _tokenize(tokenizer, prompts).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled embedding
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with projection (text_encoder_2) for the pooled embedding")
        sizes = original_sizes if original_sizes is not None else [(self.default_resolution,) * 2] * len(prompts)
        return Conditioning(
            prompt_embeds=torch.cat(hidden, dim=-1).to(self.device, self.dtype),
            text_embeds=pooled.to(self.device, self.dtype),
            time_ids=self.time_ids(sizes, crop_top_lefts, target_size),
        )

    def unconditional(self, n: int) -> Conditioning:
        """Zeros when the pipeline has `force_zeros_for_empty_prompt` (SDXL base does), else the encoded ''."""
        cond = self.encode_prompts([""] * n)
        if self.pipeline_config.get("force_zeros_for_empty_prompt", True):
            cond = cond.replace(prompt_embeds=torch.zeros_like(cond.prompt_embeds),
                                text_embeds=torch.zeros_like(cond.text_embeds))
        return cond

    def time_ids(
        self,
        original_sizes: Sequence[Size],
        crop_top_lefts: Sequence[Size] | None = None,
        target_size: Size | Sequence[Size] | None = None,
    ) -> Tensor:
        """[B, 6] micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image.

        `crop_top_lefts` defaults to (0, 0); `target_size` is one (h, w) for all or one per image and defaults to
        the pipeline's default resolution.
        """
        n = len(original_sizes)
        crops = list(crop_top_lefts) if crop_top_lefts is not None else [(0, 0)] * n
        if target_size is None:
            targets = [(self.default_resolution,) * 2] * n
        elif len(target_size) == 2 and all(isinstance(v, (int, float)) for v in target_size):
            targets = [tuple(target_size)] * n
        else:
            targets = list(target_size)
        if not (len(crops) == len(targets) == n):
            raise ValueError(f"time_ids: got {n} original sizes, {len(crops)} crops and {len(targets)} target sizes")
        rows = [[*map(float, o), *map(float, c), *map(float, t)] for o, c, t in zip(original_sizes, crops, targets)]
        if any(len(r) != 6 for r in rows):
            raise ValueError("time_ids: every size and crop must be a pair (h, w) / (top, left)")
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    def _added_cond_kwargs(self, cond: Conditioning, batch: int) -> dict:
        if cond.text_embeds is None:
            raise ValueError("SDXL conditioning needs text_embeds (the pooled embedding); use encode_prompts()")
        time_ids = cond.time_ids
        if time_ids is None:
            time_ids = self.time_ids([(self.default_resolution,) * 2] * batch)
        return {"text_embeds": cond.text_embeds, "time_ids": time_ids.to(cond.text_embeds.device, cond.text_embeds.dtype)}

    def pipeline_components(self) -> dict[str, Any]:
        return dict(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            unet=self.unet,
            force_zeros_for_empty_prompt=bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True)),
            add_watermarker=False,
        )
