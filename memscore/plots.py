"""The evaluation's figures, as PNG bytes: densities of predictions over ground truth, and a
scatter of the two with the rank correlation in its title.

matplotlib is imported inside the functions and drawn through its Agg canvas directly (no
pyplot, no global backend or figure state), so importing memscore never imports it and
figures can be drawn from any thread. The densities are Gaussian kernel density estimates
with Scott's bandwidth, computed here in numpy.
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["gaussian_kde", "distribution_png", "scatter_png"]

# Up to this many values the density is summed over every value exactly; above it over a fine
# histogram of them (bins of a twentieth of the bandwidth: the difference is far below what a
# plot shows, and 1M values take milliseconds, not a 1M x 512 matrix).
_EXACT_KDE_MAX = 5000
# Up to this many points the scatter draws each one; above it a hexagonal-bin count (a 100k
# point scatter is a solid blot and slow to draw).
_SCATTER_MAX = 5000

_TRUTH_COLOUR = "0.35"
_PREDICTION_COLOUR = "tab:blue"


def gaussian_kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian KDE of ``values`` at ``grid`` with Scott's bandwidth (as scipy's default).

    The bandwidth is ``std(values, ddof=1) * n ** (-1/5)``. Returns None where no density
    exists (fewer than two values, or all equal).

    Example:
        >>> d = gaussian_kde(np.array([0.4, 0.5, 0.7]), np.linspace(0, 1, 5))
        >>> d.shape
        (5,)
    """
    values = np.asarray(values, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    n = values.size
    if n < 2:
        return None
    bandwidth = float(np.std(values, ddof=1)) * n ** (-0.2)
    if not bandwidth > 0:
        return None
    if n <= _EXACT_KDE_MAX:
        centres, weights = values, np.ones(n)
    else:
        low, high = float(values.min()), float(values.max())
        bins = int(min(100_000, max(1, math.ceil((high - low) / (bandwidth / 20)))))
        weights, edges = np.histogram(values, bins=bins, range=(low, high))
        centres = (edges[:-1] + edges[1:]) / 2
        keep = weights > 0
        centres, weights = centres[keep], weights[keep].astype(np.float64)
    density = np.zeros_like(grid)
    step = max(1, 2_000_000 // max(grid.size, 1))  # bounded memory for the exact sum
    for start in range(0, centres.size, step):
        z = (grid[:, None] - centres[None, start:start + step]) / bandwidth
        density += np.exp(-0.5 * z * z) @ weights[start:start + step]
    return density / (n * bandwidth * math.sqrt(2 * math.pi))


def _axis_range(*arrays: np.ndarray) -> tuple[float, float]:
    """0..1, widened to take in any value outside it."""
    low = min([0.0] + [float(a.min()) for a in arrays if a.size])
    high = max([1.0] + [float(a.max()) for a in arrays if a.size])
    return low, high


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def distribution_png(prediction: np.ndarray, truth: np.ndarray, *, prediction_label: str,
                     truth_label: str, title: str = "") -> bytes:
    """Density of the predictions drawn over the density of the ground truth on 0..1.

    The lowest prediction is marked: a model with a floor (ResMem's near 0.41) shows the truth
    it cannot reach below it.
    """
    from matplotlib.figure import Figure

    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    low, high = _axis_range(prediction, truth)
    grid = np.linspace(low, high, 512)
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for values, label, colour, alpha in ((truth, truth_label, _TRUTH_COLOUR, 0.30),
                                         (prediction, prediction_label, _PREDICTION_COLOUR, 0.35)):
        density = gaussian_kde(values, grid)
        if density is None:  # one value, or all equal: a line where they are
            if values.size:
                axes.axvline(values[0], color=colour, linewidth=2, label=f"{label} (constant)")
            continue
        axes.fill_between(grid, density, color=colour, alpha=alpha, linewidth=0)
        axes.plot(grid, density, color=colour, linewidth=1.8, label=label)
    if prediction.size:
        lowest = float(prediction.min())
        axes.axvline(lowest, color=_PREDICTION_COLOUR, linestyle=":", linewidth=1.2,
                     label=f"lowest prediction {lowest:.3f}")
    axes.set_xlim(low, high)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("memorability")
    axes.set_ylabel("density")
    axes.set_title(f"{title + ': ' if title else ''}predictions over ground truth, "
                   f"n = {prediction.size:,}")
    axes.legend(loc="upper left", frameon=False)
    return _png(figure)


def scatter_png(truth: np.ndarray, prediction: np.ndarray, *, rho: float,
                interval: list[float] | None, truth_label: str, prediction_label: str,
                title: str = "") -> bytes:
    """Ground truth (x) against predictions (y), with Spearman's rho in the title.

    Up to 5000 points are drawn one by one, translucent; more as a hexagonal-bin count on a
    log colour scale, so 100k points stay readable and fast to draw. The dashed line is y = x.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    n = truth.size
    low, high = _axis_range(truth, prediction)
    figure = Figure(figsize=(5.6, 5.2), layout="constrained")
    axes = figure.add_subplot()
    if n > _SCATTER_MAX:
        cells = axes.hexbin(truth, prediction, gridsize=70, extent=(low, high, low, high),
                            mincnt=1, norm=LogNorm(), cmap="viridis", linewidths=0)
        figure.colorbar(cells, ax=axes, label="images per cell", shrink=0.8)
    elif n:
        alpha = float(np.clip(300.0 / n, 0.15, 0.8))
        axes.scatter(truth, prediction, s=10 if n > 500 else 18, alpha=alpha,
                     color=_PREDICTION_COLOUR, edgecolors="none")
    axes.plot([low, high], [low, high], color="0.5", linestyle="--", linewidth=1)
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_aspect("equal")
    axes.set_xlabel(f"ground truth ({truth_label})")
    axes.set_ylabel(f"prediction ({prediction_label})")
    if rho is not None and math.isfinite(rho):
        text = f"Spearman ρ = {rho:.3f}"
        if interval and all(v is not None and math.isfinite(v) for v in interval):
            text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    else:
        text = "Spearman ρ undefined"
    axes.set_title(f"{title + ': ' if title else ''}{text}, n = {n:,}")
    return _png(figure)
