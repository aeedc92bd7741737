"""Command-line values argparse accepts but the work cannot use (issue 22, defect 13): checked before any model
loads, one line each, the way `TrainConfig.validate` checks training keys."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .seeds import MAX_SEED


def check_image_size(height: int | None, width: int | None, flags=("--height", "--width")) -> None:
    for flag, value in zip(flags, (height, width)):
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{flag} must be a positive multiple of 8 (the VAE halves it three times), got {value}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{flag} must be in 0 .. {MAX_SEED}, got {seed}")


def check_count(value: int, flag: str) -> None:
    if value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")


def check_output_file(path: str, flag: str = "--out", suffix: str = ".parquet") -> None:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give the output file name (e.g. {p / ('pairs' + suffix)})")
