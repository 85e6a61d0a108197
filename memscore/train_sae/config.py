"""``memscore train-sae``'s options: ``TrainSAEConfig``, validated before any cluster work starts.

Its fields make ``memscore train-sae``'s and ``jobs/train_sae.py``'s options
(``memscore.options``); the options it shares with ``memscore finetune`` are
``memscore.training.options``'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from memscore.errors import MemscoreError
from memscore.options import fields_as_args, fix_paths, option
from memscore.training.options import TrainingRunOptions

__all__ = ["TrainSAEConfig", "SAE_ENCODERS"]


#: The encoders ``memscore train-sae`` trains on (``memscore.models.encoders.ENCODERS``).
SAE_ENCODERS = ("clip", "dinov2", "siglip2")


@fields_as_args
@dataclass(frozen=True)
class TrainSAEConfig(TrainingRunOptions):
    """One autoencoder training run (Takmaz et al. 2025). See ``memscore train-sae --help``.

    The defaults are the paper's: 100 latents, l1 weight 1e-5, AdamW at lr 1e-4, 5 epochs,
    batch size 1.

    Example:
        >>> cfg = TrainSAEConfig("memcat.csv", output="runs/", encoder="clip", name="clip-a")
        >>> (cfg.latents, cfg.l1, cfg.lr, cfg.epochs, cfg.batch_size)
        (100, 1e-05, 0.0001, 5, 1)
    """

    manifest: str = field(
        metadata=option(
            "The training images: a CSV, Parquet (file or folder), JSONL file, a folder of images "
            "or a glob, local or s3:// (as for score).",
            positional=True,
        )
    )
    output: str = field(
        metadata=option(
            "Folder (local or s3://) that holds runs; this run writes to OUTPUT/NAME: "
            "representations/ (every image's encoder vector), ray_train/ (per-epoch checkpoints), "
            "history.json, best/ (the memscore checkpoint to score with --model ENCODER-sae) and "
            "train_sae.json.",
            flag="--output",
            required=True,
        )
    )
    encoder: str = field(
        metadata=option(
            "The vision encoder whose representations the autoencoder learns.",
            flag="--encoder",
            required=True,
            choices=SAE_ENCODERS,
            metavar="clip|dinov2|siglip2",
        )
    )
    name: str = field(
        default="sae",
        metadata=option(
            "Run name. The same command with the same name resumes an interrupted run from its "
            "last epoch (the representations are not computed again); a finished run is "
            "reported, not redone."
        ),
    )
    weights: str | None = field(
        default=None,
        metadata=option(
            "The encoder's weights: a Hugging Face model id from the local cache (default: the "
            "paper's, e.g. openai/clip-vit-base-patch32) or a save_pretrained folder with its "
            "preprocessor_config.json, local or s3://.",
            metavar="ENCODER",
        ),
    )
    path_column: str = field(
        default="path", metadata=option("Manifest column holding each image's path or s3:// URL.")
    )
    latents: int = field(default=100, metadata=option("Hidden units of the autoencoder."))
    l1: float = field(
        default=1e-5,
        metadata=option("Weight of the sparsity term, |fc1 output before the ReLU| summed."),
    )
    lr: float = field(default=1e-4, metadata=option("AdamW learning rate."))
    weight_decay: float = field(
        default=0.01, metadata=option("AdamW weight decay (torch's default, which the paper used).")
    )
    epochs: int = field(
        default=5,
        metadata=option(
            "Epochs to train; a finished run trained further with more epochs goes on from its "
            "last one."
        ),
    )
    batch_size: int = field(
        default=1,
        metadata=option(
            "Images per optimisation step on each worker: --workers N with --batch-size B takes "
            "the same steps as one worker with N x B."
        ),
    )
    seed: int = field(
        default=0, metadata=option("Seed of the initialisation and of each epoch's shuffle.")
    )
    torch_threads: int | None = field(
        default=None,
        metadata=option(
            "Torch intra-op threads per CPU worker or encoder actor (default: the node's cores, "
            "shared among the training workers)."
        ),
    )
    actors: int | None = field(
        default=None,
        metadata=option(
            "Encoder actors computing the representations (default: one per GPU where the "
            "cluster has GPUs, else 1 using every core)."
        ),
    )
    encode_batch_size: int = field(
        default=32, metadata=option("Images per encoder forward pass on each encoder actor.")
    )
    decode_batch_size: int = field(default=256, metadata=option("Rows per CPU decode task call."))

    def __post_init__(self) -> None:
        from memscore.storage import absolute

        fix_paths(self, ("manifest", "output"))
        # A local encoder folder made whole (a relative one is the user's, from where they typed
        # the command); a Hugging Face id (owner/name) or a URL stays as given.
        if self.weights and os.path.isdir(os.path.expanduser(str(self.weights))):
            object.__setattr__(self, "weights", absolute(str(self.weights)))

    def validated(self) -> TrainSAEConfig:
        """Return self after checking every field; raises MemscoreError naming the first problem."""
        self.check_run_options()
        if self.encoder not in SAE_ENCODERS:
            raise MemscoreError(
                f"--encoder must be one of {', '.join(SAE_ENCODERS)}, not {self.encoder!r}"
            )
        for flag, value in (
            ("--latents", self.latents),
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--encode-batch-size", self.encode_batch_size),
            ("--decode-batch-size", self.decode_batch_size),
        ):
            if value < 1:
                raise MemscoreError(f"{flag} must be at least 1, not {value}")
        if not self.lr > 0:
            raise MemscoreError(f"--lr must be positive, not {self.lr}")
        if self.l1 < 0 or self.weight_decay < 0:
            raise MemscoreError("--l1 and --weight-decay must not be negative")
        if self.actors is not None and self.actors < 1:
            raise MemscoreError(f"--actors must be at least 1, not {self.actors}")
        return self
