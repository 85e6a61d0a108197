"""The evaluation's figures, as PNG bytes: densities of predictions over ground truth, a
scatter of the two with the rank correlation in its title, and per-layer correlation curves of
trace columns.

Predictions on another scale than the ground truth (an autoencoder's loss, not a memorability
score; ``metrics.on_one_scale``) get their own axis: the densities in two panels, the scatter
without the y = x line.

matplotlib is imported inside the functions and drawn through its Agg canvas directly (no
pyplot, no global backend or figure state), so importing memscore never imports it and
figures can be drawn from any thread. The densities are scipy's Gaussian kernel density
estimates with Scott's bandwidth (scipy imported inside, too).
"""

from __future__ import annotations

import io
import math

import numpy as np

from memscore.evaluation.metrics import on_one_scale

__all__ = ["gaussian_kde", "distribution_png", "scatter_png", "layers_png"]

# Up to this many values the density is summed over every value exactly; above it over a fine
# histogram of them (bins of a twentieth of the bandwidth: the difference is far below what a
# plot shows; the figures in gaussian_kde).
_EXACT_KDE_MAX = 5000
# Up to this many points the scatter draws each one; above it a hexagonal-bin count (a 100k
# point scatter is a solid blot and slow to draw).
_SCATTER_MAX = 5000

_TRUTH_COLOUR = "0.35"
_PREDICTION_COLOUR = "tab:blue"


def gaussian_kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """``scipy.stats.gaussian_kde`` of ``values`` at ``grid``, with Scott's bandwidth.

    The bandwidth is ``std(values, ddof=1) * n ** (-1/5)``. Returns None where no density
    exists (fewer than two values, or all equal), where scipy would raise.

    Example:
        >>> d = gaussian_kde(np.array([0.4, 0.5, 0.7]), np.linspace(0, 1, 5))
        >>> d.shape
        (5,)
    """
    from scipy import stats  # lazily, as matplotlib: importing scipy.stats takes about 0.5 s

    values = np.asarray(values, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    n = values.size
    if n < 2:
        return None
    bandwidth = float(np.std(values, ddof=1)) * n ** (-0.2)
    if not bandwidth > 0:
        return None
    if n <= _EXACT_KDE_MAX:
        return stats.gaussian_kde(values)(grid)  # Scott's rule is scipy's default
    # Over _EXACT_KDE_MAX values, scipy's kernel sum over every value costs n x grid: 2.6 s for
    # 100,000 values and 14.3 s for 1,000,000 on 512 points (2-core x86), and a figure has
    # two densities. Over the histogram's centres, weighted by their counts, with the values'
    # own bandwidth, it takes 0.13 s, within 8.6e-4 of the exact density (peak 3.1) at 20,000.
    low, high = float(values.min()), float(values.max())
    bins = int(min(100_000, max(1, math.ceil((high - low) / (bandwidth / 20)))))
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    keep = counts > 0  # min and max fall in the first and last bins: two centres at least
    centres, counts = centres[keep], counts[keep].astype(np.float64)
    # scipy's bandwidth is a factor times the (weighted) spread of the points it is given:
    # the factor that makes it the values' own Scott bandwidth.
    spread = math.sqrt(float(np.cov(centres, aweights=counts)))
    return stats.gaussian_kde(centres, bw_method=bandwidth / spread, weights=counts)(grid)


def _axis_range(*arrays: np.ndarray) -> tuple[float, float]:
    """0..1, widened to take in any value outside it."""
    low = min([0.0] + [float(a.min()) for a in arrays if a.size])
    high = max([1.0] + [float(a.max()) for a in arrays if a.size])
    return low, high


def _padded(values: np.ndarray, margin_share: float = 0.04) -> tuple[float, float]:
    """The range of ``values`` with margins of ``margin_share`` of it (a unit range around a
    constant)."""
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    margin = (high - low) * margin_share or 0.5
    return low - margin, high + margin


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _draw_density(
    axes, values: np.ndarray, grid: np.ndarray, label: str, colour: str, alpha: float
) -> None:
    density = gaussian_kde(values, grid)
    if density is None:  # one value, or all equal: a line where they are
        if values.size:
            axes.axvline(values[0], color=colour, linewidth=2, label=f"{label} (constant)")
        return
    axes.fill_between(grid, density, color=colour, alpha=alpha, linewidth=0)
    axes.plot(grid, density, color=colour, linewidth=1.8, label=label)


def distribution_png(
    prediction: np.ndarray,
    truth: np.ndarray,
    *,
    prediction_label: str,
    truth_label: str,
    title: str = "",
) -> bytes:
    """Density of the predictions drawn over the density of the ground truth on 0..1.

    The lowest prediction is marked: a model with a floor (ResMem's near 0.41) shows the truth
    it cannot reach below it. Predictions on another scale (``on_one_scale``) are drawn in a
    panel of their own under the truth's.
    """
    from matplotlib.figure import Figure

    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    heading = (
        f"{title + ': ' if title else ''}predictions over ground truth, n = {prediction.size:,}"
    )
    if not on_one_scale(prediction, truth):
        figure = Figure(figsize=(7, 5.6), layout="constrained")
        top, bottom = figure.subplots(2, 1)
        for axes, values, label, colour, alpha, (low, high) in (
            (top, truth, truth_label, _TRUTH_COLOUR, 0.30, _axis_range(truth)),
            (
                bottom,
                prediction,
                prediction_label,
                _PREDICTION_COLOUR,
                0.35,
                _padded(prediction, 0.15),
            ),
        ):  # room for the density's tails
            _draw_density(axes, values, np.linspace(low, high, 512), label, colour, alpha)
            axes.set_xlim(low, high)
            axes.set_ylim(bottom=0)
            axes.set_ylabel("density")
            axes.legend(loc="upper left", frameon=False)
        top.set_xlabel("memorability")
        bottom.set_xlabel(f"{prediction_label}, on its own scale")
        top.set_title(heading)
        return _png(figure)
    low, high = _axis_range(prediction, truth)
    grid = np.linspace(low, high, 512)
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for values, label, colour, alpha in (
        (truth, truth_label, _TRUTH_COLOUR, 0.30),
        (prediction, prediction_label, _PREDICTION_COLOUR, 0.35),
    ):
        _draw_density(axes, values, grid, label, colour, alpha)
    if prediction.size:
        lowest = float(prediction.min())
        axes.axvline(
            lowest,
            color=_PREDICTION_COLOUR,
            linestyle=":",
            linewidth=1.2,
            label=f"lowest prediction {lowest:.3f}",
        )
    axes.set_xlim(low, high)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("memorability")
    axes.set_ylabel("density")
    axes.set_title(heading)
    axes.legend(loc="upper left", frameon=False)
    return _png(figure)


def scatter_png(
    truth: np.ndarray,
    prediction: np.ndarray,
    *,
    rho: float,
    interval: list[float] | None,
    truth_label: str,
    prediction_label: str,
    title: str = "",
) -> bytes:
    """Ground truth (x) against predictions (y), with Spearman's rho in the title.

    Up to 5000 points are drawn one by one, translucent; more as a hexagonal-bin count on a
    log colour scale, so 100k points stay readable and fast to draw. The dashed line is y = x,
    drawn where the predictions are on the truth's scale (``on_one_scale``); otherwise each
    axis spans its own values.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    n = truth.size
    same_scale = on_one_scale(prediction, truth)
    low, high = _axis_range(truth, prediction) if same_scale else _axis_range(truth)
    y_low, y_high = (low, high) if same_scale else _padded(prediction)
    figure = Figure(figsize=(5.6, 5.2), layout="constrained")
    axes = figure.add_subplot()
    if n > _SCATTER_MAX:
        cells = axes.hexbin(
            truth,
            prediction,
            gridsize=70,
            extent=(low, high, y_low, y_high),
            mincnt=1,
            norm=LogNorm(),
            cmap="viridis",
            linewidths=0,
        )
        figure.colorbar(cells, ax=axes, label="images per cell", shrink=0.8)
    elif n:
        alpha = float(np.clip(300.0 / n, 0.15, 0.8))
        axes.scatter(
            truth,
            prediction,
            s=10 if n > 500 else 18,
            alpha=alpha,
            color=_PREDICTION_COLOUR,
            edgecolors="none",
        )
    axes.set_xlim(low, high)
    axes.set_ylim(y_low, y_high)
    if same_scale:
        axes.plot([low, high], [low, high], color="0.5", linestyle="--", linewidth=1)
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


# Names the paper gives its encoders, for legends; other encoder prefixes are shown as written.
_ENCODER_NAMES = {"clip": "CLIP", "dinov2": "DINOv2", "siglip2": "SigLIP2"}


def layers_png(curves, *, truth_label: str) -> bytes:
    """Spearman's rho per layer: one panel per feature, one curve per encoder in it.

    Drawn as Takmaz et al. (2025) draw their figures: layers on the x axis, rho on y from
    -0.4 to 0.4 (widened where a value or interval lies outside), one marked curve per encoder,
    here with the 95% bootstrap interval shaded. A layer without a rho (constant values, too
    few rows) is a gap in its curve.

    Args:
        curves: dicts with ``feature`` (the panel), ``encoder`` (the curve), ``x`` (layer
            numbers), ``rho``, ``lo``, ``hi`` (floats, NaN where undefined) and optionally
            ``ticks`` ({layer number: label}, e.g. ``{1: "0-1"}``).
        truth_label: what rho is measured against, for the title.

    Example:
        >>> png = layers_png([{"feature": "cls_mean", "encoder": "clip", "x": [0, 1, 2],
        ...                    "rho": [float("nan"), 0.36, 0.2], "lo": [float("nan"), 0.3, 0.1],
        ...                    "hi": [float("nan"), 0.4, 0.3]}], truth_label="memorability")
        >>> png[:4]
        b'\\x89PNG'
    """
    from matplotlib.figure import Figure

    features = list(dict.fromkeys(curve["feature"] for curve in curves))
    encoders = list(dict.fromkeys(curve["encoder"] for curve in curves))
    palette = [f"C{i % 10}" for i in range(len(encoders))]
    colour = dict(zip(encoders, palette))
    columns = min(3, max(1, len(features)))
    rows = math.ceil(len(features) / columns) if features else 1
    figure = Figure(figsize=(4.4 * columns, 3.3 * rows + 0.5), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat[len(features) :]:
        axes.set_visible(False)
    for feature, axes in zip(features, grid.flat):
        limit = 0.4
        ticks: dict = {}
        for curve in (c for c in curves if c["feature"] == feature):
            x = np.asarray(curve["x"], dtype=np.float64)
            rho, lo, hi = (np.asarray(curve[k], dtype=np.float64) for k in ("rho", "lo", "hi"))
            name = _ENCODER_NAMES.get(curve["encoder"], curve["encoder"]) or feature
            axes.fill_between(x, lo, hi, color=colour[curve["encoder"]], alpha=0.15, linewidth=0)
            axes.plot(x, rho, marker=".", color=colour[curve["encoder"]], label=name)
            shown = np.concatenate([rho, lo, hi])
            shown = shown[np.isfinite(shown)]
            if shown.size:
                limit = max(limit, float(np.abs(shown).max()) * 1.05)
            ticks.update({float(k): v for k, v in (curve.get("ticks") or {}).items()})
            ticks.update({float(v): None for v in x if float(v) not in ticks})
        axes.axhline(0, color="0.6", linewidth=0.8)
        positions = sorted(ticks)
        axes.set_xticks(
            positions,
            [ticks[p] if ticks[p] is not None else f"{p:g}" for p in positions],
            rotation=45 if any(ticks.values()) else 0,
            fontsize=8,
        )
        axes.set_ylim(-limit, limit)
        axes.set_xlabel("layer")
        axes.set_ylabel("Spearman ρ")
        axes.set_title(feature)
        axes.spines[["top", "right"]].set_visible(False)
        axes.legend(frameon=False, fontsize=8)
    figure.suptitle(f"Spearman ρ with {truth_label} per layer (shaded: 95% bootstrap interval)")
    return _png(figure)
