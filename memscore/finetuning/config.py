"""``memscore finetune``'s options: ``FinetuneConfig``, validated before any cluster work starts.

Its fields make ``memscore finetune``'s and ``jobs/finetune.py``'s options (``memscore.options``);
the options it shares with ``memscore train-sae`` are ``memscore.training.options``'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from memscore.errors import MemscoreError
from memscore.options import fields_as_args, fix_paths, option
from memscore.training.options import (
    TRAINING_DEFAULTS,
    TrainingRunOptions,
    training_default_text,
    training_start,
)

__all__ = ["FinetuneConfig"]


@fields_as_args
@dataclass(frozen=True)
class FinetuneConfig(TrainingRunOptions):
    """Everything one fine-tuning run needs. See ``memscore finetune --help`` for each field.

    ``optimizer``, ``lr`` and ``batch_size`` left at None take ``TRAINING_DEFAULTS`` for where
    the run starts (``with_training_defaults``, which ``finetune`` calls).

    Example:
        >>> cfg = FinetuneConfig("labelled.csv", output="runs/", name="lab-a", model="memnet")
        >>> (cfg.model, cfg.mode, cfg.optimizer)
        ('memnet', 'head', None)
        >>> cfg.with_training_defaults("scratch").optimizer
        'adamw'
    """

    manifest: str = field(
        metadata=option(
            "Labelled images: a CSV, Parquet, JSONL file or folder with a path column and a label "
            "column; local or s3://.",
            positional=True,
        )
    )
    output: str = field(
        metadata=option(
            "Folder (local or s3://) that holds runs; this run writes to OUTPUT/NAME: best/ (the "
            "memscore checkpoint to score with), splits/, history.json, test scores and report, "
            "finetune.json, and Ray Train's own checkpoints (ray_train/).",
            flag="--output",
            required=True,
        )
    )
    name: str = field(
        default="finetune",
        metadata=option(
            "Run name. The same command with the same name resumes an interrupted run from its "
            "last epoch; a finished run is reported, not redone."
        ),
    )
    label_column: str = field(
        default="memorability",
        metadata=option(
            "Manifest column with each image's measured score (numeric; rows where it is empty "
            "are skipped and counted)."
        ),
    )
    model: str = field(
        default="resmem", metadata=option("Model to train, from `memscore models`.", metavar="NAME")
    )
    mode: str = field(
        default="head",
        metadata=option(
            "head: train the head and the AlexNet-style branch on a frozen ResNet (the paper's "
            "ResMem; for MemNet, fc6-fc8 on frozen convs); full: retrain the backbone too "
            "(ResMemRetrain).",
            choices=("head", "full"),
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=option(
            "Starting weights: exactly a member name of the model's weights enum, or 'scratch' "
            "for random init; anything else is a checkpoint (file or memscore checkpoint folder, "
            "local or s3://; a folder named like a member or scratch: ./scratch). Default: the "
            "published weights where the model has them, else scratch."
        ),
    )
    path_column: str = field(
        default="path", metadata=option("Manifest column holding each image's path or s3:// URL.")
    )
    split_column: str | None = field(
        default=None,
        metadata=option(
            "Manifest column naming each row's split (train, validation/val, test). Without it "
            "rows are split by a stable hash of the image path (see --split-fractions)."
        ),
    )
    split_fractions: str = field(
        default="0.8,0.1,0.1",
        metadata=option(
            "train,validation,test fractions of the hash split.", metavar="TRAIN,VAL,TEST"
        ),
    )
    split_seed: int = field(
        default=0,
        metadata=option("Salt of the hash split: another seed, another (equally stable) split."),
    )
    epochs: int = field(default=10, metadata=option("Most epochs to train."))
    batch_size: int | None = field(
        default=None,
        metadata=option(
            "Images per training step on each worker" + training_default_text("batch_size") + "."
        ),
    )
    optimizer: str | None = field(
        default=None,
        metadata=option(
            "sgd (with momentum, the paper's) or adamw" + training_default_text("optimizer") + ".",
            choices=("sgd", "adamw"),
        ),
    )
    lr: float | None = field(
        default=None, metadata=option("Learning rate" + training_default_text("lr") + ".")
    )
    momentum: float = field(default=0.9, metadata=option("SGD momentum."))
    weight_decay: float = field(default=1e-4, metadata=option("Weight decay."))
    patience: int = field(
        default=3,
        metadata=option(
            "Stop after this many epochs without a better validation Spearman; the best epoch's "
            "model is the result."
        ),
    )
    augment: str = field(
        default="crop,flip",
        metadata=option(
            "Training augmentation, comma-separated: crop (random 227 crops of the 256x256 resize "
            "instead of the centre one), flip (random mirror); 'none' for none. Validation and "
            "scoring always use the centre crop.",
            metavar="crop,flip|none",
        ),
    )
    seed: int = field(
        default=0, metadata=option("Seed of initialisation, shuffling, augmentation.")
    )
    torch_threads: int | None = field(
        default=None,
        metadata=option(
            "Torch intra-op threads per CPU worker (default: the node's cores / workers)."
        ),
    )
    decode_batch_size: int = field(default=64, metadata=option("Rows per CPU decode task."))

    @property
    def augmentations(self) -> tuple[str, ...]:
        if self.augment.strip().lower() in ("", "none"):
            return ()
        return tuple(part.strip().lower() for part in self.augment.split(",") if part.strip())

    def __post_init__(self) -> None:
        fix_paths(
            self,
            ("manifest", "output"),
            weights="weights",
            models=(self.model,),
            names=("scratch",),
        )

    def with_training_defaults(self, start: str) -> FinetuneConfig:
        """This config with ``optimizer``, ``lr`` and ``batch_size`` that are None set from
        ``TRAINING_DEFAULTS`` for ``start`` ("scratch", a weights name, a checkpoint)."""
        defaults = TRAINING_DEFAULTS[training_start(start)]
        return dataclasses.replace(
            self, **{name: value for name, value in defaults.items() if getattr(self, name) is None}
        )

    def validated(self) -> FinetuneConfig:
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        from memscore.finetuning.splits import parse_fractions
        from memscore.models import get_model_weights, list_models

        self.check_run_options()
        known = list_models()
        if self.model not in known:
            raise MemscoreError(f"unknown model {self.model!r}; choose from {', '.join(known)}")
        # a model's weights name what head mode freezes; without that fact there is no plan
        if "backbone" not in get_model_weights(self.model).DEFAULT.meta:
            raise MemscoreError(f"memscore does not fine-tune {self.model!r} yet")
        if self.mode not in ("head", "full"):
            raise MemscoreError(f"--mode must be head or full, not {self.mode!r}")
        if self.optimizer not in (None, "sgd", "adamw"):
            raise MemscoreError(f"--optimizer must be sgd or adamw, not {self.optimizer!r}")
        unknown = set(self.augmentations) - {"crop", "flip"}
        if unknown:
            raise MemscoreError(
                f"--augment: unknown {', '.join(sorted(unknown))} (crop, flip or none)"
            )
        if not self.split_column:
            try:
                parse_fractions(self.split_fractions)
            except ValueError as exc:
                raise MemscoreError(f"--split-fractions: {exc}") from None
        for name in ("epochs", "batch_size", "patience", "decode_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MemscoreError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise MemscoreError("--lr must be positive")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise MemscoreError(f"--{name.replace('_', '-')} must not be negative")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise MemscoreError("--torch-threads must be at least 1")
        return self
