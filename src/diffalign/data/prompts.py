"""Prompt sets and image-caption data for methods that need no preference labels (Self-NPO).

`load_prompts(source, column)` reads prompts from:

- ``toy``: the toy world's training prompts (:func:`toy_prompts`), the data-free Self-NPO toy recipe;
- a ``.txt`` file: one prompt a line (blank lines skipped);
- a ``.jsonl`` file: one JSON object a line with a string ``column`` field (``prompt`` is accepted too);
- anything ``diffalign.data`` reads as a table (parquet file or glob, ``save_to_disk`` folder, hub id): the
  ``column`` column. Empty strings are kept (the unconditional case), missing values are skipped and counted.

`load_image_captions(source, image_column=..., caption_column=...)` opens a table with one image and one caption
per row (the official Self-NPO code's LAION-style data) and decodes images lazily; `ImageCaptionTransform` resizes
and crops them deterministically per (seed, epoch, row).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..safety.text import read_utf8

def _toy_heldout_rule(colour_index: int, shape_index: int) -> bool:
    """Toy (colour, shape) combinations no training prompt names together (8 of 24): evaluation prompts
    "a {colour} {shape}" for them are unseen in training."""
    return (colour_index + shape_index) % 3 == 0


def toy_prompts(split: str = "train") -> list[str]:
    """Prompts of the toy world, deterministic.

    ``train``: every caption the toy world can write (any subset of size, colour, shape, style named) except
    those naming a held-out (colour, shape) combination, plus empty prompts at the world's empty-caption rate
    (so the negative model also learns the unconditional branch). ``heldout``: ``"a {colour} {shape}"`` for the
    held-out combinations (8 of the 24), never seen in training.
    """
    from ..toy.world import COLOUR_NAMES, P_EMPTY, SHAPES, SIZES, STYLES, caption

    if split == "heldout":
        return [caption(shape=s, colour=c) for ci, c in enumerate(COLOUR_NAMES) for si, s in enumerate(SHAPES)
                if _toy_heldout_rule(ci, si)]
    if split != "train":
        raise UserError(f"toy prompts split must be 'train' or 'heldout', got {split!r}")
    prompts = []
    for ci, colour in enumerate((None, *COLOUR_NAMES)):
        for si, shape in enumerate((None, *SHAPES)):
            if colour is not None and shape is not None and _toy_heldout_rule(ci - 1, si - 1):
                continue
            for size in (None, *SIZES):
                for style in STYLES:
                    prompts.append(caption(shape=shape, colour=colour, size=size, style=style))
    n_empty = round(len(prompts) * P_EMPTY / (1 - P_EMPTY))
    return prompts + [""] * n_empty


def _read_text_prompts(path: Path, column: str) -> list[str]:
    lines = read_utf8(path, "prompts file").splitlines()
    if path.suffix.lower() != ".jsonl":
        return [line.strip() for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        value = row.get(column, row.get("prompt")) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise UserError(f"{path}:{number}: no string '{column}' (or 'prompt') field in this JSON line")
        prompts.append(value)
    return prompts


def _open_table(source: Any, split: str, caption_column: str, strict: bool):
    from .sources import resolve_source

    src = resolve_source(source, split=split, caption_column=caption_column, strict=strict, cache_dir=None)
    if caption_column not in src.table.column_names:
        raise UserError(f"{src.description} has no column {caption_column!r} (columns: "
                        f"{', '.join(src.table.column_names)}); pass --caption_column=...")
    return src


def load_prompts(source: Any, column: str = "caption", *, split: str = "train",
                 max_samples: int | None = None) -> list[str]:
    """Prompts from ``source`` (see the module docstring), in source order; at most ``max_samples``."""
    if str(source) == "toy":
        prompts, shown = toy_prompts("train"), "the toy world's training prompts"
    else:
        path = Path(str(source)).expanduser()
        if path.is_file() and path.suffix.lower() in (".txt", ".jsonl"):
            prompts, shown = _read_text_prompts(path, column), f"prompts file {str(path)!r}"
        else:
            src = _open_table(source, split, column, strict=False)
            values = src.table.column(column)
            bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, str)]
            if bad:
                raise UserError(f"{src.description}: row {bad[0]} of column {column!r} is a "
                                f"{type(values[bad[0]]).__name__}, not a string")
            prompts, shown = [v for v in values if v is not None], src.description
    if max_samples is not None:
        prompts = prompts[:max_samples]
    if not prompts:
        raise UserError(f"{shown} holds no prompts")
    return prompts


class ImageCaptions:
    """Rows of (image, caption) from a table; images are decoded when fetched.

    ``strict=False`` skips rows with a missing caption up front and rows whose image fails to decode when
    fetched (``item`` returns None, counted in ``report()``); ``strict=True`` raises ``UserError`` naming the row.
    """

    def __init__(self, source: Any, *, image_column: str, caption_column: str = "caption", split: str = "train",
                 strict: bool = False, max_samples: int | None = None, image_root: str | None = None):
        src = _open_table(source, split, caption_column, strict)
        self._image_root, self._kind = image_root, src.kind
        if image_column not in src.table.column_names:
            raise UserError(f"{src.description} has no image column {image_column!r} (columns: "
                            f"{', '.join(src.table.column_names)}); pass --image_columns=...")
        self.description = src.description
        self.image_column = image_column
        self.counts: Counter = Counter()
        table = src.table
        captions = table.column(caption_column)
        rows = []
        for i, value in enumerate(captions):
            if not isinstance(value, str):
                if strict:
                    raise UserError(f"{src.description}: row {i} has no caption in column {caption_column!r}")
                self.counts["missing_caption"] += 1
                continue
            rows.append(i)
        if max_samples is not None:
            rows = rows[:max_samples]
        if not rows:
            raise UserError(f"{src.description} has no row with a caption in column {caption_column!r}")
        table.prepare_images([image_column])
        self._table, self._captions, self._rows, self._strict = table, captions, rows, strict
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self._rows)

    def caption(self, i: int) -> str:
        return self._captions[self._rows[i]]

    def image(self, i: int):
        """The RGB PIL image of item ``i``, or None (lenient mode) when it cannot be decoded."""
        from .pairs import _BadImage, decode_image

        row = self._rows[i]
        cell = self._table.images(row)[0]
        if self._kind not in ("folder", "memory"):  # as PreferencePairs: data holding file paths
            from ..safety.paths import confine_image_cell

            cell = confine_image_cell(cell, self._image_root, f"{self.description}: row {row}, column "
                                                              f"{self.image_column!r}")
        try:
            return decode_image(cell)
        except _BadImage as exc:
            if self._strict:
                raise UserError(f"{self.description}: row {row}, column {self.image_column!r}: {exc.detail}") from None
            if row not in self._failed:
                self._failed.add(row)
                self.counts[exc.reason] += 1
            return None

    def report(self) -> dict[str, int]:
        return {"rows": len(self), **{k: int(v) for k, v in sorted(self.counts.items())}}

    def summary(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()) if v)
        return f"{len(self)} image-caption rows from {self.description}" + (f" (skipped: {skipped})" if skipped else "")


class ImageCaptionTransform:
    """Resize (shorter side to ``resolution``), crop square, maybe flip; pixels in [-1, 1] plus SDXL size info.

    Randomness comes from the ``random.Random`` passed in (flip, then crop top, then crop left), so a run
    resumed at step k sees the same crops.
    """

    def __init__(self, resolution: int, *, random_flip: bool = False, center_crop: bool = False):
        self.resolution, self.random_flip, self.center_crop = int(resolution), bool(random_flip), bool(center_crop)

    def __call__(self, image, rng) -> dict[str, Any]:
        from PIL import Image

        from .transforms import to_tensor

        w, h = image.size
        res = self.resolution
        size = (res, max(res, round(h * res / w))) if w <= h else (max(res, round(w * res / h)), res)
        resized = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
        flip = self.random_flip and rng.random() < 0.5
        free_h, free_w = size[1] - res, size[0] - res
        if self.center_crop:
            top, left = int(round(free_h / 2.0)), int(round(free_w / 2.0))
        else:
            top, left = min(int(rng.random() * (free_h + 1)), free_h), min(int(rng.random() * (free_w + 1)), free_w)
        crop = resized.crop((left, top, left + res, top + res))
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = free_w - left
        return {"pixels": to_tensor(crop), "original_size": (h, w), "crop_top_left": (top, left)}


def stack_pixels(items: Sequence[dict]) -> torch.Tensor:
    return torch.stack([it["pixels"] for it in items])


__all__ = ["ImageCaptionTransform", "ImageCaptions", "load_prompts", "stack_pixels", "toy_prompts"]
