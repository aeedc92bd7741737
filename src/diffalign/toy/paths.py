"""Where the shipped toy model and judge live inside the installed package."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

ASSETS = Path(__file__).parent / "assets"
TOY_MODEL = ASSETS / "toy-sd"
TOY_JUDGE = ASSETS / "judge"
TOY_PAIRS = ASSETS / "ranked-pairs"


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise UserError(f"the toy model is missing at '{TOY_MODEL}': run `diffalign toy pretrain --out {TOY_MODEL}`")
    return TOY_MODEL


def toy_pairs_path() -> Path:
    """The judge-ranked pairs the toy model made of itself (`configs/pairs/toy_ranked_fidelity.yaml`)."""
    if not (TOY_PAIRS / "summary.json").is_file():
        raise UserError(f"the toy pairs are missing at '{TOY_PAIRS}': make them with "
                        f"`diffalign pairs configs/pairs/toy_ranked_fidelity.yaml --output_dir={TOY_PAIRS}`")
    return TOY_PAIRS
