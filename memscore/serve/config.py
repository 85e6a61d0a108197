"""``memscore serve``'s one config object: the command line and a Serve config file's ``args``.

``memscore serve``'s options are generated from ``ServeConfig``'s fields (``add_arguments``),
and ``serve run``/``serve deploy`` hand the same field names to ``memscore.serve.app:build``
as the application's ``args``, so the two ways of starting it take the same options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from memscore.errors import MemscoreError
from memscore.options import as_tuple, check_model_names, fields_as_args, fix_paths, option

__all__ = ["ServeConfig", "parse_replicas"]

_REPLICAS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_replicas(text: str | int) -> tuple[int, int]:
    """``"2"`` -> (2, 2), a fixed count; ``"1-4"`` -> (1, 4), an autoscaling range.

    Example:
        >>> parse_replicas("1-4"), parse_replicas(2)
        ((1, 4), (2, 2))
    """
    match = _REPLICAS.match(str(text))
    if not match:
        raise MemscoreError(f"--replicas {text!r}: give a count (2) or a range (1-4)")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if low < 1 and high < 1:
        raise MemscoreError(f"--replicas {text!r}: at least one replica")
    if high < low:
        raise MemscoreError(f"--replicas {text!r}: the range's end is below its start")
    return low, high


@fields_as_args
@dataclass(frozen=True)
class ServeConfig:
    """Everything ``memscore serve`` needs. See ``memscore serve --help`` for each field.

    Example:
        >>> cfg = ServeConfig(models="resmem,falseresmem", replicas="1-2")
        >>> cfg.models, cfg.port, parse_replicas(cfg.replicas)
        (('resmem', 'falseresmem'), 8000, (1, 2))
    """

    models: tuple[str, ...] = field(
        default=("resmem",),
        metadata=option(
            "Model(s) to serve, from `memscore models`; several, comma-separated, are loaded "
            "together in each model replica and give one score each.",
            flag="--model",
            metavar="NAME[,NAME]",
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=option(
            "Weights of a single model: exactly a member name of its weights enum (default: the "
            "published weights), else a checkpoint (local or s3://), as for `memscore score`."
        ),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=option(
            "Address to listen on. 0.0.0.0 makes the server reachable from other machines: it has "
            "no authentication, so put it behind your cluster's proxy."
        ),
    )
    port: int = field(default=8000, metadata=option("Port to listen on."))
    replicas: str = field(
        default="1",
        metadata=option(
            "Model replicas: a count (2), or a range (1-4) that Ray Serve autoscales within on "
            "the requests in flight. Each replica loads the models once and takes one GPU where "
            "the cluster has GPUs, else one CPU slot.",
            metavar="N|MIN-MAX",
        ),
    )
    max_upload_mb: float = field(
        default=25.0,
        metadata=option(
            "Largest request body (all files of one request), in MiB; a larger upload is refused "
            "with 413 before it is read whole.",
            metavar="MB",
        ),
    )
    max_batch_size: int = field(
        default=32,
        metadata=option(
            "Most images per forward pass of a model replica (Ray Serve's @serve.batch): requests "
            "arriving while a batch runs are scored together in the next."
        ),
    )
    batch_wait_ms: float = field(
        default=10.0,
        metadata=option(
            "How long a replica waits for more images before running a batch that is not full. "
            "Under load batches fill while the previous one runs, so this only adds latency to "
            "single requests.",
            metavar="MS",
        ),
    )
    max_pixels: int = field(
        default=89_478_485,
        metadata=option(
            "Images declaring more pixels than this are refused as decompression bombs (a request's "
            "?max_pixels= may lower it, never raise it)."
        ),
    )
    gpus_per_replica: float | None = field(
        default=None,
        metadata=option(
            "GPUs each model replica takes (default: 1 where the cluster has GPUs, else 0: CPU)."
        ),
    )
    torch_threads: int | None = field(
        default=None,
        metadata=option(
            "Torch threads per CPU model replica (default: the machine's cores divided among the "
            "replicas of a local Ray; every core of its node when joining a cluster)."
        ),
    )
    precision: str = field(
        default="fp32",
        metadata=option(
            "The model's arithmetic, as for `memscore score` (fp32: the published scores).",
            choices=("fp32", "tf32", "bf16", "fp16"),
        ),
    )
    address: str | None = field(
        default=None,
        metadata=option(
            "Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray started for the "
            "server). The server's HTTP proxy runs on the head node."
        ),
    )

    def __post_init__(self) -> None:
        as_tuple(self, "models")
        fix_paths(self, (), weights="weights", models=self.models)
        object.__setattr__(self, "replicas", str(self.replicas))

    def validated(self) -> ServeConfig:
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        from memscore.stages.predict import PRECISIONS

        check_model_names(self.models)
        if self.weights is not None and len(self.models) > 1:
            raise MemscoreError(
                "--weights applies to one model; serve models with own weights separately"
            )
        if not 1 <= self.port <= 65535:
            raise MemscoreError(f"--port {self.port}: choose 1-65535")
        if not self.host:
            raise MemscoreError("--host is empty")
        parse_replicas(self.replicas)
        if not self.max_upload_mb > 0:
            raise MemscoreError("--max-upload-mb must be positive")
        if self.max_batch_size < 1:
            raise MemscoreError("--max-batch-size must be at least 1")
        if not self.batch_wait_ms >= 0:
            raise MemscoreError("--batch-wait-ms must not be negative")
        if self.max_pixels < 1:
            raise MemscoreError("--max-pixels must be at least 1")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise MemscoreError("--gpus-per-replica must not be negative")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise MemscoreError("--torch-threads must be at least 1")
        if self.precision not in PRECISIONS:
            raise MemscoreError(f"--precision must be one of {', '.join(PRECISIONS)}")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)
