"""Exact per-channel reductions over any number of rows, in memory bounded by channels x k.

``memscore features`` reads each output file's activations once and folds them into three
summaries per layer, computed per file (a Ray task each) and merged: the merge is associative
and exact, so the result does not depend on how rows were cut into files or blocks, nor on the
order the parts arrive in.

- ``TopK``: the ``k`` rows with the highest activation of each channel. Ties are broken by the
  smaller row id, so "the top k" is one well-defined set and ranking (value descending, then
  row ascending) makes every merge order give the same answer.
- ``Moments``: count, mean and the sum of squared deviations of each channel, merged with Chan,
  Golub and LeVeque's pairwise update (1979) in float64, so a mean and a std over tens of
  millions of rows lose no digits to a running float32 sum.
- ``spearman``: the exact rank correlation of each channel with a score, from the channel's
  values over all rows (ranks with ties averaged, as ``scipy.stats.spearmanr``); the caller
  bounds memory by passing a slice of channels at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Moments", "TopK", "spearman"]


@dataclass
class TopK:
    """Per channel, the ``k`` highest ``values`` and their ``rows``, best first.

    ``values`` and ``rows`` are (channels, k') with k' <= k (fewer while fewer rows were seen).
    """

    k: int
    values: np.ndarray
    rows: np.ndarray

    @classmethod
    def empty(cls, k: int, channels: int) -> TopK:
        return cls(k, np.empty((channels, 0), np.float32), np.empty((channels, 0), np.int64))

    @classmethod
    def of(cls, k: int, activations: np.ndarray, rows: np.ndarray) -> TopK:
        """The top ``k`` of (n, channels) ``activations`` whose row ids are ``rows`` (n,)."""
        activations = np.asarray(activations, np.float32)
        rows = np.asarray(rows, np.int64)
        channels = activations.shape[1]
        values = np.ascontiguousarray(activations.T)  # (channels, n)
        ids = np.broadcast_to(rows, values.shape)
        return cls(k, *_best(values, ids, k)) if len(rows) else cls.empty(k, channels)

    def merge(self, other: TopK) -> TopK:
        if self.k != other.k or self.values.shape[0] != other.values.shape[0]:
            raise ValueError("merging top-k of other k or other channels")
        values = np.concatenate([self.values, other.values], axis=1)
        rows = np.concatenate([self.rows, other.rows], axis=1)
        return TopK(self.k, *_best(values, rows, self.k))


def _best(values: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each line's ``k`` best (value descending, row id ascending), in that order."""
    # lexsort sorts by the last key first: value descending, then row ascending
    order = np.lexsort((rows, -values.astype(np.float64)), axis=1)[:, :k]
    return (
        np.take_along_axis(values, order, axis=1).astype(np.float32),
        np.take_along_axis(rows, order, axis=1).astype(np.int64),
    )


@dataclass
class Moments:
    """Per channel: rows counted, their mean and their sum of squared deviations (float64)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> Moments:
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, activations: np.ndarray) -> Moments:
        x = np.asarray(activations, np.float64)
        if len(x) == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        n = self.n + other.n
        if n == 0:
            return Moments(0, self.mean.copy(), self.m2.copy())
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """The population standard deviation (ddof=0), NaN where no row was counted."""
        if self.n == 0:
            return np.full_like(self.mean, np.nan)
        return np.sqrt(self.m2 / self.n)


def spearman(activations: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column of (n, channels) ``activations`` with ``score`` (n,).

    NaN for a channel (or a score) that is constant over the rows, as scipy gives.
    """
    from scipy.stats import rankdata  # ties get their average rank, as spearmanr ranks them

    x = np.asarray(activations, np.float64)
    y = np.asarray(score, np.float64).reshape(-1, 1)
    if x.shape[0] < 2:
        return np.full(x.shape[1], np.nan)
    rx = rankdata(x, axis=0)
    ry = rankdata(y, axis=0)
    rx -= rx.mean(axis=0)
    ry -= ry.mean(axis=0)
    num = (rx * ry).sum(axis=0)
    den = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = num / den
    rho[den == 0] = np.nan
    return rho
