"""``memscore evaluate``'s options: ``EvaluateConfig``, validated before anything is read.

Its fields make ``memscore evaluate``'s and ``jobs/evaluate.py``'s options (``memscore.options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memscore.errors import MemscoreError
from memscore.options import as_tuple, fields_as_args, fix_paths, option

__all__ = ["EvaluateConfig"]


@fields_as_args
@dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation of predictions against ground truth. See ``memscore evaluate --help``.

    Example:
        >>> cfg = EvaluateConfig(predictions="scores/", truth="labels.csv",
        ...                      truth_column="memorability", report="report/")
        >>> cfg.prediction_column, cfg.bootstrap
        ('memorability', 1000)
    """

    predictions: str = field(
        metadata=option(
            "The predictions: a `memscore score` output folder (local or s3://), or one Parquet, "
            "CSV or JSONL file.",
            positional=True,
        )
    )
    truth: str = field(
        metadata=option(
            "The ground truth: a CSV, Parquet (file or folder), JSONL or Arrow file, local or s3://.",
            flag="--truth",
            required=True,
        )
    )
    truth_column: str = field(
        metadata=option(
            "Column of --truth holding the measured memorability (e.g. the hit rate).",
            required=True,
        )
    )
    report: str = field(
        metadata=option(
            "Folder (local or s3://) for report.md, metrics.json, distribution.png and scatter.png "
            "(with --trace-columns also layers.png; files of those names there are replaced, "
            "and those of them this report does not write are removed; nothing else there is "
            "touched).",
            flag="--report",
            required=True,
        )
    )
    prediction_column: str | None = field(
        default=None,
        metadata=option(
            "Scalar column of the predictions to evaluate (e.g. false_alarm, memorability_memnet, "
            "clip_sae_loss). Default: memorability, or the one score column of a `memscore score` "
            "output that has no memorability column; none when --trace-columns is given.",
            metavar="COLUMN",
        ),
    )
    trace_columns: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "List columns (one value per layer, as the <encoder>-traces models write) to report "
            "Spearman's rho per layer for, with a layers.png of the curves; comma-separated, or "
            "'all' for every list-of-numbers column of the predictions.",
            metavar="COLUMN[,COLUMN]|all",
        ),
    )
    path_column: str = field(
        default="path",
        metadata=option(
            "Image path column, present in both the predictions and --truth: the join key unless "
            "--key is given."
        ),
    )
    key: str | None = field(
        default=None,
        metadata=option(
            "Join on this column instead of --path-column (it must be in both files and unique in "
            "each).",
            metavar="COLUMN",
        ),
    )
    group_by: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "Also report the figures per value of this column (of --truth, else of the "
            "predictions), e.g. category; several, comma-separated, each grouped on its own.",
            metavar="COLUMN[,COLUMN]",
        ),
    )
    split_half_columns: tuple[str, str] | None = field(
        default=None,
        metadata=option(
            "Two columns of --truth scoring each image from two halves of the participants: their "
            "Spearman rho (human consistency) and its Spearman-Brown correction are reported as "
            "the ceiling beside the model's rho.",
            nargs=2,
            metavar=("A", "B"),
        ),
    )
    bootstrap: int = field(
        default=1000,
        metadata=option(
            "Bootstrap resamples (of images) for the 95%% percentile interval of Spearman's rho; "
            "0 skips the interval.",
            metavar="N",
        ),
    )
    seed: int = field(
        default=0,
        metadata=option(
            "Seed of the bootstrap's numpy random Generator (same seed, same interval)."
        ),
    )
    storage_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable; as for `memscore score`.",
            flag="--storage-option",
            action="append",
            metavar="KEY=VALUE",
        ),
    )

    def __post_init__(self) -> None:
        fix_paths(self, ("predictions", "truth", "report"))
        as_tuple(self, "group_by")
        as_tuple(self, "trace_columns")
        if self.prediction_column is None and not self.trace_columns:
            object.__setattr__(self, "prediction_column", "memorability")
            # not a field: evaluate may take a run's one score column instead (see
            # evaluation._run_score_column); a column the user names is never replaced
            object.__setattr__(self, "_prediction_column_defaulted", True)

    def validated(self) -> EvaluateConfig:
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        for name, flag in (
            ("predictions", "predictions"),
            ("truth", "--truth"),
            ("truth_column", "--truth-column"),
            ("report", "--report"),
            ("path_column", "--path-column"),
        ):
            if not getattr(self, name):
                raise MemscoreError(f"no {flag} given")
        if self.prediction_column is not None and not self.prediction_column:
            raise MemscoreError("--prediction-column is empty")
        if len(set(self.trace_columns)) != len(self.trace_columns):
            raise MemscoreError(
                f"a column is named twice in --trace-columns {','.join(self.trace_columns)}"
            )
        if "all" in self.trace_columns and len(self.trace_columns) > 1:
            raise MemscoreError("--trace-columns all takes no other names")
        if self.prediction_column in self.trace_columns:
            raise MemscoreError(
                f"{self.prediction_column!r} is named both as --prediction-column "
                f"(a scalar column) and in --trace-columns (list columns)"
            )
        if self.prediction_column is None and (self.group_by or self.split_half_columns):
            raise MemscoreError(
                "--group-by and --split-half-columns report the figures of "
                "--prediction-column: name a scalar column there too"
            )
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
