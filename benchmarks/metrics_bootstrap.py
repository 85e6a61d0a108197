"""Why memscore keeps its own bootstrap of Spearman's rho: ``metrics.bootstrap_spearman`` against
scipy's ways of computing the same resamples.

For each size (default 10,000 and 100,000 pairs: MemCat's 10,000 images, and a larger
collection), a seeded table of predictions (continuous) and ground truth (three decimals, so
with ties, as measured memorability scores have) is bootstrapped with ``--resamples`` resamples
(default 1000, what ``memscore evaluate`` draws) in four ways:

* ``memscore``: ``metrics.bootstrap_spearman`` (each resample as a count of copies per pair,
  every resample of a chunk at once, no sort per resample) and ``metrics.percentile_interval``;
* ``spearmanr loop``: the same index draws, one ``scipy.stats.spearmanr`` per resample (its
  largest difference from memscore's rho per resample is reported: they must agree);
* ``rankdata rows``: the same index draws, ranked row-wise by ``scipy.stats.rankdata(...,
  axis=1)`` in chunks of about 1M cells and correlated row-wise in numpy: the fastest way to
  use scipy for it;
* ``scipy bootstrap``: ``scipy.stats.bootstrap((x, y), spearmanr's statistic, paired=True,
  method="percentile", rng=seed)`` (``spearmanr`` takes no axis over resamples, hence
  ``vectorized=False``; ``batch`` is memscore's chunk, which keeps its index arrays near 1M
  cells; it draws its indices from its own Generator, and the table says how far its rho per
  resample lies from memscore's).

Each variant runs once per round, variants interleaved so that a busy spell of a shared machine
falls on all of them; the table gives the fastest round's wall and CPU seconds and each
variant's time as a multiple of memscore's.

    python benchmarks/metrics_bootstrap.py         # -> benchmarks/METRICS_RESULTS.md, ~3 minutes
    python benchmarks/metrics_bootstrap.py --sizes 2000 --resamples 200 --results /tmp/m.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memscore.evaluation import metrics  # noqa: E402

VARIANTS = ("memscore", "spearmanr loop", "rankdata rows", "scipy bootstrap")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="10000,100000",
        help="comma-separated numbers of pairs (default 10000,100000)",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="(default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "METRICS_RESULTS.md"),
        help="Markdown file to write (default benchmarks/METRICS_RESULTS.md)",
    )
    return parser.parse_args(argv)


def table_of(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prediction = rng.random(n)
    truth = np.round(np.clip(prediction + rng.normal(0, 0.3, n), 0, 1), 3)
    return prediction, truth


def memscores_draws(n: int, resamples: int, seed: int):
    """The index rows bootstrap_spearman draws, chunk by chunk (its docstring's contract)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, metrics._CHUNK_CELLS // n)
    for start in range(0, resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, resamples - start), n), dtype=np.int32)


def run_memscore(x, y, resamples, seed):
    rhos = metrics.bootstrap_spearman(x, y, resamples=resamples, seed=seed)
    return rhos, metrics.percentile_interval(rhos)


def run_spearmanr_loop(x, y, resamples, seed):
    rhos = np.array(
        [
            stats.spearmanr(x[i], y[i]).statistic
            for rows in memscores_draws(x.size, resamples, seed)
            for i in rows
        ]
    )
    return rhos, metrics.percentile_interval(rhos)


def run_rankdata_rows(x, y, resamples, seed):
    parts = []
    for rows in memscores_draws(x.size, resamples, seed):
        rx = stats.rankdata(x[rows], axis=1)
        ry = stats.rankdata(y[rows], axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        parts.append(
            np.einsum("ij,ij->i", rx, ry)
            / np.sqrt(np.einsum("ij,ij->i", rx, rx) * np.einsum("ij,ij->i", ry, ry))
        )
    rhos = np.concatenate(parts)
    return rhos, metrics.percentile_interval(rhos)


def run_scipy_bootstrap(x, y, resamples, seed):
    result = stats.bootstrap(
        (x, y),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=resamples,
        batch=max(1, metrics._CHUNK_CELLS // x.size),
        method="percentile",
        confidence_level=0.95,
        rng=seed,
    )
    interval = result.confidence_interval
    return result.bootstrap_distribution, [float(interval.low), float(interval.high)]


RUNNERS = dict(
    zip(VARIANTS, (run_memscore, run_spearmanr_loop, run_rankdata_rows, run_scipy_bootstrap))
)


def measure(n: int, args) -> dict:
    x, y = table_of(n, args.seed)
    best: dict = {}
    outputs: dict = {}
    for _ in range(args.rounds):
        for name in VARIANTS:
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[name] = RUNNERS[name](x, y, args.resamples, args.seed)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{n:>9,} pairs  {name:<16} {wall:8.2f} s wall {cpu:8.2f} s CPU", flush=True)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    reference = outputs["memscore"][0]
    agreement = {
        name: float(np.max(np.abs(np.asarray(outputs[name][0]) - reference)))
        for name in VARIANTS[1:]
    }
    return {
        "rho": metrics.spearman(x, y),
        "best": best,
        "agreement": agreement,
        "intervals": {name: outputs[name][1] for name in VARIANTS},
    }


def report(results: dict, args, load) -> str:
    lines = [
        "# Bootstrap of Spearman's rho: memscore against scipy",
        "",
        f"`python benchmarks/metrics_bootstrap.py --sizes {args.sizes} --resamples "
        f"{args.resamples} --rounds {args.rounds}`, {dt.date.today().isoformat()}, "
        f"{platform.platform()}, {os.cpu_count()} cores, numpy {np.__version__}, scipy "
        f"{__import__('scipy').__version__}; the machine's 1-minute load average "
        f"{load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end (shared with other work).",
        "",
        f'{args.resamples} resamples each; the fastest of {args.rounds} rounds; "x memscore" is '
        "a variant's wall time over memscore's; the last column is the largest difference of a "
        "variant's rho per resample from memscore's (the same draws give the same rhos).",
        "",
        "| pairs | variant | wall s | CPU s | x memscore | 95% interval | max abs diff of rho |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for n, r in results.items():
        base = r["best"]["memscore"][0]
        for name in VARIANTS:
            wall, cpu = r["best"][name]
            lo, hi = r["intervals"][name]
            diff = r["agreement"].get(name)
            lines.append(
                f"| {n:,} | {name} | {wall:.2f} | {cpu:.2f} | {wall / base:.1f} | "
                f"[{lo:.4f}, {hi:.4f}] | {'' if diff is None else f'{diff:.1e}'} |"
            )
    return "\n".join(lines) + "\n"


def main(args) -> int:
    load = [os.getloadavg()]
    results = {n: measure(n, args) for n in (int(s) for s in args.sizes.split(","))}
    load.append(os.getloadavg())
    text = report(results, args, load)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
