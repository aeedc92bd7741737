"""Where the shipped toy model and judge live inside the installed package."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

ASSETS = Path(__file__).parent / "assets"
TOY_MODEL = ASSETS / "toy-sd"
TOY_JUDGE = ASSETS / "judge"


def toy_model_path() -> Path:
    if not (TOY_MODEL / "model_index.json").is_file():
        raise UserError(f"the toy model is missing at '{TOY_MODEL}': run `diffalign toy pretrain --out {TOY_MODEL}`")
    return TOY_MODEL
