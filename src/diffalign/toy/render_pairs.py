"""Preference pairs rendered from ground truth, in the Pick-a-Pic schema (caption, jpg_0, jpg_1, label_0, label_1).

Used by tests and benchmarks to check training methods without sampling a model:
- `style`: chosen and rejected show the same scene, the chosen one in `style` (e.g. striped, which the toy
  base rarely makes unasked), the rejected one plain; the caption names only the content (MaPO's Pick-Style).
- `fidelity`: the chosen image matches the caption; the rejected one has another colour and shape.
Which image is jpg_0 is random, so a loader that ignores the labels is caught.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .render import png_bytes, render
from .render_captions import scenes_for_captions
from .world import COLOUR_NAMES, SHAPES, caption, sample_scenes


def render_pairs(n: int, kind: str = "style", style: str = "striped", seed: int = 0,
                 exclude_heldout: bool = False) -> list[dict]:
    """``exclude_heldout``: no pair shows a held-out (colour, shape) combination (``toy_prompts("heldout")``)."""
    rng = np.random.default_rng(seed)
    if exclude_heldout:
        scenes = scenes_for_captions(n, rng, style_prior=(1.0, 0.0, 0.0))
    else:
        scenes = sample_scenes(n, rng, style_prior=(1.0, 0.0, 0.0))
    rows = []
    for scene in scenes:
        if kind == "style":
            chosen, rejected = replace(scene, style=style), scene
        elif kind == "fidelity":
            other_shape = SHAPES[(SHAPES.index(scene.shape) + 1 + rng.integers(len(SHAPES) - 1)) % len(SHAPES)]
            shift = 1 + rng.integers(len(COLOUR_NAMES) - 1)
            other_colour = COLOUR_NAMES[(COLOUR_NAMES.index(scene.colour) + shift) % len(COLOUR_NAMES)]
            chosen, rejected = scene, replace(scene, shape=other_shape, colour=other_colour)
        else:
            raise ValueError(f"unknown pair kind {kind!r}: use 'style' or 'fidelity'")
        images = render([chosen, rejected], rng)
        text = caption(shape=scene.shape, colour=scene.colour)
        first_is_chosen = bool(rng.integers(2))
        a, b = (images[0], images[1]) if first_is_chosen else (images[1], images[0])
        rows.append({"caption": text, "jpg_0": png_bytes(a), "jpg_1": png_bytes(b),
                     "label_0": 1.0 if first_is_chosen else 0.0, "label_1": 0.0 if first_is_chosen else 1.0})
    return rows


def write_pairs_parquet(path: str | Path, n: int, kind: str = "style", style: str = "striped", seed: int = 0,
                        exclude_heldout: bool = False) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(render_pairs(n, kind, style, seed, exclude_heldout)), path)
    return path
