"""How faithful a map is: the deletion test of RISE (Petsiuk et al. 2018), on the map's cells.

A faithful map ranks first the cells the score comes from, so greying them lowers the score
more than greying as many cells at random. For each image and its S x S map:

- ``top_fall``: the score's fall when the ``fraction`` (20%) of cells the map ranks highest
  are grey (``GREY``, the value the methods remove with);
- ``random_fall``: the mean fall over ``draws`` (5) random sets of as many cells;
- ``curve``: the score as cells are greyed in the map's order, ``points`` steps from none to
  all; ``auc``: its mean (lower: the score falls sooner, the map more faithful). The curve is
  of the score itself, so an AUC compares methods on the same images, not across images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memscore.saliency.methods import GREY, cells_to_pixels

__all__ = ["Deletion", "deletion_test"]


@dataclass(frozen=True)
class Deletion:
    """One image's deletion test (see the module docstring)."""

    score: float
    top_fall: float
    random_fall: float
    curve: tuple[float, ...]

    @property
    def auc(self) -> float:
        return float(np.mean(self.curve))


def _greyed(x, cells):
    """``x`` (1, 3, H, W) once per row of ``cells`` (B, S, S) bool, those cells grey."""
    import torch

    masks = cells_to_pixels(cells, x.shape[2], x.shape[3]).bool()
    return torch.where(masks, torch.full_like(x, GREY), x)


def deletion_test(
    score: Callable,
    x,
    maps,
    *,
    fraction: float = 0.2,
    draws: int = 5,
    points: int = 11,
    seed: int = 0,
) -> list[Deletion]:
    """The deletion test of each image of ``x`` (N, 3, H, W) with its map (N, S, S);
    ``score(batch) -> (B,)`` is the model."""
    import torch

    maps = torch.as_tensor(np.asarray(maps, np.float32))
    n, size, _ = maps.shape
    cells = size * size
    k = max(1, round(fraction * cells))
    rng = np.random.default_rng(seed)
    # ties among a map's cells are broken at random (a draw of their own, so the random sets
    # are the same for every map): an empty map must not score as if it ranked the image's
    # top rows first, which is what reading order would make of it
    tie_rng = np.random.default_rng(seed + 1)
    results = []
    for i in range(n):
        order = np.lexsort((tie_rng.permutation(cells), -maps[i].reshape(-1).numpy()))
        sets = [order[:k]] + [rng.choice(cells, size=k, replace=False) for _ in range(draws)]
        steps = [round(cells * j / (points - 1)) for j in range(points)]
        sets += [order[:m] for m in steps]
        chosen = torch.zeros(len(sets), cells, dtype=torch.bool)
        for row, picked in enumerate(sets):
            chosen[row, torch.as_tensor(np.asarray(picked, np.int64))] = True
        with torch.inference_mode():
            base = float(score(x[i : i + 1])[0])
            values = score(_greyed(x[i : i + 1], chosen.view(-1, size, size))).float().numpy()
        top = base - values[0]
        random = base - values[1 : 1 + draws].mean()
        results.append(
            Deletion(base, float(top), float(random), tuple(values[1 + draws :].tolist()))
        )
    return results
