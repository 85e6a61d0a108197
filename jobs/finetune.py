"""Ray job entrypoint for fine-tuning: the same options and code as `memscore finetune`.

Run it locally with plain Python, or on a cluster:

    python jobs/finetune.py labelled.csv --output runs/ --name lab-a --model memnet
    ray job submit --working-dir . -- python jobs/finetune.py s3://bucket/labelled.parquet \
        --output s3://bucket/runs/ --name lab-a --workers 4

Inside a Ray job, RAY_ADDRESS is set by Ray, so the run joins the cluster it was submitted to.
Re-submitting the same command resumes the run from its last epoch.
"""

from __future__ import annotations

import argparse
import sys

from memscore.cli import add_debug_flag, guarded, finetune_command
from memscore.config import FinetuneConfig, add_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, FinetuneConfig)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    return guarded(finetune_command, args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
