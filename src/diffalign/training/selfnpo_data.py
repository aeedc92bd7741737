"""The data of Self-NPO: prompts (``selfnpo_start: noise``, data-free) or image-caption rows
(``selfnpo_start: images``), and a micro-batch of them encoded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..data import deterministic_rng
from ..data.captions import ImageCaptions, ImageCaptionTransform
from ..data.prompts import read_prompts
from ..models import Conditioning
from .protocol import TrainData

if TYPE_CHECKING:
    from ..models import ModelFamily


@dataclass
class SelfNPOBatch:
    """Captions' conditioning, the matching unconditional one, and (``start="images"``) clean latents."""

    cond: Conditioning
    uncond: Conditioning
    latents: Optional[Tensor] = None

    @property
    def size(self) -> int:
        return len(self.cond)


class PromptItems:
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def item(self, i: int, epoch: int) -> dict:
        return {"caption": self.prompts[i]}


class ImageItems:
    """Image-caption rows, augmented by (seed, epoch, row); None for an image that fails to decode."""

    def __init__(self, data, transform, seed: int):
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self) -> int:
        return len(self.data)

    def item(self, i: int, epoch: int) -> dict | None:
        image = self.data.image(i)
        if image is None:
            return None
        return {"caption": self.data.caption(i), **self.transform(image, deterministic_rng(self.seed, epoch, i))}


def load_selfnpo_data(cfg, resolution: int) -> TrainData:
    """Prompts, or image-caption rows, as ``selfnpo_start`` asks; the summary is the one at load time."""
    if cfg.selfnpo_start == "noise":
        prompts = read_prompts(cfg.dataset_name, cfg.caption_column, split=cfg.dataset_split_name,
                               max_samples=cfg.max_train_samples)
        n_empty = sum(1 for p in prompts if not p.strip())
        summary = f"{len(prompts)} prompts from {cfg.dataset_name!r}" + (f" ({n_empty} empty)" if n_empty else "")
        counts = {"prompts": len(prompts), "empty_prompts": n_empty}
        return TrainData(PromptItems(prompts), lambda: counts, lambda: summary)
    data = ImageCaptions(cfg.dataset_name, image_column=cfg.image_columns[0], caption_column=cfg.caption_column,
                         split=cfg.dataset_split_name, strict=cfg.strict_data, max_samples=cfg.max_train_samples,
                         image_root=cfg.image_root)
    transform = ImageCaptionTransform(resolution, random_flip=cfg.random_flip, center_crop=cfg.center_crop)
    summary = data.summary()
    return TrainData(ImageItems(data, transform, cfg.seed), data.report, lambda: summary)


def make_batch(items: list, family: ModelFamily, resolution: int, uncond1, with_latents: bool):
    """Encode captions (and images) of a micro-batch; the unconditional branch shares the SDXL time ids.
    None when no item is usable."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    n = len(items)
    cond = family.encode_prompts([it["caption"] for it in items])
    size = (resolution, resolution)
    originals = [it.get("original_size", size) for it in items]
    crops = [it.get("crop_top_left", (0, 0)) for it in items]
    time_ids = family.time_ids(originals, crops, size)
    if time_ids is not None:
        cond = cond.replace(time_ids=time_ids.to(family.device))
    uncond = uncond1.repeat(n).replace(time_ids=cond.time_ids)
    latents = None
    if with_latents:
        pixels = torch.stack([it["pixels"] for it in items]).to(family.device)
        latents = family.encode_images(pixels)
    return SelfNPOBatch(cond, uncond, latents)


__all__ = ["ImageItems", "PromptItems", "load_selfnpo_data", "make_batch"]
