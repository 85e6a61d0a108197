"""Ray job entrypoint for network feature analysis: the same options and code as `memscore features`.

Run it locally with plain Python, or on a cluster:

    python jobs/features.py examples/images --layers conv4 --output features-job/
    ray job submit --working-dir . -- python jobs/features.py s3://bucket/shards/{000000..000999}.tar \
        --layers conv4,features.layer4.2 --visualize 16 --output s3://bucket/features/ --num-gpus 4

Inside a Ray job, RAY_ADDRESS is set by Ray, so the run joins the cluster it was submitted to;
the renderings then run as Ray tasks on its GPUs.
"""

from __future__ import annotations

import sys

from memscore.cli import job_entrypoint
from memscore.feature_analysis.config import FeaturesConfig

parse_args, main = job_entrypoint(FeaturesConfig, __doc__)

if __name__ == "__main__":
    sys.exit(main(parse_args()))
