"""Benchmark statistics: bootstrap confidence intervals of a mean and paired win rates.

Pure functions on numpy arrays, no models. The bootstrap is the percentile bootstrap (Efron & Tibshirani
1993, ch. 13): resample the n values with replacement B times, take the statistic of each resample, and
report the (1-level)/2 and (1+level)/2 quantiles of those B statistics. A fixed seed makes reports repeatable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError

# Resamples drawn per chunk: bounds memory at about CHUNK * n indices whatever B is.
_CHUNK = 256


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval: `low <= estimate <= high` up to resampling noise."""

    estimate: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WinRate:
    """Paired comparison of `a` against `b` on matched pairs, in three forms:

    - `rate` = wins / pairs (a strictly above b), `low`/`high` its interval: ties count against a;
    - `decisive` = wins / (wins + losses), the share of the pairs that differ which a wins (NaN when every pair
      ties), `decisive_low`/`decisive_high` its interval;
    - `tie_split` = (wins + ties / 2) / pairs, a tie counting half to each side, `tie_split_low`/`tie_split_high`
      its interval. For the last two, 0.5 is parity whatever the share of ties; `rate` is only read against 0.5
      when there are no ties.

    `wins + ties + losses == pairs`; all intervals are bootstrap intervals over pairs.
    `unmatched_a`/`unmatched_b` count images without a partner on the other side.
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    pairs: int
    unmatched_a: int = 0
    unmatched_b: int = 0
    decisive: float = float("nan")
    decisive_low: float = float("nan")
    decisive_high: float = float("nan")
    tie_split: float = float("nan")
    tie_split_low: float = float("nan")
    tie_split_high: float = float("nan")

    @property
    def tie_rate(self) -> float:
        return self.ties / self.pairs if self.pairs else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "tie_rate": self.tie_rate}


# Below this many images (or pairs) an interval says little: reports flag such rows.
SMALL_N = 10


def _as_1d(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise UserError(f"{what} must be a 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise UserError(f"{what} holds non-finite values (NaN or inf): drop or fix them before the bootstrap")
    return array


def _bootstrap_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Means of `samples` resamples (with replacement) of `values`, drawn in chunks."""
    rng = np.random.default_rng(seed)
    n = len(values)
    out = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, _CHUNK):
        stop = min(start + _CHUNK, samples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def check_bootstrap_options(samples: int, level: float) -> None:
    if samples < 1:
        raise UserError(f"bootstrap samples must be at least 1, got {samples}")
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {level}")


def bootstrap_ci(values, samples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of `values` with a percentile-bootstrap interval at `level` (B = `samples`, fixed `seed`)."""
    check_bootstrap_options(samples, level)
    x = _as_1d(values, "scores")
    if len(x) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    means = _bootstrap_means(x, samples, seed)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # The estimate is the plain sample mean, never the bootstrap average (the bootstrap only gives the spread).
    return Interval(float(x.mean()), float(low), float(high), len(x))


def win_rate(a, b, samples: int = 2000, seed: int = 0, level: float = 0.95,
             unmatched_a: int = 0, unmatched_b: int = 0) -> WinRate:
    """How often `a[i] > b[i]` over already matched pairs, with a percentile-bootstrap interval over pairs.

    Resampling pairs (not images) keeps each pair's shared prompt and seed together, which is what makes the
    comparison paired.
    """
    check_bootstrap_options(samples, level)
    x, y = _as_1d(a, "scores a"), _as_1d(b, "scores b")
    if len(x) != len(y):
        raise UserError(f"win rate needs matched pairs: got {len(x)} scores for a and {len(y)} for b")
    wins, ties = int(np.sum(x > y)), int(np.sum(x == y))
    n = len(x)
    if n == 0:
        nan = float("nan")
        return WinRate(nan, nan, nan, 0, 0, 0, 0, unmatched_a, unmatched_b)
    won, lost = (x > y).astype(np.float64), (x < y).astype(np.float64)
    rng = np.random.default_rng(seed)
    alpha = (1.0 - level) / 2.0
    rates, decisive, split = np.empty(samples), np.empty(samples), np.empty(samples)
    for start in range(0, samples, _CHUNK):  # one set of resamples for all three forms
        stop = min(start + _CHUNK, samples)
        idx = rng.integers(0, n, size=(stop - start, n))
        w, lo = won[idx].sum(axis=1), lost[idx].sum(axis=1)
        rates[start:stop] = w / n
        split[start:stop] = (w + (n - w - lo) / 2.0) / n
        with np.errstate(invalid="ignore", divide="ignore"):
            decisive[start:stop] = w / (w + lo)

    def interval(values):
        values = values[np.isfinite(values)]
        return tuple(float(v) for v in np.quantile(values, [alpha, 1.0 - alpha])) if values.size else (np.nan, np.nan)

    losses = n - wins - ties
    low, high = interval(rates)
    d_low, d_high = interval(decisive)
    s_low, s_high = interval(split)
    return WinRate(wins / n, low, high, wins, ties, losses, n, unmatched_a, unmatched_b,
                   wins / (wins + losses) if wins + losses else float("nan"), d_low, d_high,
                   (wins + ties / 2.0) / n, s_low, s_high)


def match_pairs(keys_a, keys_b) -> tuple[list[tuple[int, int]], int, int]:
    """Pair up items of two lists by key (e.g. (prompt, seed)), whatever their order.

    Returns (pairs of indices (i in a, j in b), unmatched in a, unmatched in b). A key that occurs k times
    on one side and m times on the other yields min(k, m) pairs, taken in order of occurrence.
    """
    positions: dict = {}
    for j, key in enumerate(keys_b):
        positions.setdefault(key, deque()).append(j)
    pairs = []
    for i, key in enumerate(keys_a):
        queue = positions.get(key)
        if queue:
            pairs.append((i, queue.popleft()))
    unmatched_a = len(keys_a) - len(pairs)
    unmatched_b = len(keys_b) - len(pairs)
    return pairs, unmatched_a, unmatched_b


def paired_win_rate(scores_a, keys_a, scores_b, keys_b, samples: int = 2000, seed: int = 0,
                    level: float = 0.95) -> WinRate:
    """`win_rate` of a over b on items matched by key; unmatched items on either side are counted, not used."""
    pairs, unmatched_a, unmatched_b = match_pairs(list(keys_a), list(keys_b))
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    ia = np.array([i for i, _ in pairs], dtype=np.int64)
    ib = np.array([j for _, j in pairs], dtype=np.int64)
    return win_rate(a[ia], b[ib], samples, seed, level, unmatched_a, unmatched_b)


def paired_mean_difference(scores_a, keys_a, scores_b, keys_b, samples: int = 2000, seed: int = 0,
                           level: float = 0.95) -> Interval:
    """Mean of `a - b` over items matched by key (e.g. the same prompt and seed), with a percentile-bootstrap
    interval over pairs; `n` is the number of pairs. Unmatched items are not used."""
    pairs, _, _ = match_pairs(list(keys_a), list(keys_b))
    a, b = _as_1d(scores_a, "scores a"), _as_1d(scores_b, "scores b")
    ia = np.array([i for i, _ in pairs], dtype=np.int64)
    ib = np.array([j for _, j in pairs], dtype=np.int64)
    return bootstrap_ci(a[ia] - b[ib], samples, seed, level)
