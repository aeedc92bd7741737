"""The reward interface, `score(images, prompts) -> Tensor[N]` (higher is better), and the image and prompt
forms every reward accepts: images in any of the forms the rest of the project produces (`images_to_tensor`,
`images_to_pil`) and one prompt per image (`check_prompts`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError


def images_to_tensor(images, size: int | None = None) -> torch.Tensor:
    """Any supported image batch -> float tensor (N, 3, H, W) in [-1, 1] on the CPU.

    Accepted: a list/tuple of PIL images; a uint8 numpy array (N, H, W, 3); a float numpy array
    (N, H, W, 3) in [0, 1] (diffusers' `output_type="np"`); a float tensor (N, 3, H, W) in [-1, 1]
    (the VAE's range). With `size`, images are resized (bilinear, antialiased) to size x size.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise UserError(f"image tensors must be float (N, 3, H, W) in [-1, 1]; got {images.dtype} {tuple(images.shape)}")
        x = images.detach().float().cpu()
    else:
        if isinstance(images, (list, tuple)):
            if not images:
                return torch.zeros(0, 3, size or 0, size or 0)
            if all(isinstance(im, np.ndarray) for im in images):
                array = np.stack(images)
            else:
                array = np.stack([_pil_to_array(im) for im in images])
        elif isinstance(images, np.ndarray):
            array = images
        else:
            raise UserError(f"unsupported images of type {type(images).__name__}: pass PIL images, a numpy array or a tensor")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise UserError(f"image arrays must be (N, H, W, 3); got shape {array.shape}")
        if array.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        elif np.issubdtype(array.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2).mul(2.0).sub(1.0)
        else:
            raise UserError(f"image arrays must be uint8 or float in [0, 1]; got {array.dtype}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _pil_to_array(image) -> np.ndarray:
    if not hasattr(image, "convert"):
        raise UserError(f"unsupported image of type {type(image).__name__} in the list: expected PIL images")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def check_prompts(prompts, n: int) -> list[str]:
    """One prompt per image: a single string is repeated; a sequence must have length n."""
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n:
        raise UserError(f"got {n} images but {len(prompts)} prompts: pass one prompt per image")
    return prompts


class Reward:
    """Base class. Subclasses set `name` and implement `score`; `details` adds named per-image terms."""

    name: str = ""
    spec: str = ""  # the spec it was built from by `get_reward` (for reports)

    def score(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        """One float per image (Tensor[N]), higher is better."""
        raise NotImplementedError

    def details(self, images, prompts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Named per-image terms (each Tensor[N]); always includes `score`."""
        return {"score": self.score(images, prompts)}

    def __call__(self, images, prompts: Sequence[str] | str) -> torch.Tensor:
        return self.score(images, prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def images_to_pil(images) -> list:
    """Any supported image batch (see `images_to_tensor`) -> list of RGB PIL images, for processors that
    want PIL input exactly as the reference implementations feed it."""
    from PIL import Image

    if isinstance(images, (list, tuple)) and all(hasattr(im, "convert") for im in images):
        return [im.convert("RGB") for im in images]
    x = images_to_tensor(images)
    array = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


__all__ = ["Reward", "check_prompts", "images_to_pil", "images_to_tensor"]
