"""Set-level measures between a generated and a reference feature set: Fréchet distance, precision, recall.

Pure functions on numpy arrays (one row per image, one column per feature), no models:

- **Fréchet distance** (FD) between Gaussian fits N(mu1, S1) and N(mu2, S2) of the two sets (the formula
  behind FID, Heusel et al. 2017): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``. 0 for
  identical sets, in squared feature units; lower is better.
- **Precision and recall** with k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019): every point of a
  set owns the closed ball reaching its k-th nearest other point of the same set. Precision = share of
  generated samples inside the union of the reference balls (do generated images look like real ones?);
  recall = share of reference samples inside the union of the generated balls (is the reference's variety
  covered?). Both in [0, 1], higher is better.
- **Bootstrap intervals** for each, and for the difference between two sets matched row for row: the
  matched rows are resampled jointly, so the difference's interval is paired. Rows may carry group labels
  (e.g. prompts): resampling then happens within each group, which keeps the number of images per prompt
  fixed, as the benchmark design does. The reference is resampled too (it is a random sample as well),
  independently, and one reference resample serves both sides of a difference.

A resample holds repeated rows: about 63% of its rows are distinct. A repeat is the same image, not a new
neighbour, so the k-NN balls of a resample are built on its distinct rows, and the shares count every copy.
All three measures depend on how many distinct samples there are (FD is biased upwards at small n; k-NN
balls widen as the samples thin out), so resampled values sit systematically off the estimate (FD well
above it). The bootstrap is therefore used for the spread only: the interval is the percentile interval
moved so that the resamples' median falls on the estimate, ``[est - (median - q_low), est + (q_high - median)]``,
clipped to the measure's range. It always contains the estimate; it does not correct the estimate's bias.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import UserError
from .stats import Interval, check_bootstrap_options

DEFAULT_K = 3
DEFAULT_SAMPLES = 1000


@dataclass(frozen=True)
class DistributionMetrics:
    """FD, precision and recall of one generated set against a reference set, each with its interval.

    `fd.n`, `precision.n` and `recall.n` are the number of generated samples; `n_reference` the reference's.
    """

    fd: Interval
    precision: Interval
    recall: Interval
    n_reference: int
    k: int

    def as_dict(self) -> dict:
        return {"fd": self.fd.as_dict(), "precision": self.precision.as_dict(), "recall": self.recall.as_dict(),
                "n": self.fd.n, "n_reference": self.n_reference, "k": self.k}


@dataclass(frozen=True)
class DistributionDifference:
    """Set `a` minus set `b` (matched row for row) on FD, precision and recall, against one reference.

    Negative `fd` and positive `precision`/`recall` favour `a`. Each interval's `n` is the number of pairs;
    `unmatched_a`/`unmatched_b` count rows left out for want of a partner (0 when the caller matched them).
    """

    fd: Interval
    precision: Interval
    recall: Interval
    n_reference: int
    k: int
    unmatched_a: int = 0
    unmatched_b: int = 0

    def as_dict(self) -> dict:
        return {"fd": self.fd.as_dict(), "precision": self.precision.as_dict(), "recall": self.recall.as_dict(),
                "pairs": self.fd.n, "n_reference": self.n_reference, "k": self.k,
                "unmatched_a": self.unmatched_a, "unmatched_b": self.unmatched_b}


# --------------------------------------------------------------------------------------------- inputs


def _as_features(values, what: str, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise UserError(f"{what} must be a 2-D array (one row per sample), got shape {x.shape}")
    if len(x) < min_rows:
        raise UserError(f"{what} has {len(x)} row(s); this measure needs at least {min_rows}")
    if not np.all(np.isfinite(x)):
        raise UserError(f"{what} holds non-finite values (NaN or inf)")
    return x


def _same_dimension(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise UserError(f"the two feature sets have different dimensions ({x.shape[1]} and {y.shape[1]})")


def _check_k(k: int, *sizes: int) -> None:
    if int(k) != k or k < 1:
        raise UserError(f"k must be a positive integer, got {k}")
    if min(sizes) <= k:
        raise UserError(f"k-NN precision/recall with k={k} needs more than {k} samples in each set, got "
                        f"{' and '.join(map(str, sizes))}: lower k or add samples")


# ----------------------------------------------------------------------------------------- Fréchet distance


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix, from its eigendecomposition; eigenvalues below
    zero (round-off of a singular matrix) count as zero."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2): |mu1 - mu2|^2 + Tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2}).

    Both square roots are symmetric PSD roots from eigendecompositions, so singular covariances (fewer samples
    than dimensions) are fine and no complex numbers appear. Clipped at 0 against round-off.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, dtype=np.float64)), np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    d = len(mu1)
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise UserError(f"Fréchet distance needs two means of length d and two d x d covariances, got "
                        f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross))


def _centred(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, rows centred and scaled by sqrt(count), n) of rows repeated `counts` times: A'A is then the
    scatter matrix of the repeated set, with one row per distinct sample."""
    n = float(counts.sum())
    mu = counts @ x / n
    return mu, np.sqrt(counts)[:, None] * (x - mu), n


def _fd_rows(x: np.ndarray, y: np.ndarray, x_counts: np.ndarray | None = None,
             y_counts: np.ndarray | None = None) -> float:
    """`feature_frechet_distance` of the rows of x and y, each repeated `counts` times (default once),
    without input checks (used inside the bootstrap)."""
    mu1, a, n1 = _centred(x, np.ones(len(x)) if x_counts is None else x_counts)
    mu2, b, n2 = _centred(y, np.ones(len(y)) if y_counts is None else y_counts)
    c1, c2 = n1 - 1.0, n2 - 1.0
    if x.shape[1] <= min(len(a), len(b)):
        return frechet_distance(mu1, a.T @ a / c1, mu2, b.T @ b / c2)
    cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    diff = mu1 - mu2
    traces = np.einsum("ij,ij->", a, a) / c1 + np.einsum("ij,ij->", b, b) / c2
    return max(0.0, float(diff @ diff + traces - 2.0 * cross))


def feature_frechet_distance(x, y) -> float:
    """FD between the Gaussian fits (mean, unbiased covariance) of the rows of `x` and of `y`.

    With fewer rows than features the d x d covariances are never formed: for centred rows A (n1 x d) and
    B (n2 x d), S1 = A'A/(n1-1) and S2 = B'B/(n2-1); the eigenvalues of S1^{1/2} S2 S1^{1/2} are those of
    S1 S2, whose non-zero ones are the squared singular values of A B' divided by (n1-1)(n2-1). So the
    cross term Tr((S1^{1/2} S2 S1^{1/2})^{1/2}) is the sum of the singular values of A B' over
    sqrt((n1-1)(n2-1)): exact, and stable for singular covariances. With more rows than features, the
    covariances go to `frechet_distance`.
    """
    x, y = _as_features(x, "feature set x", 2), _as_features(y, "feature set y", 2)
    _same_dimension(x, y)
    return _fd_rows(x, y)


# -------------------------------------------------------------------------------------- precision / recall


def pairwise_distances(x, y) -> np.ndarray:
    """Euclidean distances (len(x), len(y)) between the rows of x and y."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(squared, 0.0, None))


def knn_radii(distances: np.ndarray, k: int) -> np.ndarray:
    """Per point of a set, the distance to its k-th nearest *other* point, from the set's square distance
    matrix (its diagonal is ignored). With k or fewer other points, the farthest other point's distance
    (0 for a lone point): a resample can have few distinct rows."""
    n = len(distances)
    if n < 2:
        return np.zeros(n)
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    kth = min(k, n - 1) - 1
    return np.partition(others, kth, axis=1)[:, kth]


def _inside(cross: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """cross[i, j] = distance from query i to ball centre j; True where query i lies in some closed ball."""
    return (cross <= radii[None, :]).any(axis=1)


def precision_recall(generated, reference, k: int = DEFAULT_K) -> tuple[float, float]:
    """(precision, recall) of `generated` against `reference` with k-NN manifolds (see the module docstring):
    precision = share of generated rows within the k-th-neighbour ball of some reference row; recall = share
    of reference rows within the k-th-neighbour ball of some generated row. Balls are closed (distance <= radius)."""
    g, r = _as_features(generated, "generated features"), _as_features(reference, "reference features")
    _same_dimension(g, r)
    _check_k(k, len(g), len(r))
    _, precision, recall = _SetPair(g, r).metrics(np.arange(len(g)), np.arange(len(r)), k)
    return float(precision), float(recall)


def _neighbour_order(distances: np.ndarray) -> np.ndarray:
    """Per point of a set, the indices of the other points from nearest to farthest (itself left out)."""
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    return np.argsort(others, axis=1, kind="stable")[:, :-1]


# Nearest neighbours looked at per point before falling back to a full partition (a resample keeps about 63% of
# the points, so k present ones are nearly always among the first few dozen).
_LOOK_AHEAD = 32


def _subset_radii(distances: np.ndarray, order: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """`knn_radii` of the points `rows` (distinct, sorted) among themselves, from the full set's distances and
    `_neighbour_order`: walking each point's neighbours in order, the k-th one present is its k-th nearest other
    present point. The same values as `knn_radii(distances[np.ix_(rows, rows)], k)`, without sorting."""
    n = len(rows)
    if n < 2:
        return np.zeros(n)
    kth = min(k, n - 1)
    present = np.zeros(len(distances), dtype=bool)
    present[rows] = True
    look = order[rows, :_LOOK_AHEAD]
    counted = np.cumsum(present[look], axis=1)
    found = counted[:, -1] >= kth
    at = np.argmax(counted >= kth, axis=1)
    radii = distances[rows, look[np.arange(n), at]]
    if not found.all():  # rare: fewer than k present among the first neighbours; sort those rows in full
        radii[~found] = knn_radii(distances[np.ix_(rows, rows)], k)[~found]
    return radii


class _Drawn:
    """One resample of a set: its distinct rows, their counts, and what the measures need of them."""

    def __init__(self, pool: "_Pool", picks: np.ndarray, k: int):
        self.rows, counts = np.unique(picks, return_counts=True)
        self.counts = counts.astype(np.float64)
        self.n = float(self.counts.sum())
        self.radii = _subset_radii(pool.distances, pool.order, self.rows, k)
        self.x = pool.x[self.rows]
        self.mean = self.counts @ self.x / self.n
        # Tr of the scatter matrix: sum of count * |x - mean|^2
        self.scatter_trace = float(self.counts @ pool.squares[self.rows] - self.n * (self.mean @ self.mean))


class _Pool:
    """One set's rows with its distance matrix and neighbour order, computed once for many resamples."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.squares = (x * x).sum(1)
        self.distances = pairwise_distances(x, x)
        self.order = _neighbour_order(self.distances)

    def draw(self, picks: np.ndarray, k: int) -> _Drawn:
        return _Drawn(self, picks, k)


class _SetPair:
    """A generated and a reference set with their distance and inner-product matrices, computed once for many
    resamples; `reference` may be shared by several pairs (one reference resample serves them all)."""

    def __init__(self, generated: np.ndarray, reference: np.ndarray | _Pool):
        self.gen = _Pool(generated)
        self.ref = reference if isinstance(reference, _Pool) else _Pool(reference)
        self.d_gr = pairwise_distances(generated, self.ref.x)
        self.inner_gr = generated @ self.ref.x.T

    def metrics(self, gi: np.ndarray, ri: np.ndarray | _Drawn, k: int) -> np.ndarray:
        """[FD, precision, recall] of the resample made of rows `gi` of generated and `ri` of reference
        (repeats allowed; `ri` may be a reference resample already drawn): a repeated row weighs as many times
        in the Gaussian fit and in the shares, and the k-NN balls are built on the distinct rows."""
        g = self.gen.draw(gi, k)
        r = ri if isinstance(ri, _Drawn) else self.ref.draw(ri, k)
        cross = self.d_gr[np.ix_(g.rows, r.rows)]
        precision = g.counts @ _inside(cross, r.radii) / g.n
        recall = r.counts @ _inside(cross.T, g.radii) / r.n
        return np.array([self._fd(g, r), precision, recall])

    def _fd(self, g: _Drawn, r: _Drawn) -> float:
        """`_fd_rows` of the two resamples. With fewer distinct rows than features, the cross term is computed
        from the inner products of the rows (precomputed for the whole sets): the centred, count-weighted
        matrix M = A B' (see `feature_frechet_distance`) is the inner products minus the mean corrections, and
        the sum of its singular values is the sum of the square roots of the eigenvalues of the smaller of
        M M' and M'M."""
        d = self.gen.x.shape[1]
        if d <= min(len(g.rows), len(r.rows)):
            return _fd_rows(g.x, r.x, g.counts, r.counts)
        m = (self.inner_gr[np.ix_(g.rows, r.rows)] - (g.x @ r.mean)[:, None] - (r.x @ g.mean)[None, :]
             + g.mean @ r.mean)
        m *= np.sqrt(g.counts)[:, None]
        m *= np.sqrt(r.counts)[None, :]
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        c1, c2 = g.n - 1.0, r.n - 1.0
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum() / np.sqrt(c1 * c2)
        diff = g.mean - r.mean
        return max(0.0, float(diff @ diff + g.scatter_trace / c1 + r.scatter_trace / c2 - 2.0 * cross))


# ---------------------------------------------------------------------------------------------- bootstrap


def _strata(groups, n: int, what: str) -> list[np.ndarray]:
    """Row indices per group (in first-seen order); one group of all rows when `groups` is None."""
    if groups is None:
        return [np.arange(n)]
    labels = list(groups)
    if len(labels) != n:
        raise UserError(f"{what}: got {len(labels)} group labels for {n} rows; pass one per row")
    members: dict = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    return [np.array(rows) for rows in members.values()]


def _resample(strata: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Rows drawn with replacement within each stratum, as many as it holds."""
    return np.concatenate([rows[rng.integers(0, len(rows), len(rows))] for rows in strata])


# The range of [FD, precision, recall] and of their differences, for clipping the intervals.
_RANGES = ((0.0, np.inf), (0.0, 1.0), (0.0, 1.0))
_DIFFERENCE_RANGES = ((-np.inf, np.inf), (-1.0, 1.0), (-1.0, 1.0))


def centred_interval(estimate: float, boots: np.ndarray, level: float, n: int,
                     bounds: tuple[float, float] = (-np.inf, np.inf)) -> Interval:
    """The percentile interval of the resampled values `boots`, moved so that their median falls on
    `estimate`: [estimate - (median - q_low), estimate + (q_high - median)], clipped to `bounds`. The
    bootstrap gives the spread; the estimate stays the statistic of the sets as given."""
    alpha = (1.0 - level) / 2.0
    low, median, high = np.quantile(boots, [alpha, 0.5, 1.0 - alpha])
    lo_bound, hi_bound = bounds
    return Interval(float(estimate), float(np.clip(estimate - (median - low), lo_bound, hi_bound)),
                    float(np.clip(estimate + (high - median), lo_bound, hi_bound)), n)


def _intervals(estimates: np.ndarray, boots: np.ndarray, level: float, n: int, ranges) -> list[Interval]:
    return [centred_interval(float(estimates[j]), boots[:, j], level, n, ranges[j]) for j in range(len(estimates))]


def distribution_metrics(generated, reference, *, k: int = DEFAULT_K, groups: Sequence | None = None,
                         reference_groups: Sequence | None = None, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                         level: float = 0.95) -> DistributionMetrics:
    """FD, precision and recall of `generated` against `reference`, with bootstrap intervals (`centred_interval`).

    Each of the `samples` resamples (fixed `seed`) draws the generated rows and, independently, the reference
    rows with replacement, within `groups` / `reference_groups` when given (one label per row, e.g. the
    prompt). The estimates are those of the sets as given, never a bootstrap average.
    """
    check_bootstrap_options(samples, level)
    g, r = _as_features(generated, "generated features", 2), _as_features(reference, "reference features", 2)
    _same_dimension(g, r)
    _check_k(k, len(g), len(r))
    g_strata = _strata(groups, len(g), "groups")
    r_strata = _strata(reference_groups, len(r), "reference_groups")
    pair = _SetPair(g, r)
    estimates = pair.metrics(np.arange(len(g)), np.arange(len(r)), k)
    rng = np.random.default_rng(seed)
    boots = np.empty((samples, 3))
    for b in range(samples):
        gi = _resample(g_strata, rng)
        boots[b] = pair.metrics(gi, _resample(r_strata, rng), k)
    fd, precision, recall = _intervals(estimates, boots, level, len(g), _RANGES)
    return DistributionMetrics(fd, precision, recall, len(r), int(k))


def paired_distribution_difference(a, b, reference, *, k: int = DEFAULT_K, groups: Sequence | None = None,
                                   reference_groups: Sequence | None = None, samples: int = DEFAULT_SAMPLES,
                                   seed: int = 0, level: float = 0.95, unmatched_a: int = 0,
                                   unmatched_b: int = 0) -> DistributionDifference:
    """(metrics of `a`) - (metrics of `b`) against one `reference`, where row i of `a` and row i of `b` are a
    matched pair (same prompt and seed). Each resample draws pairs (the same rows of both sets, within
    `groups` when given) and, independently, reference rows (within `reference_groups`); both sides of a
    resample are measured against the same reference resample, so what is shared cancels."""
    check_bootstrap_options(samples, level)
    a, b = _as_features(a, "features a", 2), _as_features(b, "features b", 2)
    r = _as_features(reference, "reference features", 2)
    if a.shape != b.shape:
        raise UserError(f"a paired difference needs matched rows: got {len(a)} rows for a and {len(b)} for b "
                        f"(dimensions {a.shape[1]} and {b.shape[1]})")
    _same_dimension(a, r)
    _check_k(k, len(a), len(r))
    p_strata = _strata(groups, len(a), "groups")
    r_strata = _strata(reference_groups, len(r), "reference_groups")
    side_a = _SetPair(a, r)
    side_b = _SetPair(b, side_a.ref)
    every_pair, every_ref = np.arange(len(a)), np.arange(len(r))
    estimates = side_a.metrics(every_pair, every_ref, k) - side_b.metrics(every_pair, every_ref, k)
    rng = np.random.default_rng(seed)
    boots = np.empty((samples, 3))
    for s in range(samples):
        pi, drawn = _resample(p_strata, rng), side_a.ref.draw(_resample(r_strata, rng), k)
        boots[s] = side_a.metrics(pi, drawn, k) - side_b.metrics(pi, drawn, k)
    fd, precision, recall = _intervals(estimates, boots, level, len(a), _DIFFERENCE_RANGES)
    return DistributionDifference(fd, precision, recall, len(r), int(k), unmatched_a, unmatched_b)


def run_jobs(jobs: Sequence[tuple[Callable, dict]], processes: int = 1) -> Iterator:
    """The results of `fn(**kwargs)` for each (fn, kwargs) of `jobs`, in order. With `processes` above 1 (on
    Linux, where forking a process that has loaded torch is safe) the jobs run in that many forked processes: the
    measures are pure numpy, seeded per job, so the results are the same either way. Yields each result as it is
    ready, in the jobs' order."""
    if processes <= 1 or len(jobs) < 2 or not sys.platform.startswith("linux"):
        for fn, kwargs in jobs:
            yield fn(**kwargs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(fn, **kwargs) for fn, kwargs in jobs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
