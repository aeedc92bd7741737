"""Validation images during training: fixed prompts and seeds, with the trained weights and without them.

A grid has one column per validation prompt (the prompt written above it) and one row per model, labelled on the
left: `base` (adapters off, or the frozen reference copy of a full fine-tune) and `trained, step N`. The base model
does not change during a run, so its row is sampled once (:class:`ValidationGrids`) and reused in every grid.
"""

from __future__ import annotations

import contextlib
import textwrap
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from ..models import lora_disabled
from ..models.lora import has_lora

if TYPE_CHECKING:
    from ..models import ModelFamily


@contextlib.contextmanager
def decode_in_vae_dtype(vae):
    """The VAE decodes latents of any dtype in its own. A stock pipeline hands its VAE the latents in the dtype the
    sampling left them in: under fp16/bf16 the frozen reference copy of a full fine-tune (the base row) is stored in
    half precision and leaves half-precision latents, while the VAE may be float32 (its config asks for
    force_upcast), and conv2d refuses the mix. A float32 run's latents are float32 already (the cast is a no-op)."""
    decode, own = vae.decode, vae.__dict__.get("decode")
    dtype = vae.dtype

    def cast(z, *args, **kwargs):
        return decode(z.to(dtype), *args, **kwargs)

    vae.decode = cast  # an instance attribute over the class's method, undone below
    try:
        yield
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own


def _sample(family: ModelFamily, cfg, resolution: int, net=None) -> np.ndarray:
    pipe = family.make_pipeline(net=net)
    pipe.set_progress_bar_config(disable=True)
    prompts = list(cfg.validation_prompts)
    gens = [torch.Generator().manual_seed(cfg.validation_seed + i) for i in range(len(prompts))]
    with torch.no_grad(), decode_in_vae_dtype(pipe.vae):
        if family.is_video:  # clips: first/middle/last frame side by side (models/cogvideox.py)
            return family.preview_images(pipe, prompts, gens, resolution=cfg.resolution,
                                         guidance_scale=cfg.validation_guidance_scale,
                                         num_inference_steps=cfg.validation_num_inference_steps)
        images = pipe(prompts, height=resolution, width=resolution, guidance_scale=cfg.validation_guidance_scale,
                      num_inference_steps=cfg.validation_num_inference_steps, generator=gens, output_type="np").images
    return (images * 255).round().astype(np.uint8)


_PAD = 6
_LINE = 12  # pixels per text line of PIL's default bitmap font (about 6 px a character)
_CHAR = 6


def grid_layout(rows: list[tuple[str, np.ndarray]], columns: list[str], scale: int = 1) -> Image.Image:
    """One labelled grid: `rows` are (label, images of shape (n, H, W, 3) uint8), one image per column; `columns`
    are the column titles (the prompts). Images are enlarged `scale` times (nearest neighbour). The labels are also
    in `image.info` ("rows", "columns": one per line), which :func:`save_grid` keeps as PNG text."""
    if not rows:
        raise ValueError("a grid needs at least one row")
    n, h, w = rows[0][1].shape[:3]
    if len(columns) != n or any(images.shape[:3] != (n, h, w) for _, images in rows):
        raise ValueError(f"every row needs {len(columns)} images of the same size, one per column")
    cell_w, cell_h = w * scale, h * scale
    chars = max(8, (cell_w - 4) // _CHAR)
    titles = [textwrap.wrap(c, chars, max_lines=4, placeholder="...") or [""] for c in columns]
    header = _PAD * 2 + _LINE * max(len(t) for t in titles)
    labels = [textwrap.wrap(label, 16) or [""] for label, _ in rows]
    left = _PAD * 2 + _CHAR * max(len(line) for lines in labels for line in lines)
    canvas = Image.new("RGB", (left + n * cell_w, header + len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, lines in enumerate(titles):
        for k, line in enumerate(lines):
            draw.text((left + j * cell_w + 2, _PAD + k * _LINE), line, fill="black", font=font)
    for i, ((_, images), lines) in enumerate(zip(rows, labels)):
        top = header + i * cell_h
        for k, line in enumerate(lines):
            draw.text((_PAD, top + cell_h // 2 - _LINE * len(lines) // 2 + k * _LINE), line, fill="black", font=font)
        for j in range(n):
            tile = Image.fromarray(images[j])
            if scale > 1:
                tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (left + j * cell_w, top))
    canvas.info["rows"] = "\n".join(label for label, _ in rows)
    canvas.info["columns"] = "\n".join(columns)
    return canvas


def save_grid(image: Image.Image, path) -> None:
    """PNG with the row and column labels as text chunks (readable back with `Image.open(path).info`)."""
    info = PngInfo()
    for key in ("rows", "columns"):
        if key in image.info:
            info.add_text(key, image.info[key])
    image.save(path, pnginfo=info)


class ValidationGrids:
    """The validation grids of one run. The base row (adapters off, or ``reference``, the frozen reference copy of
    a full fine-tune; none when neither is known) is sampled at the first grid and reused; the trained row is
    sampled at every grid. The pipelines are built around the network to sample; ``family.unet`` stays the
    trained one."""

    def __init__(self, family, cfg, reference=None):
        self.family, self.cfg, self.reference = family, cfg, reference
        self.resolution = cfg.resolution or family.default_resolution
        self._base: np.ndarray | None = None

    def _base_row(self) -> np.ndarray | None:
        if self._base is None:
            if has_lora(self.family.unet):
                with lora_disabled(self.family.unet):
                    self._base = _sample(self.family, self.cfg, self.resolution)
            elif self.reference is not None:
                self._base = _sample(self.family, self.cfg, self.resolution, net=self.reference)
        return self._base

    def grid(self, step: int) -> Image.Image:
        self.family.unet.eval()
        rows = []
        base = self._base_row()
        if base is not None:
            rows.append(("base", base))
        rows.append((f"trained, step {step}", _sample(self.family, self.cfg, self.resolution)))
        return grid_layout(rows, list(self.cfg.validation_prompts), scale=max(1, 256 // self.resolution))


def validation_grid(family, cfg, reference=None, step: int = 0) -> Image.Image:
    """One grid on its own (the base row sampled for it); a run uses :class:`ValidationGrids`."""
    return ValidationGrids(family, cfg, reference).grid(step)
