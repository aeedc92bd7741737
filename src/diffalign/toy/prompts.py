"""The toy world's prompt sets: ``train`` (every caption it can write, held-out combinations left out) and
``heldout`` (``"a {colour} {shape}"`` for the (colour, shape) combinations no training prompt names)."""

from __future__ import annotations

from ..errors import UserError
from .world import COLOUR_NAMES, P_EMPTY, SHAPES, SIZES, STYLES, caption

#: The names of the sets in a prompts option (``prompts: toy:heldout``); ``toy`` alone is the training set.
PROMPT_SETS = {"toy": "train", "toy:train": "train", "toy:heldout": "heldout"}


def heldout_rule(colour_index: int, shape_index: int) -> bool:
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
    if split == "heldout":
        return [caption(shape=s, colour=c) for ci, c in enumerate(COLOUR_NAMES) for si, s in enumerate(SHAPES)
                if heldout_rule(ci, si)]
    if split != "train":
        raise UserError(f"toy prompts split must be 'train' or 'heldout', got {split!r}")
    prompts = []
    for ci, colour in enumerate((None, *COLOUR_NAMES)):
        for si, shape in enumerate((None, *SHAPES)):
            if colour is not None and shape is not None and heldout_rule(ci - 1, si - 1):
                continue
            for size in (None, *SIZES):
                for style in STYLES:
                    prompts.append(caption(shape=shape, colour=colour, size=size, style=style))
    n_empty = round(len(prompts) * P_EMPTY / (1 - P_EMPTY))
    return prompts + [""] * n_empty


def is_heldout(scene) -> bool:
    """The scene shows a held-out (colour, shape) combination."""
    return heldout_rule(COLOUR_NAMES.index(scene.colour), SHAPES.index(scene.shape))
