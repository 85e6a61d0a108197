"""``--max-error-fraction``: stop a run whose rows are mostly errors, early and with one line.

The classic case is a manifest whose relative paths resolve against the wrong folder: every row
becomes ``missing file`` and a run that reports success has scored nothing. Each decode task
reports its block's row count and error kinds (with one example each) to one small Ray actor
(an ``ErrorTally``, started by ``start_counter``), and gets back a message once, over at least
``min_rows`` decoded rows of this run (smaller runs are never stopped), the error fraction
passes the limit; the task then raises ``ErrorFractionExceeded``, which fails the run
(``memscore.scoring.job.score`` reports it as one line).

Cost: one actor call per decode block (``--rows-per-block``, 256 rows by default), a few hundred
bytes each; at 10,000 images/s about 40 calls/s to an actor that only adds numbers, a small
fraction of one core and no extra pass over the output. The counts are of rows decoded by this
run (a resumed run starts again from zero), before the model; rows of a task that Ray runs
twice (a lost node) are counted twice, which a fraction over thousands of rows does not notice.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DEFAULT_MAX_ERROR_FRACTION",
    "MIN_ROWS",
    "ErrorFractionExceeded",
    "ErrorTally",
    "start_counter",
    "report",
]

#: More errors than scores: a misconfigured run (wrong base folder or path column, a bucket
#: without access, a mount that is not there) has (nearly) every row an error, while real
#: collections have a few percent of bad files, and even a scraped one whose manifest lists
#: failed downloads (img2dataset keeps them as rows: 10-30% in LAION-style downloads) stays
#: well below one half. 1 turns the check off.
DEFAULT_MAX_ERROR_FRACTION = 0.5
#: Rows decoded before the fraction is judged: enough that a fraction over 0.5 is not chance
#: (one block of bad files in a row does not stop a run), and a few seconds of decoding, so a
#: broken large run stops early. A run of fewer rows is never stopped: it ends in seconds or
#: minutes anyway, and its error rows, each naming its problem, are the report (a one-image
#: run of a bad file must give that row, not a failed run).
MIN_ROWS = 1000


class ErrorFractionExceeded(RuntimeError):
    """Raised by a decode task once the run's error fraction passed ``--max-error-fraction``."""

    def __init__(self, message: str):
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0],))


class ErrorTally:
    """The run's counts (plain class, so it is tested without Ray; ``start_counter`` runs it as
    an actor). ``add`` returns None while all is well, else the one-line message."""

    def __init__(self, max_fraction: float, min_rows: int = MIN_ROWS):
        self.max_fraction = float(max_fraction)
        self.min_rows = max(1, int(min_rows))
        self.rows = 0
        self.errors = 0
        self.kinds: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.stopped: str | None = None

    def add(self, rows: int, kinds: dict[str, int], examples: dict[str, str]) -> str | None:
        self.rows += int(rows)
        for kind, count in kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0) + int(count)
            self.errors += int(count)
            self.examples.setdefault(kind, examples.get(kind, ""))
        if (
            self.stopped is None
            and self.max_fraction < 1
            and self.rows >= self.min_rows
            and (self.errors > self.max_fraction * self.rows)
        ):
            self.stopped = self.message()
        return self.stopped

    def message(self) -> str:
        common = sorted(self.kinds.items(), key=lambda kv: -kv[1])[:3]
        kinds = ", ".join(f"{kind} {count}" for kind, count in common)
        example = self.examples.get(common[0][0], "") if common else ""
        return (
            f"{self.errors} of the first {self.rows} rows decoded are errors "
            f"({self.errors / self.rows:.0%}, more than --max-error-fraction "
            f"{self.max_fraction:g}): {kinds}; e.g. {example}"
        )

    def counts(self) -> dict[str, Any]:
        return {"rows": self.rows, "errors": self.errors, "kinds": dict(self.kinds)}


def start_counter(max_fraction: float, rows_to_score: int, min_rows: int = MIN_ROWS):
    """An ``ErrorTally`` actor for this run (no CPU reserved), or None when the check is off."""
    import ray

    if max_fraction >= 1 or rows_to_score < min_rows:  # off, or a run too small to stop
        return None
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ErrorTally)
    return actor.remote(max_fraction, min_rows)


def report(counter, errors) -> None:
    """Send one decoded block's errors (a pyarrow string array) to ``counter``; raise
    ``ErrorFractionExceeded`` when the run has passed its limit."""
    import ray

    kinds: dict[str, int] = {}
    examples: dict[str, str] = {}
    for text in errors.to_pylist():
        if text:
            kind = text.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            examples.setdefault(kind, text[:300])
    stopped = ray.get(counter.add.remote(len(errors), kinds, examples))
    if stopped:
        raise ErrorFractionExceeded(stopped)
