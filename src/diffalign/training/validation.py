"""Validation images during training: fixed prompts and seeds, with the trained weights and without them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..models import lora_disabled
from ..models.lora import has_lora

if TYPE_CHECKING:
    from ..models import ModelFamily


def _sample(family: ModelFamily, cfg, resolution: int, net=None) -> np.ndarray:
    pipe = family.make_pipeline(net=net)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(cfg.validation_prompts)
    gens = [torch.Generator().manual_seed(cfg.validation_seed + i) for i in range(len(prompts))]
    if family.is_video:  # clips: first/middle/last frame side by side (models/cogvideox.py)
        with torch.no_grad():
            return family.preview_images(pipe, prompts, gens, resolution=cfg.resolution,
                                         guidance_scale=cfg.validation_guidance_scale,
                                         num_inference_steps=cfg.validation_num_inference_steps)
    with torch.no_grad():
        images = pipe(prompts, height=resolution, width=resolution, guidance_scale=cfg.validation_guidance_scale,
                      num_inference_steps=cfg.validation_num_inference_steps, generator=gens, output_type="np").images
    return (images * 255).round().astype(np.uint8)


def validation_grid(family: ModelFamily, cfg, reference=None) -> Image.Image:
    """Rows: the trained model, then the base model (adapters off, or ``reference``, the frozen reference copy of
    a full fine-tune) when known. The pipelines are built around the network to sample; ``family.unet`` stays the
    trained one."""
    resolution = cfg.resolution or family.default_resolution
    family.unet.eval()
    rows = [_sample(family, cfg, resolution)]
    if has_lora(family.unet):
        with lora_disabled(family.unet):
            rows.append(_sample(family, cfg, resolution))
    elif reference is not None:
        rows.append(_sample(family, cfg, resolution, net=reference))
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    scale = max(1, 256 // resolution)
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image
