"""``memscore features``' options: ``FeaturesConfig``, a scoring run's options plus the layers,
the top-k and the renderings.

The feature job *is* a scoring run (same reading, decoding, actors, resume and error rows) whose
model stage also records the layers' activations, so its config is ``ScoreConfig``'s with more
fields; ``score_config()`` gives the scoring run it makes into ``OUTPUT/activations``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from memscore.errors import MemscoreError
from memscore.feature_analysis.activations import REDUCTIONS
from memscore.options import as_tuple, fields_as_args, option
from memscore.scoring.config import ScoreConfig

__all__ = ["FeaturesConfig", "ACTIVATIONS_FOLDER"]

#: The scoring run's output inside --output: its rows with their activations.
ACTIVATIONS_FOLDER = "activations"


@fields_as_args
@dataclass(frozen=True)
class FeaturesConfig(ScoreConfig):
    """One feature-analysis run. See ``memscore features --help`` for each field.

    Example:
        >>> cfg = FeaturesConfig("examples/images", output="feats/", layers=("conv4",))
        >>> cfg.score_config().output.endswith("feats/activations")
        True
    """

    manifest: str = field(
        default="",
        metadata=option(
            "What to analyse: any manifest `memscore score` reads (a CSV, Parquet, JSONL or "
            "Arrow table, a folder of images, WebDataset shards, a Parquet table of image "
            "bytes), local or s3://. Not needed with --list-layers.",
            positional=True,
            nargs="?",
        ),
    )
    output: str = field(
        default="",
        metadata=option(
            "Folder (local or s3://) for top_images.parquet, channels.parquet, visualizations/, "
            "sheets/, report.md and the scoring run's rows with their activations "
            "(activations/). Must be empty or absent unless --overwrite or --resume is given.",
            flag="--output",
        ),
    )
    layers: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "Layers to analyse, comma-separated, as `--list-layers` names them (module names of "
            "model.named_modules(); ResMem: its AlexNet-style branch conv1..conv5, its "
            "ResNet-152 features.layer1.0 ... features.layer4.2 and their parts).",
            metavar="LAYER[,LAYER]",
        ),
    )
    reduce: str = field(
        default="mean",
        metadata=option(
            "A channel's activation for an image: its output averaged over positions (mean, as "
            "Olah et al.'s channel objective) or its maximum (max).",
            choices=REDUCTIONS,
        ),
    )
    top_k: int = field(
        default=9,
        metadata=option("Dataset images kept per channel, highest activation first (exact)."),
    )
    truth_column: str | None = field(
        default=None,
        metadata=option(
            "Manifest column of measured memorability: channels.parquet then also gives each "
            "channel's Spearman correlation with it (spearman_truth)."
        ),
    )
    visualize: int = field(
        default=0,
        metadata=option(
            "Channels per layer to render by activation optimization (Olah et al., Distill "
            "2017): by default the K whose activation correlates most strongly with the "
            "model's score (either sign), or those --channels names. 0: no renderings."
        ),
    )
    channels: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "Channels to render, as LAYER:C (repeatable as a comma-separated list, e.g. "
            "conv4:3,conv4:17); instead of --visualize's choice.",
            metavar="LAYER:C[,LAYER:C]",
        ),
    )
    steps: int = field(
        default=512,
        metadata=option("Optimization steps per rendering (Adam, learning rate 0.05)."),
    )
    seed: int = field(
        default=0,
        metadata=option("Seed of the renderings' random start and transforms (reproducible)."),
    )
    list_layers: bool = field(
        default=False,
        metadata=option(
            "Print --model's layers (module name, type, channels, output size for one image) "
            "and exit; needs no manifest.",
            action="store_true",
        ),
    )

    def __post_init__(self) -> None:
        as_tuple(self, "layers")
        as_tuple(self, "channels")
        super().__post_init__()

    def validated(self) -> FeaturesConfig:
        if len(self.models) != 1:
            raise MemscoreError(
                f"--model: features are one model's; got {len(self.models)} "
                f"({', '.join(self.models)})"
            )
        if self.list_layers:
            return self
        if not self.layers and not self.channels:
            raise MemscoreError(
                "no --layers given: name the layers to analyse (`memscore features --model "
                f"{self.models[0]} --list-layers` lists them)"
            )
        if self.top_k < 1:
            raise MemscoreError("--top-k must be at least 1")
        if self.visualize < 0:
            raise MemscoreError("--visualize must not be negative")
        if self.steps < 1:
            raise MemscoreError("--steps must be at least 1")
        if self.output_format is not None:
            raise MemscoreError(
                "--output-format: a features run writes its activations as Parquet (lists of "
                "floats, which the reductions read); no other format is offered here"
            )
        if self.maps:
            raise MemscoreError(
                "--maps: a features run records channels, not maps; score with "
                "`memscore score ... --maps` for them"
            )
        for spec in self.channels:
            if not re.fullmatch(r".+:\d+", spec):
                raise MemscoreError(f"--channels {spec!r}: give LAYER:CHANNEL, e.g. conv4:17")
        self.score_config().validated()
        return self

    def rendered_channels(self) -> dict[str, list[int]]:
        """--channels as layer -> channel numbers, in the order given."""
        chosen: dict[str, list[int]] = {}
        for spec in self.channels:
            layer, channel = spec.rsplit(":", 1)
            chosen.setdefault(layer, []).append(int(channel))
        return chosen

    def all_layers(self) -> tuple[str, ...]:
        """--layers, then any layer only --channels names."""
        extra = [layer for layer in self.rendered_channels() if layer not in self.layers]
        return (*self.layers, *dict.fromkeys(extra))

    def score_config(self) -> ScoreConfig:
        """The scoring run into ``OUTPUT/activations``: every option ``ScoreConfig`` has."""
        # storage imports fsspec: not at `import memscore`, which a GPU machine without it runs
        from memscore import storage

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScoreConfig)}
        values["output"] = storage.join(self.output, ACTIVATIONS_FOLDER) if self.output else ""
        values["output_format"] = "parquet"
        return ScoreConfig(**values)
