"""Thin adapters for rewards that live in their own packages: HPSv2 and ImageReward.

Their packages are imported only when such a reward is built, and they are not core dependencies: both
depend on torchvision (and HPSv2 on open_clip), which on a CPU machine drags in a multi-GB CUDA build of
torch. Install them on purpose with `pip install 'diffalign[hpsv2]'` / `pip install 'diffalign[imagereward]'`.

Both package APIs score a list of images against *one* prompt, so the adapters group images by prompt,
call the package in chunks of `batch_size`, and put the scores back in input order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import UserError
from .base import Reward, check_prompts, images_to_pil
from .registry import register_reward

_WHY_OPTIONAL = ("it is not a core dependency because it pulls torchvision/open_clip and with them a "
                 "multi-GB CUDA build of torch")


def import_optional(module: str, extra: str, reward: str):
    """Import `module`, or raise a UserError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"reward {reward} needs the '{module}' package, which is not importable ({exc}): "
                        f"pip install 'diffalign[{extra}]' ({_WHY_OPTIONAL})") from None


def _as_floats(result, expected: int, reward: str) -> list[float]:
    """A package's answer (a float, a list of floats or of 1-element arrays) -> exactly `expected` floats."""
    values = np.asarray(result, dtype=np.float64).reshape(-1)
    if values.size != expected:
        raise UserError(f"reward {reward}: the package returned {values.size} scores for {expected} images "
                        "(an incompatible version of the package?)")
    return values.tolist()


def score_grouped(images, prompts, batch_size: int, call: Callable[[list, str], object], reward: str) -> torch.Tensor:
    """Call `call(pil_images, prompt)` once per (prompt, chunk of at most batch_size) and reassemble."""
    pils = images_to_pil(images)
    prompts = check_prompts(prompts, len(pils))
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    out = torch.empty(len(pils), dtype=torch.float32)
    for prompt, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            values = _as_floats(call([pils[i] for i in chunk], prompt), len(chunk), reward)
            out[chunk] = torch.tensor(values, dtype=torch.float32)
    return out


class HPSv2Reward(Reward):
    """Human Preference Score v2 (Wu et al. 2023) through the `hpsv2` package: `hpsv2.score(images, prompt,
    hps_version=...)`. The package picks the device itself (CUDA when available)."""

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", checkpoint: str | None = None, batch_size: int = 16):
        self.module = import_optional("hpsv2", "hpsv2", "hpsv2")
        self.version, self.checkpoint, self.batch_size = version, checkpoint, batch_size

    def _call(self, pils: list, prompt: str):
        kwargs = {"hps_version": self.version}
        if self.checkpoint:
            kwargs["cp"] = self.checkpoint  # the package's name for a local checkpoint file
        return self.module.score(pils, prompt, **kwargs)

    def score(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        return score_grouped(images, prompts, self.batch_size, self._call, self.name)


class ImageRewardReward(Reward):
    """ImageReward (Xu et al. 2023) through the `image-reward` package: `RM.load(name_or_path)` then
    `model.score(prompt, images)`."""

    name = "imagereward"

    def __init__(self, name_or_path: str = "ImageReward-v1.0", device=None, batch_size: int = 16):
        module = import_optional("ImageReward", "imagereward", "imagereward")
        device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = module.load(name_or_path, device=device)
        self.batch_size = batch_size

    def score(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        return score_grouped(images, prompts, self.batch_size, lambda pils, p: self.model.score(p, pils), self.name)


@register_reward("hpsv2", options=("version",))
def _hpsv2(path, device=None, batch_size=None, version="v2.1") -> Reward:
    return HPSv2Reward(version=version, checkpoint=path, batch_size=batch_size or 16)


@register_reward("imagereward")
def _imagereward(path, device=None, batch_size=None) -> Reward:
    return ImageRewardReward(path or "ImageReward-v1.0", device=device, batch_size=batch_size or 16)
