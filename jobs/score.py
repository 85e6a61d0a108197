"""Ray job entrypoint for scoring: the same options and code as `memscore score`.

Run it locally with plain Python, or on a cluster:

    python jobs/score.py examples/images --output scores/
    ray job submit --working-dir . -- python jobs/score.py s3://bucket/manifest.parquet \
        --output s3://bucket/scores/ --path-column uri

Inside a Ray job, RAY_ADDRESS is set by Ray, so the run joins the cluster it was submitted to.
"""

from __future__ import annotations

import argparse
import sys

from memscore.cli import add_debug_flag, guarded, score_command
from memscore.config import ScoreConfig, add_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, ScoreConfig)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    return guarded(score_command, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
