"""Vectorised renderer of toy scenes: 32x32 RGB, 2x supersampled, ground truth known exactly."""

from __future__ import annotations

import io

import numpy as np
import torch

from .world import COLOURS, Scene

RESOLUTION = 32
_SS = 2  # supersampling factor: edges are anti-aliased by averaging 2x2 sub-pixels
_RADIUS = {"small": 0.16, "large": 0.27}
_BORDER = 2.0 / RESOLUTION  # outlined: a 2 px black border
_STRIPE_PERIOD = 4.0 / RESOLUTION  # striped: 2 px light band every 4 px


def _inside(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean masks (N, H, W) of each scene's shape of radius r centred at the origin of dx, dy."""
    circle = dx**2 + dy**2 <= r**2
    square = np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    diamond = np.abs(dx) + np.abs(dy) <= 1.15 * r
    # Upward triangle with apex at -r and base at +0.75r.
    height = 1.75 * r
    frac = (dy + r) / height
    triangle = (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= frac * 1.0 * r)
    out = np.where(shape == 0, circle, False)
    out = np.where(shape == 1, square, out)
    out = np.where(shape == 2, triangle, out)
    out = np.where(shape == 3, diamond, out)
    return out


def render(scenes: list[Scene], rng: np.random.Generator | None = None, jitter: bool = True) -> np.ndarray:
    """Render scenes to uint8 images of shape (N, 32, 32, 3).

    With `jitter`, the background gets a slight tint and the colour a small per-channel offset, so the
    world is not a lookup table; pass an rng for reproducible renders.
    """
    from .world import SHAPES

    rng = rng if rng is not None else np.random.default_rng(0)
    n = len(scenes)
    size = RESOLUTION * _SS
    coords = (np.arange(size) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")

    shape_idx = np.array([SHAPES.index(s.shape) for s in scenes])[:, None, None]
    cx = np.array([s.cx for s in scenes])[:, None, None]
    cy = np.array([s.cy for s in scenes])[:, None, None]
    r = np.array([_RADIUS[s.size] for s in scenes])[:, None, None]
    dx, dy = xs[None] - cx, ys[None] - cy

    inside = _inside(shape_idx, dx, dy, r)
    outlined = np.array([s.style == "outlined" for s in scenes])[:, None, None]
    striped = np.array([s.style == "striped" for s in scenes])[:, None, None]
    core = _inside(shape_idx, dx, dy, r - _BORDER * 1.2)
    border = inside & ~core & outlined
    band = (np.floor((ys[None] - cy) / (_STRIPE_PERIOD / 2)) % 2 == 0) & striped & inside

    colour = np.array([COLOURS[s.colour] for s in scenes], dtype=np.float64)
    background = np.full((n, 3), 0.86)
    if jitter:
        colour = np.clip(colour + rng.uniform(-0.05, 0.05, size=(n, 3)), 0, 1)
        background = background + rng.uniform(-0.04, 0.04, size=(n, 3))
    light = colour + 0.55 * (1.0 - colour)  # stripes: lighter bands of the same hue

    img = np.broadcast_to(background[:, None, None, :], (n, size, size, 3)).copy()
    img = np.where(inside[..., None], colour[:, None, None, :], img)
    img = np.where(band[..., None], light[:, None, None, :], img)
    img = np.where(border[..., None], 0.05, img)
    img = img.reshape(n, RESOLUTION, _SS, RESOLUTION, _SS, 3).mean(axis=(2, 4))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float tensor (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(array: np.ndarray) -> bytes:
    """One uint8 (H, W, 3) image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
