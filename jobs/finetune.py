"""Ray job entrypoint for fine-tuning: the same options and code as `memscore finetune`.

Run it locally with plain Python, or on a cluster:

    python jobs/finetune.py labelled.csv --output runs/ --name lab-a --model memnet
    ray job submit --working-dir . -- python jobs/finetune.py s3://bucket/labelled.parquet \
        --output s3://bucket/runs/ --name lab-a --workers 4

Inside a Ray job, RAY_ADDRESS is set by Ray, so the run joins the cluster it was submitted to.
Re-submitting the same command resumes the run from its last epoch.
"""

from __future__ import annotations

import sys

from memscore.cli import job_entrypoint
from memscore.finetuning.config import FinetuneConfig

parse_args, main = job_entrypoint(FinetuneConfig, __doc__)

if __name__ == "__main__":
    sys.exit(main(parse_args()))
