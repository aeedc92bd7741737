"""The toy world's vocabulary: attributes of a scene and the captions that describe it.

A scene is one shape of a named colour, size and style on a light background. Captions name some of
the attributes (others are left out at random, some captions are empty) so the pretrained model learns
both conditional and unconditional generation, and classifier-free guidance has something to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.68, 0.18),
    "blue": (0.14, 0.26, 0.88),
    "yellow": (0.95, 0.84, 0.10),
    "purple": (0.58, 0.18, 0.72),
    "orange": (0.98, 0.55, 0.08),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
STYLES = ("plain", "outlined", "striped")
# Unasked-for styles are rare, so a style can be "far from what the model makes" (MaPO's Pick-Style).
STYLE_PRIOR = (0.7, 0.15, 0.15)

# Every word a caption can contain; the offline tokenizer makes each one a single token.
WORDS = ("a", ",", "shape", *SIZES, *COLOUR_NAMES, *SHAPES, *STYLES[1:])

# Probabilities with which a caption keeps each attribute (docs/toy_world.md#the-shipped-model-diffalign-toy-path,
# "Pretraining data").
P_EMPTY, P_SIZE, P_COLOUR, P_SHAPE, P_STYLE = 0.10, 0.5, 0.85, 0.85, 0.7


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    style: str
    cx: float  # centre, in [0, 1] image coordinates
    cy: float

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scenes(n: int, rng: np.random.Generator, style_prior=STYLE_PRIOR) -> list[Scene]:
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOUR_NAMES), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    styles = rng.choice(len(STYLES), size=n, p=np.asarray(style_prior) / np.sum(style_prior))
    margin = 0.32
    centres = rng.uniform(margin, 1 - margin, size=(n, 2))
    return [
        Scene(SHAPES[s], COLOUR_NAMES[c], SIZES[z], STYLES[y], float(cx), float(cy))
        for s, c, z, y, (cx, cy) in zip(shapes, colours, sizes, styles, centres)
    ]


def caption(
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    style: str | None = None,
) -> str:
    """The canonical caption for the attributes given; None leaves an attribute unnamed."""
    words = [w for w in (size, colour) if w]
    words.append(shape or "shape")
    text = "a " + " ".join(words)
    if style and style != "plain":
        text += ", " + style
    return text


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption: attributes dropped at random, ~10% empty (the unconditional case)."""
    if rng.random() < P_EMPTY:
        return ""
    return caption(
        shape=scene.shape if rng.random() < P_SHAPE else None,
        colour=scene.colour if rng.random() < P_COLOUR else None,
        size=scene.size if rng.random() < P_SIZE else None,
        style=scene.style if rng.random() < P_STYLE else None,
    )


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption names (None where it names none). Inverse of `caption`."""
    tokens = text.lower().replace(",", " , ").split()
    found: dict[str, str | None] = {"shape": None, "colour": None, "size": None, "style": None}
    for token in tokens:
        if token in SHAPES:
            found["shape"] = token
        elif token in COLOURS:
            found["colour"] = token
        elif token in SIZES:
            found["size"] = token
        elif token in STYLES:
            found["style"] = token
    return found
