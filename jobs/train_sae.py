"""Ray job entrypoint for the autoencoder: the same options and code as `memscore train-sae`.

Run it locally with plain Python, or on a cluster:

    python jobs/train_sae.py memcat.csv --encoder clip --output runs/ --name clip-a
    ray job submit --working-dir . -- python jobs/train_sae.py s3://bucket/memcat.parquet \
        --encoder dinov2 --weights s3://bucket/encoders/dinov2-base --output s3://bucket/runs/ \
        --name dinov2-a --workers 2

Inside a Ray job, RAY_ADDRESS is set by Ray, so the run joins the cluster it was submitted to.
Re-submitting the same command resumes the run from its last epoch.
"""

from __future__ import annotations

import sys

from memscore.cli import job_entrypoint
from memscore.train_sae.config import TrainSAEConfig

parse_args, main = job_entrypoint(TrainSAEConfig, __doc__)

if __name__ == "__main__":
    sys.exit(main(parse_args()))
