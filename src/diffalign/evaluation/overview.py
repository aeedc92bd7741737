"""One picture a person reads at a glance: the same prompts and seeds, one row per model, with its headline.

Row `r` shows model `labels[r]`'s images for the keys `(prompt, seed)` in `keys`, in that order, so a column is
one prompt and seed across every model. Each row is labelled with the model's name and a headline figure
(e.g. "striped 91% (base 22%)"); each column with its prompt. Images are enlarged by an integer factor
without smoothing, so toy images stay crisp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from .result import EvaluationResult

LABEL_WIDTH = 360
HEADER_HEIGHT = 40
PAD = 4


def matched_keys(result: EvaluationResult, labels: Sequence[str], limit: int,
                 one_per_prompt: bool = False) -> list[tuple]:
    """The first `limit` (prompt, seed) keys, in the first label's order, that every label has an image for;
    with `one_per_prompt`, only the first such key of each prompt (so the columns show different prompts)."""
    have = [{result.records[i].key for i in result.rows_of(label)} for label in labels]
    first = [result.records[i].key for i in result.rows_of(labels[0])]
    keys = [k for k in dict.fromkeys(first) if all(k in h for h in have)]
    if one_per_prompt:
        keys = list({prompt: (prompt, seed) for prompt, seed in reversed(keys)}.values())[::-1]
    return keys[:limit]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed size
        return ImageFont.load_default()


def overview_grid(result: EvaluationResult, labels: Sequence[str], keys: Sequence[tuple],
                  headlines: Mapping[str, str], out_path: str | Path, scale: int = 3) -> Path:
    """Write the grid (PNG) and return its path. Every label must have an image for every key."""
    if not labels or not keys:
        raise UserError("an overview needs at least one model and one (prompt, seed)")
    index = {(result.records[i].label, result.records[i].key): i for i in range(len(result.records))}
    missing = [(label, key) for label in labels for key in keys if (label, key) not in index]
    if missing:
        raise UserError(f"{len(missing)} image(s) missing for the overview, e.g. {missing[0]}")
    first = Image.open(result.records[index[(labels[0], keys[0])]].path)
    w, h = first.width * scale, first.height * scale
    canvas = Image.new("RGB", (LABEL_WIDTH + len(keys) * (w + PAD), HEADER_HEIGHT + len(labels) * (h + PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    small, big = _font(12), _font(16)
    for c, (prompt, seed) in enumerate(keys):
        x = LABEL_WIDTH + c * (w + PAD)
        words = (prompt or "(empty)").removeprefix("a ")
        draw.text((x, 4), words, fill="black", font=small)
        draw.text((x, 20), f"seed {seed}", fill="#777", font=small)
    for r, label in enumerate(labels):
        y = HEADER_HEIGHT + r * (h + PAD)
        draw.text((6, y + 6), label, fill="black", font=big)
        for n, line in enumerate(str(headlines.get(label, "")).split("\n")):
            draw.text((6, y + 30 + 16 * n), line, fill="#333", font=small)
        for c, key in enumerate(keys):
            with Image.open(result.records[index[(label, key)]].path) as im:
                tile = im.convert("RGB").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + c * (w + PAD), y))
    out_path = Path(out_path)
    canvas.save(out_path)
    return out_path
