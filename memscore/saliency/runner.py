"""A scoring model whose forward also gives each image's memorability map.

``ScoreImages(maps=MapSettings(...))`` wraps each model in ``MapRunner``: one call returns the
score, as the model alone gives it (Grad-CAM's forward is the model's own forward, with the
layers' outputs kept for the backward; occlusion's and RISE's first forward is the plain one),
and the map, flattened row-major, which the stage writes as ``<score column>_map``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memscore.saliency.methods import gradcam, integrated_gradients, occlusion, rise

__all__ = ["MapSettings", "MapRunner", "MAP_METHODS", "DEFAULT_METHOD", "map_column", "check_maps"]

#: ``--map-method`` choices; the default is the one benchmarks/MAPS_RESULTS.md measured most
#: faithful at no more than 3x a plain forward pass.
MAP_METHODS = ("gradcam", "occlusion", "rise", "integrated-gradients")
DEFAULT_METHOD = "gradcam"


@dataclass(frozen=True)
class MapSettings:
    """What ``--maps`` computes: ``method`` at ``size`` x ``size`` cells, with the method's own
    settings (RISE's masks, integrated gradients' steps), all recorded in the run's summary."""

    method: str = DEFAULT_METHOD
    size: int = 16
    rise_masks: int = 256
    ig_steps: int = 16

    def record(self) -> dict:
        settings = asdict(self)
        if self.method != "rise":
            settings.pop("rise_masks")
        if self.method != "integrated-gradients":
            settings.pop("ig_steps")
        return settings


def map_column(score_column: str) -> str:
    """The map column beside a score column: ``memorability`` -> ``memorability_map``."""
    return f"{score_column}_map"


def check_maps(settings: MapSettings, model: str, meta: dict) -> None:
    """Raise ``ValueError`` (one line) where ``model`` cannot have ``settings``' maps."""
    if settings.method not in MAP_METHODS:
        raise ValueError(f"--map-method {settings.method!r}: one of {', '.join(MAP_METHODS)}")
    if not 2 <= settings.size <= 64:
        raise ValueError(f"--map-size must be 2..64, got {settings.size}")
    if "output_columns" in meta:
        raise ValueError(
            f"--maps: {model} writes {len(meta['output_columns'])} columns, not one score; "
            f"maps are of one score"
        )
    if settings.method == "gradcam" and not meta.get("map_layers"):
        raise ValueError(
            f"--maps: {model} declares no layers for Grad-CAM; give --map-method occlusion "
            f"(any model, {settings.size**2 + 1} forwards per image)"
        )


class MapRunner:
    """``model`` (one score per image) -> its forward returns ``{score_key: (N,), map_key:
    (N, S*S)}``."""

    def __init__(self, model, score_key: str, map_key: str, settings: MapSettings, layers=()):
        self.model = model
        self.score_key = score_key
        self.map_key = map_key
        self.settings = settings
        self.layers = tuple(layers)

    def _score(self, batch):
        return self.model(batch).reshape(-1)

    def __call__(self, batch):
        s = self.settings
        if s.method == "gradcam":
            scores, maps = gradcam(self.model, batch, s.size, self.layers)
        elif s.method == "occlusion":
            scores, maps = occlusion(self._score, batch, s.size)
        elif s.method == "rise":
            scores, maps = rise(self._score, batch, s.size, masks=s.rise_masks)
        else:
            scores, maps = integrated_gradients(self.model, batch, s.size, steps=s.ig_steps)
        return {self.score_key: scores.reshape(-1), self.map_key: maps.flatten(1)}
