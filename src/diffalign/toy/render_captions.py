"""Image-caption rows rendered from ground truth (columns ``caption``, ``image``), for Self-NPO's image start.

The official Self-NPO code starts its teacher trajectories from noised real images; the toy world's "real
images" are its renders. Captions are the world's training captions (attributes dropped at random, ~10%
empty). With ``exclude_heldout`` (the default) no scene shows a held-out (colour, shape) combination, so the
held-out evaluation prompts (``toy_prompts("heldout")``) stay unseen, as in the data-free toy recipe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .prompts import is_heldout
from .render import png_bytes, render
from .world import STYLE_PRIOR, random_caption, sample_scenes


def scenes_for_captions(n: int, rng: np.random.Generator, exclude_heldout: bool = True,
                        style_prior=STYLE_PRIOR) -> list:
    """``n`` scenes from the world's prior, held-out (colour, shape) combinations redrawn when excluded."""
    if n < 1:
        raise ValueError(f"need at least one row, got n={n}")
    scenes = []
    while len(scenes) < n:
        batch = sample_scenes(2 * (n - len(scenes)), rng, style_prior=style_prior)
        scenes += [s for s in batch if not (exclude_heldout and is_heldout(s))]
    return scenes[:n]


def render_captions(n: int, seed: int = 0, exclude_heldout: bool = True) -> list[dict]:
    """``n`` rows ``{"caption": str, "image": PNG bytes}``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = scenes_for_captions(n, rng, exclude_heldout)
    images = render(scenes, rng)
    return [{"caption": random_caption(s, rng), "image": png_bytes(img)} for s, img in zip(scenes, images)]


def write_captions_parquet(path: str | Path, n: int, seed: int = 0, exclude_heldout: bool = True) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(render_captions(n, seed, exclude_heldout)), path)
    return path
