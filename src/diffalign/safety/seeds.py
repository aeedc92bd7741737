"""Seeds users type (0 .. 2**32 - 1, numpy's range, which `accelerate.utils.set_seed` also seeds) and the
per-step seeds derived from them (issue 22, defect 3).

The loop's per-step seed was ((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank, which leaves the range of
`torch.Generator.manual_seed` (64 bits) for seeds above about 1.8e8. That formula is kept wherever it fits, so
runs with the seeds that worked are unchanged bit for bit; beyond it the four numbers are hashed (SHA-256).
"""

from __future__ import annotations

import hashlib

MAX_SEED = 2**32 - 1
_TORCH_MAX = 2**64 - 1


def seed_problem(value, key: str = "seed") -> str | None:
    """Why `value` is not a seed users can give, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{key} must be a whole number, got {value!r}"
    if not 0 <= value <= MAX_SEED:
        return f"{key} must be in 0 .. {MAX_SEED} (2^32 - 1), got {value}"
    return None


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch seed of (seed, step, micro-batch, process): the original formula while it fits 64 bits, else a
    63-bit SHA-256 of the four numbers."""
    legacy = ((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank
    if 0 <= legacy <= _TORCH_MAX:
        return legacy
    key = hashlib.sha256(f"diffalign-step:{seed}:{step}:{micro}:{rank}".encode()).digest()
    return int.from_bytes(key[:8], "little") >> 1
