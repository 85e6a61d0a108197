"""Ray job entrypoint for scoring: the same options and code as `memscore score`.

Run it locally with plain Python, or on a cluster:

    python jobs/score.py examples/images --output scores/
    ray job submit --working-dir . -- python jobs/score.py s3://bucket/manifest.parquet \
        --output s3://bucket/scores/ --path-column uri --num-gpus 4

Inside a Ray job, RAY_ADDRESS is set by Ray, so the run joins the cluster it was submitted to.
``--num-gpus`` plans that many GPU actors even before the GPU nodes are up (cluster.yaml's
start from zero): without it the job sizes its pool from the GPUs present when it starts.
"""

from __future__ import annotations

import sys

from memscore.cli import job_entrypoint
from memscore.scoring.config import ScoreConfig

parse_args, main = job_entrypoint(ScoreConfig, __doc__)

if __name__ == "__main__":
    sys.exit(main(parse_args()))
