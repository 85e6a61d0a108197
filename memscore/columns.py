"""The columns memscore adds to a user's rows: one place for their names.

Every name memscore writes for its own bookkeeping starts with ``memscore_``, a prefix no common
dataset uses, so img2dataset output (``key, url, caption, status, error_message, width,
height, ...``), LAION metadata (``WIDTH``, ``HEIGHT``) and labelled sets pass through unchanged.
Score columns are named by each model's weights (``memorability``, ``false_alarm``, ...); a
manifest that already has such a column (ground truth named ``memorability``) is scored with
``--column-prefix``, which prefixes the score columns only.
"""

from __future__ import annotations

__all__ = [
    "ROW",
    "SPLIT",
    "REPRESENTATION",
    "ERROR",
    "MODEL",
    "WIDTH",
    "HEIGHT",
    "BOOKKEEPING",
    "INTERNAL_PREFIX",
    "PIXELS_PREFIX",
    "IMAGE",
    "is_internal",
    "pixels_column",
    "score_column",
]

#: The row's 0-based position in the manifest: its stable id (duplicated paths stay apart).
ROW = "memscore_row"
#: Fine-tuning's split of a labelled row: ``train``, ``validation`` or ``test``.
SPLIT = "memscore_split"
#: train-sae's representation vectors: list<float32> of d values, null where the image failed.
REPRESENTATION = "memscore_representation"
#: Null when the row was scored, else ``"<kind>: <detail>"``.
ERROR = "memscore_error"
#: The model(s) that scored the row, comma-separated.
MODEL = "memscore_model"
#: The decoded image's size, as the model saw it; null on error.
WIDTH = "memscore_width"
HEIGHT = "memscore_height"

#: The bookkeeping columns after the scores, in output order.
BOOKKEEPING = (ERROR, MODEL, WIDTH, HEIGHT)

#: Every internal column between memscore's stages starts with this; none is ever written.
INTERNAL_PREFIX = "__memscore"
#: Internal tensor columns between the decode and model stages; never written.
PIXELS_PREFIX = "__memscore_pixels"
#: Internal column of a WebDataset sample's image member (its bytes; ``IMAGE + "_ext"`` holds the
#: member's extension): read from the shard, decoded, never written (see ``memscore.sources.webdataset``).
IMAGE = "__memscore_image"


def is_internal(name: str) -> bool:
    """Whether ``name`` is one of memscore's internal stage columns (never written)."""
    return name.startswith(INTERNAL_PREFIX)


def pixels_column(name: str) -> str:
    """Name of the internal tensor column holding the pixels for preprocess entry ``name``."""
    return f"{PIXELS_PREFIX}_{name}"


def score_column(output_column: str, prefix: str = "") -> str:
    """The column a model's score goes to: its weights' ``output_column``, with ``prefix``."""
    return f"{prefix}{output_column}"
