"""Evaluation metrics: Spearman's rho (the primary figure) and Pearson's r from ``scipy.stats``,
MSE, MAE, a bootstrap interval for rho, and the split-half ceiling.

Every function takes 1-D float arrays without missing values (the caller drops nulls and counts
them) and returns ``nan`` where a figure is undefined (too few values, a constant column) rather
than raising, so one empty category never stops a report.

Example:
    >>> import numpy as np
    >>> x = np.array([0.1, 0.4, 0.4, 0.9]); y = np.array([0.2, 0.3, 0.5, 0.8])
    >>> round(spearman(x, y), 6)
    0.948683
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MIN_N",
    "pearson",
    "spearman",
    "mse",
    "mae",
    "bootstrap_spearman",
    "percentile_interval",
    "spearman_brown",
    "on_one_scale",
    "summary",
]

MIN_N = 3  # fewer pairs than this give no correlation (two points always correlate +-1)

# Bootstrap resamples are processed in chunks of about this many (resample, image) cells, so
# 1000 resamples of 1M images need tens of MB at a time, not 8 GB.
_CHUNK_CELLS = 1 << 20


def _undefined(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether no correlation exists: fewer than ``MIN_N`` pairs, or a constant column.

    Checked here, before scipy, because scipy raises below two pairs and warns
    (``ConstantInputWarning``) on a constant column, where memscore reports nan quietly.
    """
    return min(x.size, y.size) < MIN_N or bool(np.all(x == x[0])) or bool(np.all(y == y[0]))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (``scipy.stats.pearsonr``'s statistic); nan for fewer than ``MIN_N`` pairs or
    a constant column."""
    import warnings

    from scipy import stats  # lazily: importing scipy.stats takes about 0.5 s

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if _undefined(x, y):
        return float("nan")
    with warnings.catch_warnings():
        # Values that differ only in their last digits (a spread under ~2e-12 of their mean)
        # still have an r; scipy computes it and warns that it may be inaccurate.
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        return float(stats.pearsonr(x, y).statistic)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``'s statistic: Pearson's r of the average ranks);
    nan for fewer than ``MIN_N`` pairs or a constant column."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if _undefined(x, y):
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def mse(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared error; nan when empty."""
    if np.asarray(truth).size == 0:
        return float("nan")
    diff = np.asarray(prediction, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.mean(diff * diff))


def mae(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute error; nan when empty."""
    if np.asarray(truth).size == 0:
        return float("nan")
    diff = np.asarray(prediction, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.mean(np.abs(diff)))


def _tie_starts(sorted_values: np.ndarray) -> np.ndarray | None:
    """First position of each run of equal values in a sorted array; None where all differ."""
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return None if starts.size == sorted_values.size else starts


def _centred_ranks(weights: np.ndarray, starts: np.ndarray | None, mean: float) -> np.ndarray:
    """Average ranks of the (sorted) values within each resample, minus ``mean``.

    ``weights[b, i]`` is how often the i-th smallest value was drawn in resample b. There, a
    value of tie group g has the average rank of its group: the copies of all smaller groups,
    plus (copies of its own group + 1) / 2. Values not drawn get a rank too, but their weight
    of 0 keeps them out of every sum.
    """
    per_group = weights if starts is None else np.add.reduceat(weights, starts, axis=1)
    ranks = np.cumsum(per_group, axis=1)
    ranks -= 0.5 * per_group
    ranks += 0.5 - mean
    if starts is not None:
        ranks = np.repeat(ranks, np.diff(np.r_[starts, weights.shape[1]]), axis=1)
    return ranks


# Why not scipy: on the same index draws, scipy.stats.bootstrap((x, y), spearmanr's statistic,
# paired=True, method="percentile", batch=<this chunk>, rng=seed) gives the same rho per resample
# (within 2.2e-16) and the same interval, in about 10x the time: 1000 resamples of 10,000 pairs
# took 1.84 s against 0.18 s, of 100,000 pairs 18.5 s against 1.73 s (a loop over spearmanr, or
# scipy's row-wise rankdata, the same; benchmarks/metrics_bootstrap.py, METRICS_RESULTS.md).
# `memscore evaluate` draws one bootstrap per group and per trace layer: a few hundred for the
# traces paper's 10,000 images.
def bootstrap_spearman(
    x: np.ndarray, y: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """Spearman's rho of ``resamples`` bootstrap resamples of the (x, y) pairs.

    Resample b draws n pairs with replacement: the indices ``idx``, row b of
    ``rng.integers(0, n, size=(rows, n), dtype=np.int32)`` from
    ``rng = numpy.random.default_rng(seed)``, where ``rows`` is every resample at once up to
    about 1M cells, else chunks of them drawn in order from the same Generator. Each resample's rho
    equals scipy's ``spearmanr`` on ``x[idx], y[idx]``, ties (also those that repeated draws
    make) at their average rank. All resamples of a chunk are computed at once, with no sort
    per resample: a resample is a count of copies per pair, and its rho is the count-weighted
    Pearson correlation of the ranks those counts give. A resample where x or y is constant
    gives nan.

    Example:
        >>> rng = np.random.default_rng(1); x = rng.random(50); y = x + rng.random(50)
        >>> rhos = bootstrap_spearman(x, y, resamples=200, seed=0)
        >>> rhos.shape
        (200,)
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n < MIN_N or resamples < 1:
        return np.full(max(resamples, 0), np.nan)
    if n >= 2**31:
        raise ValueError("bootstrap_spearman takes fewer than 2**31 pairs")
    rng = np.random.default_rng(seed)
    # Work in x's sorted order: the pairs' copies are counted straight into it.
    order_x = np.argsort(x, kind="mergesort")
    position = np.empty(n, dtype=np.intp)
    position[order_x] = np.arange(n)
    ties_x = _tie_starts(x[order_x])
    y_sorted_by_x = y[order_x]
    order_y = np.argsort(y_sorted_by_x, kind="mergesort")  # x-order positions, by y
    ties_y = _tie_starts(y_sorted_by_x[order_y])
    mean_rank = (n + 1) / 2.0  # the mean of n average ranks, ties or not
    chunk = max(1, _CHUNK_CELLS // n)
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(rows, n), dtype=np.int32)
        cells = np.take(position, index)
        cells += (np.arange(rows, dtype=np.intp) * n)[:, None]
        weights = np.bincount(cells.ravel(), minlength=rows * n).reshape(rows, n)
        weights = weights.astype(np.float64)
        rx = _centred_ranks(weights, ties_x, mean_rank)
        var_x = np.einsum("ij,ij,ij->i", weights, rx, rx)
        weights = np.take(weights, order_y, axis=1)  # now in y's sorted order
        rx = np.take(rx, order_y, axis=1)
        ry = _centred_ranks(weights, ties_y, mean_rank)
        weights *= ry
        cov = np.einsum("ij,ij->i", weights, rx)
        var_y = np.einsum("ij,ij->i", weights, ry)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = cov / np.sqrt(var_x * var_y)
        rho[(var_x <= 0) | (var_y <= 0)] = np.nan
        out[start : start + rows] = np.clip(rho, -1.0, 1.0)
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile bootstrap interval ``[lo, hi]`` of the finite samples; nans if none.

    The quantiles are numpy's (linear), as scipy.stats.bootstrap's ``method="percentile"``
    takes them; the resamples whose rho is nan (a constant column drawn) are left out first.
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return [float(lo), float(hi)]


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """The reliability of a test ``factor`` times as long: ``k r / (1 + (k - 1) r)``.

    With factor 2 it turns a split-half correlation into the reliability of the full set of
    participants; nan where undefined.
    """
    if not np.isfinite(r) or 1.0 + (factor - 1.0) * r == 0:
        return float("nan")
    return float(factor * r / (1.0 + (factor - 1.0) * r))


def on_one_scale(prediction: np.ndarray, truth: np.ndarray) -> bool:
    """Whether the predictions are on the ground truth's scale: every prediction lies within
    one width of the truth's range (0..1, widened to take in the truth) of that range.

    A memorability model's scores are (overshoot included); an autoencoder's loss in the
    hundreds is not, and then MSE, MAE and the truth below the lowest prediction mean nothing.

    Example:
        >>> truth = np.array([0.4, 0.9])
        >>> on_one_scale(np.array([0.5, 1.3]), truth), on_one_scale(np.array([120.0]), truth)
        (True, False)
    """
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    low = min([0.0] + ([float(truth.min())] if truth.size else []))
    high = max([1.0] + ([float(truth.max())] if truth.size else []))
    span = high - low
    return bool(
        prediction.size == 0 or (prediction.min() >= low - span and prediction.max() <= high + span)
    )


def summary(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    same_scale: bool = True,
) -> dict:
    """Every figure of one evaluation, for paired predictions and ground truth.

    Keys: n, spearman, spearman_ci95 ([lo, hi], percentile bootstrap over images; nans when
    ``bootstrap`` is 0), pearson, mse, mae, pred_min, pred_max, pred_mean, pred_std,
    truth_min, truth_max, truth_mean, truth_std, truth_share_below_pred_min (the share of
    images whose true score is below the lowest prediction: where a model's scores have a
    floor, as ResMem's near 0.41, this is how much of the truth lies under it). With
    ``same_scale`` False (predictions on another scale, see ``on_one_scale``) mse, mae and
    truth_share_below_pred_min are nan: they compare numbers of different units.
    """
    p = np.asarray(prediction, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    n = int(p.size)
    nan = float("nan")

    def stat(fn, values):
        return float(fn(values)) if values.size else nan

    def std(values):
        return float(np.std(values, ddof=1)) if values.size > 1 else nan

    rho = spearman(p, t)
    interval = (
        [nan, nan]
        if bootstrap < 1 or not np.isfinite(rho)
        else percentile_interval(bootstrap_spearman(p, t, resamples=bootstrap, seed=seed))
    )
    pred_min = stat(np.min, p)
    return {
        "n": n,
        "spearman": rho,
        "spearman_ci95": interval,
        "pearson": pearson(p, t),
        "mse": mse(p, t) if same_scale else nan,
        "mae": mae(p, t) if same_scale else nan,
        "pred_min": pred_min,
        "pred_max": stat(np.max, p),
        "pred_mean": stat(np.mean, p),
        "pred_std": std(p),
        "truth_min": stat(np.min, t),
        "truth_max": stat(np.max, t),
        "truth_mean": stat(np.mean, t),
        "truth_std": std(t),
        "truth_share_below_pred_min": float(np.mean(t < pred_min)) if n and same_scale else nan,
    }
