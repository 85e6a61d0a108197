"""``memscore evaluate``: a run's predictions against measured memorability.

Reads the predictions (a ``memscore score`` output folder, or one Parquet/CSV/JSONL file) and
the ground truth (any manifest format memscore reads), joins them one to one on the image path
(or ``--key``; paths that match nothing as written are joined as memscore reads them, each
relative one resolved against its own table's folder, a run's against the manifest folder its
``_memscore.json`` records as ``manifest_base_dir``, with a warning), and writes to
``--report``: ``metrics.json`` (every figure), ``report.md`` (the figures as tables, the images
linked), ``distribution.png`` (density of predictions over density of ground truth) and
``scatter.png`` (truth against prediction, Spearman's rho in the title). The report folder holds
one report: files there named as a report's files (``REPORT_FILES``) are replaced, and those
this report does not write (a traces evaluation's ``layers.png`` under a plain one) removed;
nothing else in the folder is touched.

Trace columns (``--trace-columns``: list columns with one value per layer, as the
``<encoder>-traces`` models write them) get Spearman's rho with its bootstrap interval at every
layer, in ``metrics.json`` under ``traces`` and as tables in ``report.md``, and ``layers.png``:
one panel per feature, one curve per encoder, layers on the x axis as Takmaz et al. (2025) plot
them; a column is read as ``<encoder>_<feature>`` after the run's ``--column-prefix``, which
``_memscore.json`` records (``pred_clip_cls_delta`` is CLIP's ``cls_delta``; see
``_encoder_and_feature`` for a table without one). A column's number of layers is its most
common list length; a row whose list is null (the image was not scored) or of another length is
left out of that column's figures and counted (another length also gives a warning: which layer
is missing cannot be known); a null or NaN value inside a list leaves that row out of that layer
only (each layer has its own ``n``).

Nothing is dropped silently: predictions without ground truth, ground truth without a
prediction, rows excluded for a null prediction (an image that could not be scored) or a null
label, and null keys are all counted. A key that occurs twice on either side is an error
naming it (a join would multiply rows), and so is a join that matches nothing; a join column
one side lacks is an error naming both sides' columns and what to join on instead.

Example (``memscore evaluate scores/ --truth labels.csv --truth-column memorability
--report report/`` from Python)::

    from memscore.evaluation.config import EvaluateConfig
    from memscore.evaluation.job import evaluate

    result = evaluate(EvaluateConfig(predictions="scores/", truth="labels.csv",
                                     truth_column="memorability", report="report/"))
    result["overall"]["spearman"], result["overall"]["spearman_ci95"]  # 0.64, [0.62, 0.66]

    # The traces of a `--model clip-traces` run, and the autoencoder's loss, layer by layer:
    result = evaluate(EvaluateConfig(predictions="scores/", truth="labels.csv",
                                     truth_column="memorability", report="report/",
                                     prediction_column="clip_sae_loss", trace_columns="all"))
    result["traces"]["clip_cls_mean"]["strongest"]  # {"index": 1, "layer": 1, "spearman": 0.36}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memscore import storage
from memscore.errors import MemscoreError, first_line
from memscore.evaluation import metrics
from memscore.evaluation.config import EvaluateConfig

__all__ = ["evaluate", "REPORT_FILES", "MAX_GROUPS", "summary_line"]

# Every file a report can write: also the only names a reused --report folder has removed
# (_remove_stale_report_files), so a new figure's name goes here.
REPORT_FILES = {
    "report": "report.md",
    "metrics": "metrics.json",
    "distribution": "distribution.png",
    "scatter": "scatter.png",
    "layers": "layers.png",
}
# A --group-by column with more values than this is almost surely the wrong column (a path,
# an id); each group costs a bootstrap.
MAX_GROUPS = 1000

_KEY, _PRED, _TRUTH, _HALF_A, _HALF_B = "__key", "__pred", "__truth", "__half_a", "__half_b"
_ROW = "__row"  # each prediction row's position: list columns cannot pass through a join
# Where a feature's list index is not its layer on the x axis: the change from hidden state i to
# i+1 is drawn at layer i + 1 and labelled "i-(i+1)", as the paper's figure draws it.
_LAYER_OFFSET = {"cls_delta": 1}
# Status of a row's list in a trace column.
_LIST_OK, _LIST_NULL, _LIST_OTHER_LENGTH = 0, 1, 2
_PARQUET = (".parquet", ".pq")


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``config.predictions`` against ``config.truth``; write and return the report.

    Returns the contents of ``metrics.json`` (with NaN as None): ``counts``, ``overall`` and
    ``groups`` figures of the scalar prediction column (see ``memscore.evaluation.metrics.summary``; with
    ``split_half`` where ``--split-half-columns`` is given; ``overall`` is None when only trace
    columns are evaluated), ``traces`` (per trace column: counts, and per layer ``index``,
    ``layer``, ``n``, ``spearman``, ``spearman_ci95``), inputs, provenance and warnings.
    Raises ``MemscoreError`` with one line for every problem the user can fix.

    ``config.report`` is left holding this report's files (``files`` in the result) and
    whatever else was there: a file of a ``REPORT_FILES`` name this report does not write is
    removed once the report is written, any other file is left alone, and an evaluation that
    fails before writing leaves the folder as it was.

    Args:
        config: the predictions, the truth and how to join them, the report folder;
            ``memscore evaluate --help`` explains each option.

    Example: ``memscore.evaluate``, which calls this, runs one.
    """
    config = config.validated()
    options = dict(config.storage_options)
    config = _run_score_column(config, options)
    key = config.key or config.path_column
    scalar = config.prediction_column is not None
    _prepare_report(config.report, options)

    truth, truth_columns, truth_base = _read_truth(config, key, options)
    pred_groups = [c for c in config.group_by if c not in truth_columns]
    pred, traces, provenance, warnings, pred_base = _read_predictions(
        config, key, pred_groups, options, truth_columns
    )

    counts = {"predictions_rows": pred.num_rows, "truth_rows": truth.num_rows}
    pred, counts["predictions_null_key"] = _drop_null_keys(pred)
    truth, counts["truth_null_key"] = _drop_null_keys(truth)
    pred, truth = _same_key_type(pred, truth, key)
    _check_unique(pred, f"the predictions {config.predictions}", key)
    _check_unique(truth, f"--truth {config.truth}", key)

    joined = pred.join(truth, keys=_KEY, join_type="inner", use_threads=True)
    if joined.num_rows == 0 and config.key is None:
        resolved = _join_on_resolved_paths(pred, truth, pred_base, truth_base)
        if resolved is not None:
            joined = resolved
            warnings.append(
                f"no {key!r} value matched as written; joined on the image paths "
                f"as memscore resolves them (relative ones against their table's "
                f"folder)"
            )
    if joined.num_rows == 0:
        raise MemscoreError(_no_match_message(pred, truth, key))
    joined = joined.sort_by(_KEY)  # a fixed row order: the bootstrap depends on it
    counts["matched"] = joined.num_rows
    counts["predictions_without_truth"] = pred.num_rows - joined.num_rows
    counts["truth_without_prediction"] = truth.num_rows - joined.num_rows

    label = _floats(joined.column(_TRUTH))
    rows = joined.column(_ROW).to_numpy()
    trace_figures = {}
    for name, (column, model, prefix) in traces.items():
        figures, warning = _trace_figures(name, column, rows, label, config, prefix)
        trace_figures[name] = {**figures, "model": model}
        warnings += [warning] if warning else []

    overall, groups, prediction = None, {}, np.empty(0)
    if scalar:
        prediction = _floats(joined.column(_PRED))
        has_prediction = np.isfinite(prediction)
        valid = has_prediction & np.isfinite(label)
        counts["excluded_null_prediction"] = int((~has_prediction).sum())
        counts["excluded_null_truth"] = int((has_prediction & ~np.isfinite(label)).sum())
        counts["evaluated"] = int(valid.sum())

        halves = None
        if config.split_half_columns:
            halves = (
                _floats(joined.column(_HALF_A))[valid],
                _floats(joined.column(_HALF_B))[valid],
            )
        prediction, label = prediction[valid], label[valid]
        # One decision for all groups: a loss is on another scale than memorability.
        same_scale = metrics.on_one_scale(prediction, label)
        overall = _figures(prediction, label, halves, config, same_scale)
        overall["on_truth_scale"] = same_scale
        for column in config.group_by:
            groups[column] = {
                name: _figures(
                    prediction[mask],
                    label[mask],
                    None if halves is None else (halves[0][mask], halves[1][mask]),
                    config,
                    same_scale,
                )
                for name, mask in _group_masks(
                    joined.column(column).filter(pa.array(valid)), column
                )
            }

    result = {
        "predictions": config.predictions,
        "prediction_column": config.prediction_column,
        "trace_columns": list(traces),
        "truth": config.truth,
        "truth_column": config.truth_column,
        "key": key,
        "model": provenance,
        "counts": counts,
        "overall": overall,
        "groups": groups,
        "group_by": list(config.group_by),
        "split_half_columns": list(config.split_half_columns or []) or None,
        "traces": trace_figures,
        "bootstrap": {
            "resamples": config.bootstrap,
            "seed": config.seed,
            "interval": "95% percentile bootstrap over images",
        },
        "warnings": warnings,
        "report": config.report,
        "files": _report_files(scalar, bool(traces)),
        "versions": _versions(),
    }
    result = _jsonable(result)
    _write_report(config, result, prediction, label, options)
    return result


def summary_line(result: Mapping[str, Any]) -> str:
    """One line for the terminal: rows evaluated, rho with its interval, r, MSE, the strongest
    layer of the trace columns, the report."""
    overall, counts = result["overall"], result["counts"]
    parts = []
    if overall is not None:
        lo, hi = overall["spearman_ci95"]
        text = (
            f"evaluated {counts['evaluated']} of {counts['matched']} matched rows: "
            f"Spearman rho {_fmt(overall['spearman'])}"
        )
        if lo is not None:
            text += f" [{_fmt(lo)}, {_fmt(hi)}]"
        text += f", Pearson r {_fmt(overall['pearson'])}"
        if overall["mse"] is not None:  # none for a column on another scale (a loss)
            text += f", MSE {_fmt(overall['mse'], 4, 'g')}"
        if "split_half" in overall:
            text += f", split-half ceiling {_fmt(overall['split_half']['spearman'])}"
        parts.append(text)
    traces = result.get("traces") or {}
    if traces:
        text = f"{len(traces)} trace column(s) of {counts['matched']} matched rows"
        strongest = [
            (abs(t["strongest"]["spearman"]), name, t["strongest"])
            for name, t in traces.items()
            if t["strongest"] is not None
        ]
        if strongest:
            _, name, best = max(strongest, key=lambda item: item[0])
            text += (
                f", strongest {name} at layer {_layer_text(name, traces[name], best)}: "
                f"rho {_fmt(best['spearman'])}"
            )
        parts.append(text)
    return f"memscore: {'; '.join(parts)} -> {result['report']}"


# --- reading ----------------------------------------------------------------------------------


def _prepare_report(report: str, options: Mapping[str, Any]) -> None:
    """Fail before any work where the report folder cannot be written."""
    try:
        fs, path = storage.url_to_fs(report, options)
        if fs.exists(path) and not fs.isdir(path):
            raise MemscoreError(f"--report {report} is a file, not a folder")
        if not storage.is_url(report):  # on S3, makedirs would create a missing *bucket*
            fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.memscore-write-probe"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except MemscoreError:
        raise
    except Exception as exc:
        raise MemscoreError(f"--report {report} is not writable: {first_line(exc)}") from None


def _read_truth(
    config: EvaluateConfig, key: str, options: Mapping[str, Any]
) -> tuple[pa.Table, tuple[str, ...], str]:
    """(key, truth, split halves, the groups --truth has) renamed, all --truth columns, and
    the folder its relative paths resolve against."""
    from memscore.sources.manifest import open_manifest

    try:
        manifest = open_manifest(config.truth, path_column=key, storage_options=options)
    except MemscoreError as exc:
        if f"no column {key!r}" in str(exc):  # open_manifest's hint names score's option
            raise MemscoreError(
                _no_key_message(
                    config,
                    key,
                    "truth",
                    _prediction_columns(config, options),
                    _truth_columns(config, options),
                )
            ) from None
        raise MemscoreError(f"--truth {exc}") from None
    if not manifest.is_table:
        raise MemscoreError(
            f"--truth {config.truth}: {manifest.what}, not a table of labels "
            f"(CSV, Parquet, JSONL or Arrow)"
        )
    columns = manifest.columns
    if key not in columns:  # a table whose images are inside it, opened without the key
        raise MemscoreError(
            _no_key_message(
                config,
                key,
                "truth",
                _prediction_columns(config, options),
                _truth_columns(config, options),
            )
        )
    wanted = {_KEY: key, _TRUTH: config.truth_column}
    if config.split_half_columns:
        wanted[_HALF_A], wanted[_HALF_B] = config.split_half_columns
    for name in wanted.values():
        if name not in columns:
            flag = "--truth-column" if name == config.truth_column else "--split-half-columns"
            raise MemscoreError(
                f"--truth {config.truth}: no column {name!r} (columns: "
                f"{_names(columns)}); name it with {flag}"
            )
    wanted.update({c: c for c in config.group_by if c in columns})
    # only the columns used are read: a table with its images inside is read without them
    read = tuple(dict.fromkeys(wanted.values()))
    tables = [
        pa.table({new: t.column(old) for new, old in wanted.items()})
        for t in manifest.read_all(columns=read)
    ]
    table = pa.concat_tables(tables)
    for new in (_TRUTH, _HALF_A, _HALF_B):
        if new in table.column_names:
            _floats(table.column(new), name=wanted[new], source=f"--truth {config.truth}")
    return table, columns, manifest.base_dir


def _read_predictions(
    config: EvaluateConfig, key: str, groups: list[str], options: Mapping[str, Any], truth_columns
):
    """The predictions and what made them (``truth_columns`` for the message where they lack
    the join's column).

    Returns (a table of the key, the scalar prediction and the groups --truth lacks, renamed,
    and each row's position as ``_ROW``; {trace column: (its list column in row position order,
    the model that wrote it, the run's --column-prefix before its name or None)}; the scalar
    column's model; warnings; the folder its relative paths resolve against: a run's
    manifest's, else the predictions file's own).
    """
    source = config.predictions
    try:
        fs, path = storage.url_to_fs(source, options)
        exists, is_dir = fs.exists(path), fs.isdir(path)
    except Exception as exc:
        raise MemscoreError(f"cannot open {source}: {first_line(exc)}") from None
    if not exists:
        raise MemscoreError(f"{source}: no such file or folder")
    wanted = {_KEY: key, **{c: c for c in groups}}
    if config.prediction_column is not None:
        wanted[_PRED] = config.prediction_column
    warnings: list[str] = []
    summary = manifest = None
    if is_dir or path.lower().endswith(_PARQUET):
        try:
            if is_dir:  # a `memscore score` output folder, in whichever format it was written
                from memscore.sinks import open_sink

                sink = open_sink(source, options)
                files = sink.files()
                if not files:
                    raise MemscoreError(
                        f"{source}: no {sink.name} files (expected a `memscore score` output "
                        f"folder)"
                    )
                summary, warning = _read_run_summary(source, options)
                warnings += [warning] if warning else []
                schema = sink.schema_of(files[0])
                read_columns = lambda columns: sink.read(columns, files)  # noqa: E731
            else:  # one Parquet file of predictions
                import pyarrow.dataset as pads

                data = pads.dataset(
                    [path], filesystem=storage.pyarrow_filesystem_of(fs), format="parquet"
                )
                schema = data.schema
                read_columns = lambda columns: data.to_table(columns=columns)  # noqa: E731
            _check_prediction_columns(config, key, groups, schema.names, truth_columns, summary)
            trace_names = _trace_names(config, schema)
            read = read_columns(list(dict.fromkeys([*wanted.values(), *trace_names])))
        except MemscoreError:
            raise
        except Exception as exc:
            raise MemscoreError(
                f"{source}: cannot read the predictions: {first_line(exc)[:300]}"
            ) from None
    else:
        from memscore.sources.manifest import open_manifest

        try:
            manifest = open_manifest(source, path_column=key, storage_options=options)
        except MemscoreError as exc:
            if f"no column {key!r}" in str(exc):
                raise MemscoreError(
                    _no_key_message(
                        config,
                        key,
                        "predictions",
                        _prediction_columns(config, options),
                        truth_columns,
                    )
                ) from None
            raise
        if not manifest.is_table:
            raise MemscoreError(f"{source}: {manifest.what}, not predictions")
        _check_prediction_columns(config, key, groups, manifest.columns, truth_columns)
        read = pa.concat_tables(manifest.read_all(), promote_options="permissive")
        trace_names = _trace_names(config, read.schema)
    table = pa.table(
        {
            **{new: read.column(old) for new, old in wanted.items()},
            _ROW: pa.array(np.arange(read.num_rows, dtype=np.int64)),
        }
    )
    if _PRED in table.column_names:
        if _is_list(table.schema.field(_PRED).type):
            raise MemscoreError(
                f"{source}: column {config.prediction_column!r} is a list "
                f"column (one value per layer): name it in --trace-columns"
            )
        _floats(table.column(_PRED), name=config.prediction_column, source=source)
    traces = {
        name: (read.column(name), _model_of(summary, name), _column_prefix(summary, name))
        for name in trace_names
    }
    provenance = (
        _model_of(summary, config.prediction_column)
        if config.prediction_column is not None
        else None
    )
    base = (summary or {}).get("manifest_base_dir") or (
        manifest.base_dir
        if manifest is not None
        else source
        if is_dir
        else source.rstrip("/").rsplit("/", 1)[0]
    )
    return table, traces, provenance, warnings, base


def _is_list(kind: pa.DataType) -> bool:
    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def _is_number_list(kind: pa.DataType) -> bool:
    if not _is_list(kind):
        return False
    value = kind.value_type
    return pa.types.is_floating(value) or pa.types.is_integer(value)


def _trace_names(config: EvaluateConfig, schema: pa.Schema) -> list[str]:
    """--trace-columns, with ``all`` resolved, each checked to be a list of numbers."""
    source = config.predictions
    if tuple(config.trace_columns) == ("all",):
        names = [f.name for f in schema if _is_number_list(f.type)]
        if not names:
            raise MemscoreError(
                f"{source}: --trace-columns all: no list column of numbers "
                f"(columns: {_names(schema.names)})"
            )
        return names
    for name in config.trace_columns:
        if name not in schema.names:
            raise MemscoreError(
                f"{source}: no column {name!r} (columns: "
                f"{_names(schema.names)}); name it with --trace-columns"
            )
        kind = schema.field(name).type
        if not _is_number_list(kind):
            raise MemscoreError(
                f"{source}: column {name!r} is {kind}, not a list of numbers; "
                f"--trace-columns takes list columns (a scalar column goes to "
                f"--prediction-column)"
            )
    return list(config.trace_columns)


def _check_prediction_columns(
    config: EvaluateConfig,
    key: str,
    groups: list[str],
    columns,
    truth_columns,
    summary: Mapping | None = None,
) -> None:
    source = config.predictions
    if key not in columns:
        raise MemscoreError(
            _no_key_message(config, key, "predictions", list(columns), truth_columns, summary)
        )
    if config.prediction_column is not None and config.prediction_column not in columns:
        raise MemscoreError(
            f"{source}: no column {config.prediction_column!r} (columns: "
            f"{_names(columns)}); name it with --prediction-column"
        )
    for column in groups:
        if column not in columns:
            raise MemscoreError(
                f"--group-by {column}: neither --truth nor the predictions have this column"
            )


def _run_score_column(config: EvaluateConfig, options: Mapping[str, Any]) -> EvaluateConfig:
    """``config`` with the one score column of a `memscore score` output when
    ``--prediction-column`` was left at its default and the run wrote no ``memorability``
    (``--model memnet`` writes ``memorability_memnet``): what the user means is not in doubt.
    Several score columns, or a column the user named, stay as they are (a missing one is then
    the one-line error listing the columns)."""
    if not getattr(config, "_prediction_column_defaulted", False):
        return config
    from memscore.sinks.folder import read_summary

    try:
        summary = read_summary(config.predictions, options)
    except Exception:
        return config  # not a finished memscore output: the default as documented
    scores = [
        record["output_column"]
        for record in summary.get("models") or []
        if isinstance(record, Mapping) and record.get("output_column")
    ]
    if len(scores) != 1 or scores[0] == config.prediction_column:
        return config
    return dataclasses.replace(config, prediction_column=scores[0])


def _read_run_summary(source: str, options: Mapping[str, Any]) -> tuple[Mapping | None, str | None]:
    """The run's ``_memscore.json``, or a warning saying why there is none."""
    from memscore.sinks.folder import SUMMARY_FILE, read_summary

    try:
        summary = read_summary(source, options)
    except FileNotFoundError:
        return None, (
            f"{source} has no {SUMMARY_FILE}: the run did not finish (or is not a "
            f"memscore output); rows it did not score are missing"
        )
    except Exception as exc:
        return None, f"{source}/{SUMMARY_FILE} could not be read: {first_line(exc)}"
    warning = None
    if summary.get("status") not in (None, "complete"):
        warning = f"{source}: the run's status is {summary.get('status')!r}"
    return summary, warning


def _model_of(summary: Mapping | None, column: str) -> dict | None:
    """The record of the model that wrote ``column`` in the run summary, or None. A model
    that writes several columns lists them as ``output_columns``."""
    for record in (summary or {}).get("models") or []:
        if not isinstance(record, Mapping):
            continue
        written = record.get("output_columns") or [record.get("output_column")]
        if column in written:
            return {
                k: record.get(k) for k in ("model", "weights", "weights_file", "weights_sha256")
            }
    return None


def _column_prefix(summary: Mapping | None, column: str) -> str | None:
    """The run's ``--column-prefix`` (``pred_``) before ``column``, where the run summary says
    one of its models wrote the column; None where that is not known (no summary, or a column
    the manifest brought)."""
    if _model_of(summary, column) is None:
        return None
    prefix = ((summary or {}).get("config") or {}).get("column_prefix")
    return prefix if isinstance(prefix, str) and column.startswith(prefix) else None


def _no_key_message(
    config: EvaluateConfig,
    key: str,
    lacking: str,
    pred_columns,
    truth_columns,
    summary: Mapping | None = None,
) -> str:
    """One line for a join column one side lacks (``lacking``: "predictions" or "truth"):
    the columns each side has, where they can be read, and what to give instead.

    The usual case: ``--key image`` with the predictions of a folder scan, which name their
    images in ``path`` and have no other column of the images; a truth table keyed by
    ``image`` then joins on a ``path`` column of the same files, or its own table is scored
    so that its columns pass through to the output.
    """
    option = f"--key {key}" if config.key else f"--path-column {key}"
    side = (
        f"the predictions {config.predictions} have"
        if lacking == "predictions"
        else f"--truth {config.truth} has"
    )
    shown = []
    if pred_columns is not None:
        shown.append(f"predictions: {_names(list(pred_columns))}")
    if truth_columns is not None:
        shown.append(f"--truth: {_names(list(truth_columns))}")
    text = f"{option}: {side} no column {key!r}"
    if shown:
        text += f" ({'; '.join(shown)})"
    text += "; the join needs a column both tables have"
    if pred_columns is None or truth_columns is None:
        return f"{text}: {_key_hint(config)}"
    # A score or label of the same name (a folder scan's memorability, the truth's) names no
    # image: never offered as a key.
    values = {config.truth_column, config.prediction_column, *config.trace_columns}
    shared = [
        c
        for c in pred_columns
        if c in truth_columns and c not in values and not c.startswith("memscore_")
    ]
    recorded = ((summary or {}).get("config") or {}).get("path_column")
    path = next((c for c in (recorded, config.path_column, "path") if c in pred_columns), None)
    how = []  # what joins on the predictions' image paths
    if config.key:
        how.append("leave out --key")
    if path != config.path_column:
        how.append(f"give --path-column {path}")
    if path in shared:
        return f"{text}: both have {path!r}; {' and '.join(how)} to join on it"
    if shared:
        return f"{text}: both have {_names(shared)}; give --key with one of them"
    if path is not None:
        return (
            f"{text}, and these share none. The predictions name their images in "
            f"{path!r}, as a folder scan's output does: give --truth a {path!r} column "
            f"naming the same image files (relative paths resolve against its folder) and "
            f"{' and '.join(how) or 'join on it'}, or score --truth's table itself (its "
            f"columns pass through to the output) and join on one of them with --key"
        )
    return f"{text}, and these share none: {_key_hint(config)}"


def _key_hint(config: EvaluateConfig) -> str:
    if config.key:
        return "name a column both sides have with --key"
    return "name the path column with --path-column, or join on another column with --key"


def _prediction_columns(config: EvaluateConfig, options: Mapping[str, Any]) -> list | None:
    """The predictions' column names for an error message, or None where they cannot be read
    (a CSV or JSONL file without any column memscore knows to open it by)."""
    try:
        fs, path = storage.url_to_fs(config.predictions, options)
        if fs.isdir(path):
            from memscore.sinks import open_sink

            sink = open_sink(config.predictions, options)
            return sink.schema_of(sink.files()[0]).names
        if path.lower().endswith(_PARQUET):
            import pyarrow.dataset as pads

            return pads.dataset(
                [path], filesystem=storage.pyarrow_filesystem_of(fs), format="parquet"
            ).schema.names
    except Exception:
        return None
    return _table_columns(
        config.predictions,
        options,
        [config.prediction_column, *config.trace_columns, config.path_column],
    )


def _truth_columns(config: EvaluateConfig, options: Mapping[str, Any]) -> list | None:
    """--truth's column names for an error message, or None where they cannot be read."""
    return _table_columns(
        config.truth, options, [config.truth_column, config.path_column, config.key]
    )


def _table_columns(source: str, options: Mapping[str, Any], names) -> list | None:
    """The columns of a table manifest, opened by the first of ``names`` it has (opening one
    needs a column of it), or None."""
    from memscore.sources.manifest import open_manifest

    for name in dict.fromkeys(n for n in names if n and n != "all"):
        try:
            manifest = open_manifest(source, path_column=name, storage_options=options)
        except Exception:
            continue
        return list(manifest.columns) if manifest.is_table else None
    return None


def _names(columns) -> str:
    shown = ", ".join(columns[:20])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")


# --- the join ---------------------------------------------------------------------------------


def _drop_null_keys(table: pa.Table) -> tuple[pa.Table, int]:
    nulls = table.column(_KEY).null_count
    return (table.filter(pc.is_valid(table.column(_KEY))) if nulls else table), nulls


def _same_key_type(pred: pa.Table, truth: pa.Table, key: str) -> tuple[pa.Table, pa.Table]:
    """Keys of different types (an integer id in a CSV, text in Parquet) compared as text."""
    a, b = pred.schema.field(_KEY).type, truth.schema.field(_KEY).type
    if a == b and not pa.types.is_dictionary(a):
        return pred, truth

    def as_text(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index(_KEY)
        return table.set_column(index, _KEY, table.column(_KEY).cast(pa.large_string()))

    try:
        return as_text(pred), as_text(truth)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise MemscoreError(
            f"column {key!r} is {a} in the predictions and {b} in --truth; they cannot be compared"
        ) from None


def _join_on_resolved_paths(
    pred: pa.Table, truth: pa.Table, pred_base: str | None, truth_base: str | None
) -> pa.Table | None:
    """The join on image paths as memscore reads them, for when the two sides name the same
    images differently: a relative path resolves against its own table's folder (the run's
    manifest's for a `memscore score` output), as scoring resolves it. None when that matches
    nothing either, or makes a path repeat on a side (the join would be ambiguous). Only
    tried when the paths as written match nothing, so a truth table whose relative names equal
    the predictions' keeps joining as written."""
    from memscore.row_errors import ImageDecodeError
    from memscore.sources.manifest import repeated_values
    from memscore.stages.fetch import resolve_path

    def resolved(table: pa.Table, base: str | None) -> pa.Table:
        kind = table.schema.field(_KEY).type
        if not base or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return table
        values = []
        for value in table.column(_KEY).to_pylist():
            try:
                values.append(_normalised(resolve_path(value, base)))
            except ImageDecodeError:
                values.append(value)
        return table.set_column(table.schema.get_field_index(_KEY), _KEY, pa.array(values, kind))

    pred, truth = resolved(pred, pred_base), resolved(truth, truth_base)
    if repeated_values(pred.column(_KEY)) or repeated_values(truth.column(_KEY)):
        return None
    joined = pred.join(truth, keys=_KEY, join_type="inner", use_threads=True)
    return joined if joined.num_rows else None


def _normalised(path: str) -> str:
    """``a/./b/../c`` -> ``a/c`` for local paths; URLs as they are."""
    import os

    return path if "://" in path else os.path.normpath(path)


def _check_unique(table: pa.Table, side: str, key: str) -> None:
    from memscore.sources.manifest import repeated_values

    repeated = repeated_values(table.column(_KEY))
    if repeated:
        kinds, value, times = repeated
        raise MemscoreError(
            f"{side}: {kinds} {key!r} value(s) occur more than once, e.g. {value!r} ({times} "
            f"times); each image must be on each side once (join on a unique column with --key)"
        )


def _no_match_message(pred: pa.Table, truth: pa.Table, key: str) -> str:
    a = pred.column(_KEY)[0].as_py() if pred.num_rows else None
    b = truth.column(_KEY)[0].as_py() if truth.num_rows else None
    hint = ""
    if isinstance(a, str) and isinstance(b, str):
        if a.startswith(("/", "s3://")) != b.startswith(("/", "s3://")):
            hint = "; one side has absolute paths, the other relative ones"
        elif a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1] or a.endswith(b) or b.endswith(a):
            hint = "; the same file named by different paths?"
    return (
        f"no {key!r} value of the predictions is in --truth (e.g. predictions {a!r}, "
        f"truth {b!r}){hint}; join on a column both share with --key"
    )


def _floats(column, *, name: str = "", source: str = "") -> np.ndarray:
    """A numeric column as float64 with NaN for nulls; text that is not a number is an error."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    try:
        if not (
            pa.types.is_floating(kind)
            or pa.types.is_integer(kind)
            or pa.types.is_decimal(kind)
            or pa.types.is_null(kind)
        ):
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise pa.ArrowInvalid(str(kind))
            text = pc.utf8_trim_whitespace(column)  # numbers as text (JSON "0.5", " 0.7")
            column = pc.if_else(pc.equal(text, ""), None, text)
        column = column.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        example = next((v for v in column.to_pylist() if v is not None), None)
        raise MemscoreError(
            f"{source}: column {name!r} is {kind}, not numbers (e.g. {example!r})"
        ) from None
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _group_masks(column: pa.ChunkedArray, name: str):
    """(group name, row mask) per distinct value, in sorted order; then nulls as "(null)"."""
    values = column.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    distinct = pc.unique(values).drop_null()
    if len(distinct) > MAX_GROUPS:
        raise MemscoreError(
            f"--group-by {name}: {len(distinct)} distinct values (at most "
            f"{MAX_GROUPS}); is it the right column?"
        )
    distinct = distinct.take(pc.sort_indices(distinct))
    codes = pc.fill_null(pc.index_in(values, value_set=distinct), -1).to_numpy()
    for index, value in enumerate(distinct.to_pylist()):
        yield str(value), codes == index
    if values.null_count:
        yield "(null)", codes == -1


# --- figures and files ------------------------------------------------------------------------


def _figures(
    prediction: np.ndarray,
    label: np.ndarray,
    halves,
    config: EvaluateConfig,
    same_scale: bool = True,
) -> dict:
    figures = metrics.summary(
        prediction, label, bootstrap=config.bootstrap, seed=config.seed, same_scale=same_scale
    )
    if halves is not None:
        a, b = halves
        both = np.isfinite(a) & np.isfinite(b)
        a, b = a[both], b[both]
        rho = metrics.spearman(a, b)
        interval = (
            [math.nan, math.nan]
            if config.bootstrap < 1 or not math.isfinite(rho)
            else metrics.percentile_interval(
                metrics.bootstrap_spearman(a, b, resamples=config.bootstrap, seed=config.seed)
            )
        )
        figures["split_half"] = {
            "n": int(both.sum()),
            "spearman": rho,
            "spearman_ci95": interval,
            "spearman_brown": metrics.spearman_brown(rho),
        }
    return figures


def _layer_values(column) -> tuple[np.ndarray, np.ndarray, int, dict[int, int]]:
    """A list column as (values[row, layer] float64 with NaN for a null or missing value,
    status[row], the column's number of layers, {list length: rows}).

    The number of layers is the most common length of the non-null lists (the longest of equally
    common ones). A null list has status ``_LIST_NULL``; a list of another length
    ``_LIST_OTHER_LENGTH`` and NaN values: which of its layers is missing cannot be known.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    seen, counts = np.unique(lengths[lengths >= 0], return_counts=True)
    length = int(seen[counts == counts.max()].max()) if seen.size else 0
    status = np.full(len(column), _LIST_OTHER_LENGTH, dtype=np.int8)
    status[lengths < 0] = _LIST_NULL
    same = lengths == length
    status[same] = _LIST_OK
    values = np.full((len(column), length), np.nan)
    if length and same.any():
        kept = column.filter(pa.array(same))
        values[same] = _floats(pc.list_flatten(kept)).reshape(-1, length)
    return values, status, length, {int(k): int(v) for k, v in zip(seen, counts)}


def _encoder_and_feature(column: str, prefix: str | None = None) -> tuple[str, str]:
    """``clip_attention_entropy`` -> ("clip", "attention_entropy"): the traces models name
    their columns ``<prefix><encoder>_<feature>``, ``prefix`` being the run's --column-prefix.

    Where the prefix is not known (None: a table without a run summary), a name that ends in
    one of memscore's trace features (``cls_delta``, ...) is that feature, of the known encoder
    (``clip``, ``dinov2``, ``siglip2``) its rest ends in, else of that rest: so
    ``pred_clip_cls_delta`` is CLIP's ``cls_delta``, whatever prefix came before. Any other
    name is split at its first ``_``; a name without one is a feature of no encoder.

    Example:
        >>> _encoder_and_feature("pred_clip_cls_delta", "pred_")
        ('clip', 'cls_delta')
        >>> _encoder_and_feature("pred_dinov2_attention_entropy")
        ('dinov2', 'attention_entropy')
        >>> _encoder_and_feature("x_depth")
        ('x', 'depth')
    """
    if prefix is None:
        from memscore.models.encoders import ENCODERS
        from memscore.models.weights import TRACE_FEATURES

        for feature in sorted(TRACE_FEATURES, key=len, reverse=True):
            rest = column[: -len(feature) - 1]
            if rest and column.endswith(f"_{feature}"):
                encoder = next(
                    (e for e in sorted(ENCODERS, key=len, reverse=True) if rest.endswith(e)), rest
                )
                return encoder, feature
    encoder, _, feature = column[len(prefix or "") :].partition("_")
    return (encoder, feature) if encoder and feature else ("", column)


def _trace_figures(
    name: str,
    column,
    rows: np.ndarray,
    label: np.ndarray,
    config: EvaluateConfig,
    prefix: str | None,
) -> tuple[dict, str | None]:
    """Spearman's rho of each layer of one trace column with the ground truth.

    ``rows`` are the matched rows' positions in ``column``, ``label`` their ground truth,
    ``prefix`` the run's --column-prefix before ``name`` (``_encoder_and_feature``).
    Returns the figures and a warning where lists of another length were left out.
    """
    values, status, length, lengths = _layer_values(column)
    values, status = values[rows], status[rows]
    has_truth = np.isfinite(label)
    listed = status == _LIST_OK
    valid = listed & has_truth
    counts = {
        "matched": int(rows.size),
        "excluded_null_list": int((status == _LIST_NULL).sum()),
        "excluded_other_length": int((status == _LIST_OTHER_LENGTH).sum()),
        "excluded_null_truth": int((listed & ~has_truth).sum()),
        "evaluated": int(valid.sum()),
    }
    encoder, feature = _encoder_and_feature(name, prefix)
    offset = _LAYER_OFFSET.get(feature, 0)
    values, truth = values[valid], label[valid]
    layers = []
    for index in range(length):
        present = np.isfinite(values[:, index])
        x, y = values[present, index], truth[present]
        rho = metrics.spearman(x, y)
        interval = (
            [math.nan, math.nan]
            if config.bootstrap < 1 or not math.isfinite(rho)
            else metrics.percentile_interval(
                metrics.bootstrap_spearman(x, y, resamples=config.bootstrap, seed=config.seed)
            )
        )
        layers.append(
            {
                "index": index,
                "layer": index + offset,
                "n": int(present.sum()),
                "excluded_missing_value": int((~present).sum()),
                "spearman": rho,
                "spearman_ci95": interval,
            }
        )
    finite = [layer for layer in layers if math.isfinite(layer["spearman"])]
    strongest = max(finite, key=lambda layer: abs(layer["spearman"]), default=None)
    figures = {
        "encoder": encoder,
        "feature": feature,
        "layers_in_column": length,
        "list_lengths": {str(k): v for k, v in lengths.items()},
        "counts": counts,
        "layers": layers,
        "strongest": None
        if strongest is None
        else {k: strongest[k] for k in ("index", "layer", "spearman", "spearman_ci95")},
    }
    warning = None
    if counts["excluded_other_length"]:
        others = ", ".join(f"{k} ({v:,})" for k, v in lengths.items() if k != length)
        warning = (
            f"{name}: {counts['excluded_other_length']:,} matched row(s) have lists of "
            f"another length than the column's {length} layers (lengths seen in the "
            f"predictions: {others}); they are left out of its figures"
        )
    return figures, warning


def _jsonable(value):
    """NaN and infinities as None, numpy scalars as Python ones, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in ("memscore", "numpy", "scipy", "pyarrow", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _report_files(scalar: bool, traces: bool) -> dict[str, str]:
    """The files this evaluation writes: the scalar column's figures, the traces' curves."""
    names = (
        ["report", "metrics"]
        + (["distribution", "scatter"] if scalar else [])
        + (["layers"] if traces else [])
    )
    return {name: REPORT_FILES[name] for name in names}


def _curves(traces: Mapping[str, Any]) -> list[dict]:
    """The traces' per-layer figures as ``plots.layers_png`` curves."""
    curves = []

    def floats(values):
        return [math.nan if v is None else v for v in values]

    for name, figures in traces.items():
        layers = figures["layers"]
        curve = {
            "feature": figures["feature"],
            "encoder": figures["encoder"],
            "x": [layer["layer"] for layer in layers],
            "rho": floats(layer["spearman"] for layer in layers),
            "lo": floats(layer["spearman_ci95"][0] for layer in layers),
            "hi": floats(layer["spearman_ci95"][1] for layer in layers),
        }
        if _LAYER_OFFSET.get(figures["feature"]):
            curve["ticks"] = {layer["layer"]: _layer_text(name, figures, layer) for layer in layers}
        curves.append(curve)
    return curves


def _layer_text(name: str, figures: Mapping[str, Any], layer: Mapping[str, Any]) -> str:
    """A layer as the paper labels it: its number, or "i-(i+1)" for a change between two."""
    if _LAYER_OFFSET.get(figures["feature"]):
        return f"{layer['index']}-{layer['index'] + 1}"
    return str(layer["layer"])


def _write_report(
    config: EvaluateConfig,
    result: dict,
    prediction: np.ndarray,
    label: np.ndarray,
    options: Mapping[str, Any],
) -> None:
    from memscore.evaluation.plots import distribution_png, layers_png, scatter_png

    overall = result["overall"]
    files = {}
    if overall is not None:
        files[REPORT_FILES["distribution"]] = distribution_png(
            prediction,
            label,
            prediction_label=f"prediction ({config.prediction_column})",
            truth_label=f"ground truth ({config.truth_column})",
        )
        files[REPORT_FILES["scatter"]] = scatter_png(
            label,
            prediction,
            rho=overall["spearman"],
            interval=overall["spearman_ci95"],
            truth_label=config.truth_column,
            prediction_label=config.prediction_column,
        )
    if result["traces"]:
        files[REPORT_FILES["layers"]] = layers_png(
            _curves(result["traces"]), truth_label=config.truth_column
        )
    files[REPORT_FILES["metrics"]] = (json.dumps(result, indent=2, allow_nan=False) + "\n").encode()
    files[REPORT_FILES["report"]] = _markdown(result).encode()
    try:
        fs, path = storage.url_to_fs(config.report, options)
        for name, data in files.items():  # report.md last: it links the others
            storage.pipe_atomic(fs, f"{path.rstrip('/')}/{name}", data)
    except Exception as exc:
        raise MemscoreError(f"--report {config.report}: cannot write: {first_line(exc)}") from None
    _remove_stale_report_files(fs, path, set(files), config.report)


def _remove_stale_report_files(fs, folder: str, written: set[str], report: str) -> None:
    """Remove the files of ``REPORT_FILES``'s names that this report did not write (a traces
    evaluation's ``layers.png`` under a plain one), so the folder holds one report, not two
    mixed: a reader takes every figure there for this one's. Only those names, and only files:
    anything else in the folder is the user's. Done once the new report is written, so an
    evaluation that fails leaves the previous report's figures beside the report that links
    them."""
    for name in sorted(set(REPORT_FILES.values()) - written):
        target = f"{folder.rstrip('/')}/{name}"
        try:
            if fs.isfile(target):
                fs.rm_file(target)
        except Exception as exc:
            raise MemscoreError(
                f"--report {report}: cannot remove the previous report's {name}: {first_line(exc)}"
            ) from None


def _fmt(value, digits: int = 3, kind: str = "f") -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}{kind}}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(result: dict) -> str:
    counts = result["counts"]
    model = result["model"]
    scalar = result["overall"] is not None
    ceiling = result["split_half_columns"] is not None
    lines = ["# memscore evaluation", ""]
    made_by = ""
    if model:
        made_by = f" (model `{model['model']}`, weights `{model['weights']}`"
        made_by += (
            f", sha256 `{model['weights_sha256'][:12]}`)" if model.get("weights_sha256") else ")"
        )
    lines.append(f"- Predictions: `{_cell(result['predictions'])}`")
    if scalar:
        lines[-1] += f", column `{_cell(result['prediction_column'])}`{made_by}"
    if result["traces"]:
        lines[-1] += "; trace columns " + ", ".join(f"`{_cell(name)}`" for name in result["traces"])
    lines += [
        f"- Ground truth: `{_cell(result['truth'])}`, column `{_cell(result['truth_column'])}`",
        f"- Joined on `{_cell(result['key'])}`; Spearman's rho with a "
        f"{result['bootstrap']['interval']} ({result['bootstrap']['resamples']} resamples, "
        f"seed {result['bootstrap']['seed']})",
    ]
    if ceiling:
        a, b = result["split_half_columns"]
        lines.append(
            f"- Ceiling: Spearman's rho between `{_cell(a)}` and `{_cell(b)}`, the "
            f"scores of two halves of the participants (human consistency), and its "
            f"Spearman-Brown correction (reliability of the full set's scores)"
        )
    lines += [f"- Warning: {_cell(w)}" for w in result["warnings"]]
    lines += ["", "## Rows", "", "| rows | count |", "| --- | ---: |"]
    labels = [
        ("predictions_rows", "predictions"),
        ("truth_rows", "ground truth"),
        ("matched", "matched"),
        ("predictions_without_truth", "predictions without ground truth"),
        ("truth_without_prediction", "ground truth without a prediction"),
        ("excluded_null_prediction", "excluded: no prediction (image not scored)"),
        ("excluded_null_truth", "excluded: no ground truth value"),
        ("predictions_null_key", "predictions with an empty key (not joined)"),
        ("truth_null_key", "ground truth with an empty key (not joined)"),
    ]
    for name, label in labels:
        if name in counts and (counts[name] or not name.endswith("null_key")):
            lines.append(f"| {label} | {counts[name]:,} |")
    if scalar:
        lines.append(f"| **evaluated** | **{counts['evaluated']:,}** |")
        lines += _scalar_markdown(result, ceiling)
    if result["traces"]:
        lines += _traces_markdown(result)
    lines += [f"Every figure is in [{REPORT_FILES['metrics']}]({REPORT_FILES['metrics']}).", ""]
    return "\n".join(lines)


def _rho_text(figures: Mapping[str, Any]) -> str:
    rho = _fmt(figures["spearman"])
    if figures["spearman_ci95"][0] is not None:
        rho += f" [{_fmt(figures['spearman_ci95'][0])}, {_fmt(figures['spearman_ci95'][1])}]"
    return rho


def _scalar_markdown(result: dict, ceiling: bool) -> list[str]:
    header = ["", "n", "Spearman ρ [95% CI]"]
    if ceiling:
        header.append("split-half ρ / Spearman-Brown")
    header += [
        "Pearson r",
        "MSE",
        "MAE",
        "prediction min – max",
        "prediction mean",
        "truth mean",
        "truth below lowest prediction",
    ]

    def row(name: str, f: dict) -> str:
        cells = [_cell(name), _fmt(f["n"]), _rho_text(f)]
        if ceiling:
            half = f["split_half"]
            cells.append(f"{_fmt(half['spearman'])} / {_fmt(half['spearman_brown'])}")
        share = f["truth_share_below_pred_min"]
        cells += [
            _fmt(f["pearson"]),
            _fmt(f["mse"], 4, "g"),
            _fmt(f["mae"], 4, "g"),
            f"{_fmt(f['pred_min'])} – {_fmt(f['pred_max'])}",
            _fmt(f["pred_mean"]),
            _fmt(f["truth_mean"]),
            "–" if share is None else f"{share:.1%}",
        ]
        return "| " + " | ".join(cells) + " |"

    def table(rows) -> list[str]:
        return [
            "| " + " | ".join(header) + " |",
            "| --- | " + " | ".join(["---:"] * (len(header) - 1)) + " |",
            *(row(name, f) for name, f in rows),
        ]

    lines = ["", "## Figures", ""]
    if not result["overall"]["on_truth_scale"]:
        lines += [
            f"`{_cell(result['prediction_column'])}` is on another scale than the ground "
            f"truth (not a memorability score): its rank correlation is the figure; MSE, "
            f"MAE and the truth below its lowest value are not shown.",
            "",
        ]
    lines += table([("all", result["overall"])])
    for column, groups in result["groups"].items():
        lines += ["", f"### By `{_cell(column)}`", ""] + table(groups.items())
    lines += [
        "",
        "## Distributions",
        "",
        f"![Density of predictions over density of ground truth]({REPORT_FILES['distribution']})",
        "",
        f"![Ground truth against prediction]({REPORT_FILES['scatter']})",
        "",
    ]
    return lines


def _traces_markdown(result: dict) -> list[str]:
    """The trace columns: one line each, then per feature a table of layers by encoder."""
    traces = result["traces"]
    lines = [
        "",
        "## Per-layer traces",
        "",
        f"Spearman's rho of each layer's value with `{_cell(result['truth_column'])}`. "
        f"A row whose list is null or of another length than the column's is left out of "
        f"that column; a missing value inside a list leaves the row out of that layer only "
        f"(its n is then shown).",
        "",
        "| column | layers | evaluated | null list | other length | no ground truth | "
        "strongest layer: ρ [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in traces.items():
        c, best = t["counts"], t["strongest"]
        strongest = "–" if best is None else f"{_layer_text(name, t, best)}: {_rho_text(best)}"
        lines.append(
            f"| `{_cell(name)}` | {t['layers_in_column']} | {c['evaluated']:,} | "
            f"{c['excluded_null_list']:,} | {c['excluded_other_length']:,} | "
            f"{c['excluded_null_truth']:,} | {strongest} |"
        )
    features: dict[str, list[str]] = {}
    for name, t in traces.items():
        features.setdefault(t["feature"], []).append(name)
    for feature, names in features.items():
        rows: dict[float, dict[str, str]] = {}
        labels: dict[float, str] = {}
        for name in names:
            t = traces[name]
            for layer in t["layers"]:
                text = _rho_text(layer)
                if layer["n"] != t["counts"]["evaluated"]:
                    text += f" (n {layer['n']:,})"
                rows.setdefault(layer["layer"], {})[name] = text
                labels[layer["layer"]] = _layer_text(name, t, layer)
        heads = [traces[n]["encoder"] or n for n in names]
        lines += [
            "",
            f"### `{_cell(feature)}`",
            "",
            "| layer | " + " | ".join(f"{_cell(h)} ρ [95% CI]" for h in heads) + " |",
            "| ---: | " + " | ".join(["---:"] * len(names)) + " |",
        ]
        for position in sorted(rows):
            cells = [rows[position].get(name, "") for name in names]
            lines.append(f"| {labels[position]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![Spearman's rho per layer, per feature and encoder]({REPORT_FILES['layers']})",
        "",
    ]
    return lines
