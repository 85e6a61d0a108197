"""``memscore verify``: does an output hold every manifest row exactly once?

First, is the manifest the run's? The run recorded its manifest's path and fingerprint
(``manifest.manifest_fingerprint``: a table manifest's content, S3 objects' ETags, shards'
sizes and stamps, a folder's image paths); a manifest given here that differs in either is
refused (``NotTheRunsManifest``, one line): row positions of another manifest would match
by accident. ``ignore_identity`` (``--ignore-identity``) is for a manifest moved or copied
on purpose: rows are then matched by their paths (for shards: by shard file name), not by
position.

Rows are matched by ``--id-column`` where the run had one, else by ``memscore_row`` (each row's
position in the manifest). A run made with ``--limit N`` is checked against the first N rows.

WebDataset shards: rows are matched by ``memscore_row`` (``shard << 32 | sample``) against each
shard's sample count, as the run's read tasks recorded it when they read the shard to its end
(the summary's ``shards``, or the work folder of an unfinished run): reading every shard again
here would cost what the run's read cost. The shards the source names now must be the ones the
run read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from memscore import storage
from memscore.errors import MemscoreError
from memscore.sinks import open_sink
from memscore.sinks.folder import SUMMARY_FILE, SummaryUnreadable, read_summary
from memscore.sinks.resume import ROW_COLUMN, StateUnreadable, read_state, shard_counts_folder
from memscore.sources.manifest import Manifest, manifest_fingerprint, open_manifest, read_restarting

__all__ = ["VerifyReport", "NotTheRunsManifest", "verify"]

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
        return not (
            self.counts["missing"] or self.counts["duplicated"] or self.counts["unexpected"]
        )

    def lines(self) -> list[str]:
        out = [
            f"manifest rows: {self.manifest_rows}",
            f"output rows:   {self.output_rows}",
            f"matched by:    {self.key}",
        ]
        for name in ("missing", "duplicated", "unexpected"):
            examples = getattr(self, name)
            shown = f" (e.g. {', '.join(map(repr, examples))})" if examples else ""
            out.append(f"{name + ':':<14} {self.counts[name]}{shown}")
        if not self.summary_present:
            out.append(
                f"{SUMMARY_FILE} is missing: the run did not finish (finish it with --resume)"
            )
        out.append(
            "OK: every manifest row is in the output exactly once"
            if self.ok
            else "FAILED: the output does not match the manifest"
        )
        return out


class NotTheRunsManifest(MemscoreError):
    """The manifest handed to ``verify`` is not the one the run read (another path, or the
    same path with other contents)."""


def _run_options(output: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """What the run recorded: its options and identity, from its summary (a finished run) or
    its state (an interrupted one; also a run whose summary was cut short)."""
    fs, path = storage.url_to_fs(output, storage_options)
    if fs.exists(f"{path.rstrip('/')}/{SUMMARY_FILE}"):
        try:
            summary = read_summary(output, storage_options)
            return {
                **summary["config"],
                "identity": summary.get("run"),
                "finished": True,
                "summary": summary,
            }
        except SummaryUnreadable:
            pass  # an interrupted run, as far as verify can tell: its state says the rest
    try:
        state = read_state(output, storage_options)
    except StateUnreadable:
        state = None
    if state is None and not open_sink(output, storage_options).files():
        raise MemscoreError(
            f"{output}: not a memscore output (no {SUMMARY_FILE}, no run state, no data files)"
        )
    return {**(state or {}), "identity": state, "finished": False}


def _check_identity(output: str, run: Mapping[str, Any], source: Manifest) -> None:
    """Refuse a manifest that is not the run's. The fingerprint covers the manifest's files
    (their paths and contents), so equal fingerprints are the run's manifest however it is
    named now; otherwise the line says whether the path or the contents differ."""
    identity = run.get("identity")
    if not identity or "manifest_fingerprint" not in identity:
        raise NotTheRunsManifest(
            f"{output}: the run did not record its manifest's identity (its state is lost, or "
            f"an older memscore made it); give --ignore-identity to match rows by path"
        )
    if identity["manifest_fingerprint"] == manifest_fingerprint(source):
        return  # the same files, named another way (shards as a folder, not a brace pattern)
    if identity.get("manifest") != source.source:
        raise NotTheRunsManifest(
            f"{output} was made from {identity.get('manifest')}, not {source.source}; give "
            f"the run's manifest, or --ignore-identity if it moved (rows are then matched by "
            f"path)"
        )
    raise NotTheRunsManifest(
        f"{source.source} has changed since the run read it (its fingerprint differs); "
        f"give --ignore-identity to match rows by path"
    )


def verify(
    output: str,
    manifest: str,
    *,
    path_column: str | None = None,
    id_column: str | None = None,
    ignore_identity: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Compare ``output`` with ``manifest`` row by row; see the module docstring.

    Args:
        output: a ``memscore score`` output folder, finished or not (local or s3://).
        manifest: the manifest the run scored, as given to ``memscore score``.
        path_column: the manifest's path column (default: the run's, else ``path``).
        id_column: match rows by this column (default: the run's ``--id-column``, else each
            row's position, ``memscore_row``).
        ignore_identity: skip the check that ``manifest`` is the run's (path and
            fingerprint) and match rows by their paths instead of their positions.
        storage_options: fsspec options (e.g. S3 endpoint and credentials).

    Returns:
        A ``VerifyReport``: the counts and first examples of missing, duplicated and
        unexpected rows; ``ok`` when every manifest row is in the output exactly once.

    Raises:
        NotTheRunsManifest: ``manifest`` is not the one the run read (one line).

    Example:
        >>> import memscore
        >>> from memscore.scoring.verify import verify
        >>> _ = memscore.score(memscore.ScoreConfig("examples/images", output="scores/"))
        >>> report = verify("scores/", "examples/images")
        >>> report.ok, report.manifest_rows, report.output_rows, report.key
        (True, 5, 5, 'memscore_row')
    """
    options = dict(storage_options or {})
    manifest = storage.absolute(manifest)  # as the run recorded it (ScoreConfig's paths)
    run = _run_options(output, options)
    path_column = path_column or run.get("path_column") or "path"
    id_column = id_column or run.get("id_column")
    source = open_manifest(
        manifest,
        path_column=path_column,
        storage_options=options,
        rows_in_driver=False,
        image_column=run.get("image_column"),  # the run's, where it named one
    )
    if not ignore_identity:
        _check_identity(output, run, source)
    summary = run["summary"] if run.get("finished") else None
    recorded = source.recorded_rows(
        output, summary=summary, counts_folder=shard_counts_folder(output), by_name=ignore_identity
    )
    if recorded is not None:  # the run counted each part's rows as it read them (shards)
        return _verify_recorded(output, recorded, run, options)
    limit = run.get("limit")
    sink = open_sink(output, options)
    files = sink.files()
    if not files:
        raise MemscoreError(f"{output}: no {sink.name} files")
    if ignore_identity and not id_column:
        id_column = path_column  # positions of a manifest not proven the run's mean nothing
    key = id_column or ROW_COLUMN
    if not id_column:  # ids are positions: tallied file by file, in bounded memory
        manifest_rows = read_restarting(lambda: sum(t.num_rows for t in source.iter_tables(limit)))
        tally = sink.count([], expected_rows=manifest_rows)
        return VerifyReport(
            manifest_rows=manifest_rows,
            output_rows=tally["rows_out"],
            key=key,
            missing=tally["missing_examples"],
            duplicated=tally["duplicated_examples"],
            unexpected=tally["unexpected_examples"],
            counts={
                "missing": tally["rows_missing"],
                "duplicated": tally["rows_duplicated"],
                "unexpected": tally["rows_unexpected"],
            },
            summary_present=bool(run.get("finished")),
        )
    expected = read_restarting(
        lambda: pa.chunked_array([t.column(id_column) for t in source.iter_tables(limit)])
    )
    manifest_rows = len(expected)
    got = open_sink(output, options).read([key], files).column(key)
    # As multisets: a key (a path, when matching by path) may repeat in the manifest, and
    # each of its rows must then be in the output once.
    want = _counts(expected.combine_chunks(), "want")
    have = _counts(got.combine_chunks() if isinstance(got, pa.ChunkedArray) else got, "have")
    both = want.join(have, "value", join_type="full outer")
    wanted = pc.fill_null(both.column("want"), 0)
    had = pc.fill_null(both.column("have"), 0)
    values = both.column("value")
    missing = pc.filter(values, pc.less(had, wanted))
    repeated = pc.filter(values, pc.and_(pc.greater(had, wanted), pc.greater(wanted, 0)))
    unexpected = pc.filter(values, pc.equal(wanted, 0))
    return VerifyReport(
        manifest_rows=manifest_rows,
        output_rows=len(got),
        key=key,
        missing=missing[:_EXAMPLES].to_pylist(),
        duplicated=repeated[:_EXAMPLES].to_pylist(),
        unexpected=unexpected[:_EXAMPLES].to_pylist(),
        counts={
            "missing": len(missing),
            "duplicated": len(repeated),
            "unexpected": len(unexpected),
        },
        summary_present=bool(run.get("finished")),
    )


def _counts(values: pa.Array, name: str) -> pa.Table:
    counts = pc.value_counts(values)
    return pa.table({"value": counts.field("values"), name: counts.field("counts")})


def _verify_recorded(
    output: str, counts: list[int], run: Mapping[str, Any], options: Mapping[str, Any]
) -> VerifyReport:
    """Rows matched by ``memscore_row`` against each part's row count as the run recorded it."""
    tally = open_sink(output, options).count([], expected_rows=counts)
    return VerifyReport(
        manifest_rows=sum(counts),
        output_rows=tally["rows_out"],
        key=ROW_COLUMN,
        missing=tally["missing_examples"],
        duplicated=tally["duplicated_examples"],
        unexpected=tally["unexpected_examples"],
        counts={
            "missing": tally["rows_missing"],
            "duplicated": tally["rows_duplicated"],
            "unexpected": tally["rows_unexpected"],
        },
        summary_present=bool(run.get("finished")),
    )
