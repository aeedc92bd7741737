"""Decoding images safely (issue 22, defects 10 and 12).

- `MAX_DECODED_PIXELS`: training refuses (counts as `image_too_large`) an image whose header promises more
  pixels than this, before decoding it: PIL's own bomb limit (about 179 Mpx) lets through a 144 Mpx PNG whose
  decoded copies doubled a run's peak memory. The header is read without decoding, so the check costs nothing.
- `to_rgb`: 16-bit (and 32-bit integer) grayscale images are scaled to 8 bits; PIL's `convert("RGB")` clips them,
  so every pixel above 255 (nearly all of a 16-bit image) became white.
"""

from __future__ import annotations

import numpy as np

MAX_DECODED_PIXELS = 8192 * 8192  # 67 Mpx: above any training resolution by far


def too_many_pixels(image) -> str | None:
    """Why `image` (opened, not yet decoded) is too large to decode, or None."""
    w, h = image.size
    if w * h > MAX_DECODED_PIXELS:
        return (f"image is {w}x{h} = {w * h / 1e6:.0f} Mpx, above the decode limit of "
                f"{MAX_DECODED_PIXELS / 1e6:.0f} Mpx; downscale it")
    return None


def to_rgb(image):
    """An RGB PIL image, with high-bit-depth grayscale scaled (not clipped) to 8 bits."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float64)
        if mode == "I" and array.size and array.max() > 65535:  # 32-bit integer data: scale by its own range
            array = array / array.max() * 255.0
        else:
            array = array / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.size and np.nanmax(array) <= 1.0 else 1.0  # float images in [0, 1] or [0, 255]
        return Image.fromarray(np.clip(np.nan_to_num(array * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")
