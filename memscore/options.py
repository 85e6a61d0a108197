"""The jobs' options, written once: a config dataclass's fields make its CLI options and docs.

Each job's config (``memscore.scoring.config.ScoreConfig``, ``finetuning.config``,
``train_sae.config``, ``evaluation.config``, ``serve.config``) declares its fields with
``option(help, ...)`` and is decorated with ``fields_as_args``; ``add_arguments`` and
``from_args`` turn those fields into argparse options and back, so the command line, the job
scripts (``jobs/*.py``) and ``help(ScoreConfig)`` share one list of options with one help text
each. The helpers the configs' ``__post_init__`` and ``validated`` share are here too:
``fix_paths`` (local paths made whole, weights names told from checkpoint paths),
``as_tuple``, ``split_model_weights`` and ``check_model_names``.

This module knows no job: it sits below every config, so a config of its own (a new job's)
needs nothing but this module.

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> @fields_as_args
    ... @dataclass(frozen=True)
    ... class Toy:
    ...     '''A toy job.'''
    ...     images: str = field(metadata=option("Images to read.", positional=True))
    ...     batch_size: int = field(default=8, metadata=option("Images per batch."))
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser, Toy)
    >>> from_args(parser.parse_args(["photos/", "--batch-size", "4"]), Toy)
    Toy(images='photos/', batch_size=4)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from memscore.errors import MemscoreError

__all__ = [
    "option",
    "fields_as_args",
    "fields_in_help_order",
    "add_arguments",
    "from_args",
    "option_flag",
    "value_type",
    "default_text",
    "fix_paths",
    "as_tuple",
    "split_model_weights",
    "check_model_names",
]


def option(help: str, *, flag: str | None = None, positional: bool = False, **argparse_kwargs):
    """A config field's ``metadata``: its help text, its flag (default ``--field-name``) or
    ``positional``, and any further ``argparse.add_argument`` keywords (``choices``,
    ``action``, ``metavar`` ...)."""
    return {"help": help, "flag": flag, "positional": positional, "argparse": argparse_kwargs}


def fields_in_help_order(config_cls) -> list[dataclasses.Field]:
    """A config's fields as ``--help`` lists them: its own first, then those it shares with
    another job's config (keyword-only fields of a base class, which ``dataclasses.fields``
    would list first)."""
    fields = dataclasses.fields(config_cls)
    return [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]


def fields_as_args(cls):
    """Give a config class's docstring an ``Args:`` section, a field's help text each, before
    its example: the help is written once, for ``--help`` and for ``help(ScoreConfig)``."""
    import textwrap

    entries = []
    for spec in fields_in_help_order(cls):
        text = spec.metadata.get("help")
        if text:
            entries.append(
                textwrap.fill(
                    f"{spec.name}: {text}",
                    width=92,
                    initial_indent=" " * 8,
                    subsequent_indent=" " * 12,
                )
            )
    args = "    Args:\n" + "\n".join(entries) + "\n\n"
    doc = cls.__doc__ or ""
    at = doc.find("    Example:")
    cls.__doc__ = doc[:at] + args + doc[at:] if at >= 0 else doc.rstrip() + "\n\n" + args
    return cls


def option_flag(f: dataclasses.Field) -> str:
    """The command-line flag of config field ``f``: its own, else ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """Add one argparse option per field of ``config_cls``, with the field's help text."""
    for f in fields_in_help_order(config_cls):
        meta = f.metadata
        kwargs = dict(meta["argparse"])
        default = None if f.default is dataclasses.MISSING else f.default
        if meta["positional"]:
            parser.add_argument(f.name, help=meta["help"], **kwargs)
            continue
        if "action" not in kwargs:
            kwargs["type"] = value_type(f, default)
            kwargs.setdefault("metavar", f.name.upper())
        parser.add_argument(
            option_flag(f), dest=f.name, help=meta["help"] + default_text(default), **kwargs
        )


def value_type(f: dataclasses.Field, default: Any):
    """The argparse ``type`` of field ``f``, read from its annotation (a string: the configs
    use postponed annotations)."""
    text = str(f.type)
    if text.startswith("tuple[str, ...]"):  # comma-separated names (--model a,b)
        return lambda text: tuple(part.strip() for part in text.split(",") if part.strip())
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def default_text(default: Any) -> str:
    """`` (default: ...)`` for a help text; nothing for a default that says nothing."""
    if default is None or default is False or default == () or isinstance(default, Mapping):
        return ""
    if isinstance(default, tuple):
        default = ",".join(default)
    return f" (default: {default})"


def from_args(args: argparse.Namespace, config_cls):
    """Build a ``config_cls`` from parsed arguments (the inverse of ``add_arguments``)."""
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


def fix_paths(
    config,
    paths: tuple[str, ...],
    weights: str | None = None,
    models: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
) -> None:
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
            value = ",".join(
                f"{model}={_fixed_weights_path(path, (model,), names)}"
                for model, path in per_model.items()
            )
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


def as_tuple(config, name: str) -> None:
    """``"a,b"`` (or a list) -> ``("a", "b")`` for a field of names: ``models="resmem"`` is one
    model, not the letters r, e, s ..."""
    value = getattr(config, name)
    if isinstance(value, str):
        value = tuple(part.strip() for part in value.split(",") if part.strip())
    elif value is not None:
        value = tuple(value)
    object.__setattr__(config, name, value)
