"""Ray job entrypoint for evaluation: the same options and code as `memscore evaluate`.

Evaluation runs in the driver (numpy, scipy and pyarrow; no Ray tasks), so it can follow a scoring job
on the same cluster and read its output where it was written:

    python jobs/evaluate.py scores/ --truth labels.csv --truth-column memorability --report report/
    ray job submit --working-dir . -- python jobs/evaluate.py s3://bucket/scores/ \
        --truth s3://bucket/labels.parquet --truth-column memorability \
        --report s3://bucket/report/ --group-by category
"""

from __future__ import annotations

import sys

from memscore.cli import job_entrypoint
from memscore.evaluation.config import EvaluateConfig

parse_args, main = job_entrypoint(EvaluateConfig, __doc__)

if __name__ == "__main__":
    sys.exit(main(parse_args()))
