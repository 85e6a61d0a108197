"""``memscore verify``: does an output hold every manifest row exactly once?

Rows are matched by ``--id-column`` where the run had one, else by ``memscore_row`` (each row's
position in the manifest). A run made with ``--limit N`` is checked against the first N rows.

WebDataset shards: rows are matched by ``memscore_row`` (``shard << 32 | sample``) against each
shard's sample count, as the run's read tasks recorded it when they read the shard to its end
(the summary's ``shards``, or the work folder of an unfinished run): reading every shard again
here would cost what the run's read cost. The shards the source names now must be the ones the
run read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from memscore import storage
from memscore.errors import MemscoreError
from memscore.manifest import open_manifest, read_restarting
from memscore.output import SUMMARY_FILE, count_output, output_files, read_output_columns
from memscore.resume import ROW_COLUMN, read_state

__all__ = ["VerifyReport", "verify"]

_EXAMPLES = 5


@dataclass
class VerifyReport:
    manifest_rows: int
    output_rows: int
    key: str
    missing: list[Any] = field(default_factory=list)
    duplicated: list[Any] = field(default_factory=list)
    unexpected: list[Any] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    summary_present: bool = False

    @property
    def ok(self) -> bool:
        return not (self.counts["missing"] or self.counts["duplicated"] or self.counts["unexpected"])

    def lines(self) -> list[str]:
        out = [f"manifest rows: {self.manifest_rows}", f"output rows:   {self.output_rows}",
               f"matched by:    {self.key}"]
        for name in ("missing", "duplicated", "unexpected"):
            examples = getattr(self, name)
            shown = f" (e.g. {', '.join(map(repr, examples))})" if examples else ""
            out.append(f"{name + ':':<14} {self.counts[name]}{shown}")
        if not self.summary_present:
            out.append(f"{SUMMARY_FILE} is missing: the run did not finish (finish it with --resume)")
        out.append("OK: every manifest row is in the output exactly once" if self.ok
                   else "FAILED: the output does not match the manifest")
        return out


def _run_options(output: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """The finished run's options (from its summary) or the interrupted run's (its state)."""
    import json

    fs, path = storage.url_to_fs(output, storage_options)
    summary = f"{path.rstrip('/')}/{SUMMARY_FILE}"
    if fs.exists(summary):
        return {**json.loads(fs.cat_file(summary))["config"], "finished": True}
    return {**(read_state(output, storage_options) or {}), "finished": False}


def verify(output: str, manifest: str, *, path_column: str | None = None,
           id_column: str | None = None,
           storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Compare ``output`` with ``manifest`` row by row; see the module docstring.

    Args:
        output: a ``memscore score`` output folder, finished or not (local or s3://).
        manifest: the manifest the run scored, as given to ``memscore score``.
        path_column: the manifest's path column (default: the run's, else ``path``).
        id_column: match rows by this column (default: the run's ``--id-column``, else each
            row's position, ``memscore_row``).
        storage_options: fsspec options (e.g. S3 endpoint and credentials).

    Returns:
        A ``VerifyReport``: the counts and first examples of missing, duplicated and
        unexpected rows; ``ok`` when every manifest row is in the output exactly once.

    Example:
        >>> import memscore
        >>> from memscore.verify import verify
        >>> _ = memscore.score(memscore.ScoreConfig("examples/images", output="scores/"))
        >>> report = verify("scores/", "examples/images")
        >>> report.ok, report.manifest_rows, report.output_rows, report.key
        (True, 5, 5, 'memscore_row')
    """
    options = dict(storage_options or {})
    run = _run_options(output, options)
    path_column = path_column or run.get("path_column") or "path"
    id_column = id_column or run.get("id_column")
    source = open_manifest(manifest, path_column=path_column, storage_options=options,
                           webdataset=True)
    if source.kind == "webdataset":
        return _verify_shards(output, source, run, options)
    key = id_column or ROW_COLUMN
    limit = run.get("limit")
    files = output_files(output, options)
    if not files:
        raise MemscoreError(f"{output}: no Parquet files")
    if not id_column:  # ids are positions: tallied file by file, in bounded memory
        manifest_rows = read_restarting(lambda: sum(t.num_rows for t in source.iter_tables(limit)))
        tally = count_output(output, options, [], expected_rows=manifest_rows)
        return VerifyReport(
            manifest_rows=manifest_rows, output_rows=tally["rows_out"], key=key,
            missing=tally["missing_examples"], duplicated=tally["duplicated_examples"],
            unexpected=tally["unexpected_examples"],
            counts={"missing": tally["rows_missing"], "duplicated": tally["rows_duplicated"],
                    "unexpected": tally["rows_unexpected"]},
            summary_present=bool(run.get("finished")))
    expected = read_restarting(lambda: pa.chunked_array(
        [t.column(id_column) for t in source.iter_tables(limit)]))
    manifest_rows = len(expected)
    expected = expected.combine_chunks()
    got = read_output_columns(output, files, [key], options).column(key)

    counts = pc.value_counts(got)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    distinct = counts.field("values")
    missing = pc.filter(expected, pc.invert(pc.is_in(expected, value_set=distinct)))
    unexpected = pc.filter(distinct, pc.invert(pc.is_in(distinct, value_set=expected)))
    return VerifyReport(
        manifest_rows=manifest_rows,
        output_rows=len(got),
        key=key,
        missing=missing[:_EXAMPLES].to_pylist(),
        duplicated=repeated.field("values")[:_EXAMPLES].to_pylist(),
        unexpected=unexpected[:_EXAMPLES].to_pylist(),
        counts={"missing": len(missing), "duplicated": len(repeated),
                "unexpected": len(unexpected)},
        summary_present=bool(run.get("finished")),
    )


def _verify_shards(output: str, source, run: Mapping[str, Any],
                   options: Mapping[str, Any]) -> VerifyReport:
    from memscore.output import read_summary
    from memscore.resume import shard_counts_folder
    from memscore.webdataset import read_shard_counts

    shards = list(source.files)
    if run.get("finished"):
        recorded = read_summary(output, options).get("shards")
        if recorded is None:
            raise MemscoreError(f"{output}: the run did not read WebDataset shards")
        urls = [item["url"] for item in recorded]
        if urls != shards:
            raise MemscoreError(
                f"{output}: the run read {len(urls)} shards, {source.source} names "
                f"{len(shards)} (or others); give the shards the run was given")
        counts = [int(item["samples"]) for item in recorded]
    else:
        counts = read_shard_counts(shard_counts_folder(output), shards, options)
        unread = sum(n is None for n in counts)
        if unread:
            raise MemscoreError(
                f"{output}: {unread} of {len(shards)} shards have not been read to their end "
                f"by the run yet, so their samples are not known; finish the run with --resume")
    tally = count_output(output, options, [], expected_rows=counts)
    return VerifyReport(
        manifest_rows=sum(counts), output_rows=tally["rows_out"], key=ROW_COLUMN,
        missing=tally["missing_examples"], duplicated=tally["duplicated_examples"],
        unexpected=tally["unexpected_examples"],
        counts={"missing": tally["rows_missing"], "duplicated": tally["rows_duplicated"],
                "unexpected": tally["rows_unexpected"]},
        summary_present=bool(run.get("finished")))
