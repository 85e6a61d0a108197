"""Images inside Parquet in the commands that read a manifest's rows in the driver: ``memscore
evaluate`` (its ``--truth`` read without the image column), ``memscore finetune`` and
``memscore train-sae`` (the rows without their images in the driver, the images read in place
by the source's Ray tasks). Tables are written as the Hub and img2dataset write them
(``test_parquet_images.write_hub``'s layout); the images are real PNGs and the examples' photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from hf_encoders import make_encoder_folder
from synthetic import write_tint_dataset
from test_parquet_images import HF_IMAGE, write_img2dataset

from memscore.columns import ERROR, ROW
from memscore.config import EvaluateConfig, FinetuneConfig, TrainSAEConfig
from memscore.errors import MemscoreError
from memscore.evaluation.job import evaluate
from memscore.finetuning.job import LABELLED_ROW, finetune
from memscore.sources.manifest import open_manifest
from memscore.train_sae.job import train_sae
from memscore.train_sae.representations import REPRESENTATION


def write_hub_labels(folder: Path, labels_csv: Path, *, files: int = 2, split: bool = False):
    """A Hugging Face dataset (``data/train-NNNNN-of-NNNNN.parquet``, an ``Image`` feature and
    the card) of the rows of ``labels_csv`` (path, memorability, category): the image's bytes
    inline, its file name in ``path``, the label a float column, an ``id`` key; with ``split``,
    a ``split`` column (every 4th row validation, every 5th test)."""
    table = pyarrow.csv.read_csv(labels_csv, convert_options=pyarrow.csv.ConvertOptions())
    rows = table.to_pylist()
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(rows) // files)
    for i in range(files):
        part = rows[i * per_file : (i + 1) * per_file]
        columns = {
            "image": pa.array(
                [
                    {"bytes": (labels_csv.parent / r["path"]).read_bytes(), "path": r["path"]}
                    for r in part
                ],
                HF_IMAGE,
            ),
            "id": [Path(r["path"]).stem for r in part],
            "memorability": pa.array([float(r["memorability"]) for r in part], pa.float64()),
            "category": [r["category"] for r in part],
        }
        if split:
            columns["split"] = [_split(i * per_file + n) for n in range(len(part))]
        pq.write_table(
            pa.table(columns), data / f"train-{i:05d}-of-{files:05d}.parquet", row_group_size=8
        )
    (folder / "README.md").write_text("---\ndataset_info:\n  features:\n  - name: image\n---\n")
    return folder


def _split(n: int) -> str:
    return "test" if n % 5 == 4 else "validation" if n % 4 == 3 else "train"


# --------------------------------------------------------------------------------- evaluate
def test_evaluate_reads_a_hub_truth_without_its_images_and_matches_the_csv(tmp_path, monkeypatch):
    labels = write_tint_dataset(tmp_path / "tint", 24)
    hub = write_hub_labels(tmp_path / "hub", labels)
    truth = pa.concat_tables(
        [
            pq.read_table(f, columns=["id", "memorability", "category"])
            for f in sorted((hub / "data").glob("*.parquet"))
        ]
    )
    pyarrow.csv.write_csv(truth, tmp_path / "truth.csv")
    rng = np.random.default_rng(1)
    predicted = truth.column("memorability").to_numpy() + rng.normal(0, 0.05, truth.num_rows)
    pq.write_table(
        pa.table({"id": truth.column("id"), "memorability": predicted}), tmp_path / "pred.parquet"
    )

    # the truth's image column is never read: a projection
    read = []
    real = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        read.append(kwargs.get("columns"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)

    def run(given: str, name: str) -> dict:
        return evaluate(
            EvaluateConfig(
                str(tmp_path / "pred.parquet"),
                truth=given,
                key="id",
                truth_column="memorability",
                group_by=("category",),
                report=str(tmp_path / name),
            )
        )

    from_hub = run(str(hub), "report-hub")
    assert read and all(columns is not None and "image" not in columns for columns in read[1:])
    from_csv = run(str(tmp_path / "truth.csv"), "report-csv")
    assert from_hub["overall"]["n"] == from_csv["overall"]["n"] == 24
    assert from_hub["overall"]["spearman"] == pytest.approx(from_csv["overall"]["spearman"])
    groups = from_csv["groups"]["category"]
    assert set(from_hub["groups"]["category"]) == set(groups) == {"warm", "cool"}
    for name, figures in groups.items():
        hub_figures = from_hub["groups"]["category"][name]
        assert hub_figures["n"] == figures["n"]
        assert hub_figures["spearman"] == pytest.approx(figures["spearman"])

    # without the key the table is read as images inside Parquet: one line names the key
    with pytest.raises(MemscoreError) as caught:
        evaluate(
            EvaluateConfig(
                str(tmp_path / "pred.parquet"),
                truth=str(hub),
                key="nope",
                truth_column="memorability",
                report=str(tmp_path / "r3"),
            )
        )
    assert "'nope'" in str(caught.value) and "\n" not in str(caught.value)


def test_driver_rows_of_img2dataset_output_have_no_image_and_are_keyed_by_file_and_row(
    tmp_path, example_images
):
    photos = [(p.name, p.read_bytes()) for p in example_images]
    write_img2dataset(tmp_path / "i2d", [photos[:2], photos[2:]])
    source = open_manifest(str(tmp_path / "i2d"))  # as finetune and train-sae open it
    assert source.images_in_place and "jpg" not in source.columns_in_driver
    rows = pa.concat_tables(source.read_all())
    assert rows.column_names == list(source.columns_in_driver)
    assert rows.num_rows == len(photos)
    n = len(photos)
    assert source.row_ids(n).to_pylist() == [0, 1] + [(1 << 32) + i for i in range(n - 2)]


# --------------------------------------------------------------------------------- finetune
@pytest.mark.slow
def test_finetune_on_a_hub_dataset_reads_its_images_in_place(tmp_path, ray_local):
    labels = write_tint_dataset(tmp_path / "tint", 40)
    hub = write_hub_labels(tmp_path / "hub", labels, split=True)
    summary = finetune(
        FinetuneConfig(
            str(hub),
            output=str(tmp_path / "runs"),
            label_column="memorability",
            split_column="split",
            name="hub",
            model="memnet",
            epochs=1,
            rows_per_block=16,
            decode_batch_size=16,
        )
    )
    expected = {s: sum(_split(n) == s for n in range(40)) for s in ("train", "validation", "test")}
    assert summary["rows_per_split"] == expected and summary["rows_in"] == 40
    assert summary["rows_trained"] == expected["train"] and summary["epochs_run"] == 1
    assert summary["rows_with_image_errors"] == {"train": 0, "validation": 0}
    run = tmp_path / "runs" / "hub"
    # the split files hold the rows without images; ids are file << 32 | row
    train = pq.read_table(run / "splits" / "train.parquet")
    assert "image" not in train.column_names
    ids = set(train.column(ROW).to_pylist())
    assert ids == {(n // 20 << 32) + n % 20 for n in range(40) if _split(n) == "train"}
    # the test split's images were copied once, and scored by the best checkpoint
    copied = pq.read_table(run / "splits" / "test_images")
    assert copied.column_names == [LABELLED_ROW, "image"] and copied.num_rows == expected["test"]
    scores = pq.read_table(list((run / "test_scores").glob("*.parquet")))
    assert scores.num_rows == expected["test"]
    assert pc.all(pc.is_null(scores.column("memscore_error"))).as_py()
    assert summary["test"]["metrics"]["overall"]["n"] == expected["test"]


# -------------------------------------------------------------------------------- train-sae
@pytest.mark.slow
def test_train_sae_on_a_hub_dataset_gives_the_path_manifests_representations(tmp_path, ray_local):
    labels = write_tint_dataset(tmp_path / "tint", 10)
    hub = write_hub_labels(tmp_path / "hub", labels)
    encoder = make_encoder_folder("clip", tmp_path / "clip", seed=2)
    settings = dict(
        encoder="clip",
        weights=str(encoder),
        epochs=2,
        batch_size=2,
        rows_per_block=4,
        decode_batch_size=4,
        output=str(tmp_path / "runs"),
    )
    in_place = train_sae(TrainSAEConfig(str(hub), name="hub", **settings))
    by_path = train_sae(TrainSAEConfig(str(labels), name="paths", **settings))
    assert in_place["rows_trained"] == by_path["rows_trained"] == 10
    assert in_place["representation_dim"] == by_path["representation_dim"]

    def vectors(name: str) -> dict[int, np.ndarray]:
        table = pq.read_table(tmp_path / "runs" / name / "representations")
        assert pc.all(pc.is_null(table.column(ERROR))).as_py()
        return {
            row: np.asarray(v)
            for row, v in zip(
                table.column(ROW).to_pylist(), table.column(REPRESENTATION).to_pylist()
            )
        }

    hub_vectors, path_vectors = vectors("hub"), vectors("paths")
    # row n of the CSV is row n % 5 of file n // 5
    for n in range(10):
        np.testing.assert_allclose(
            hub_vectors[(n // 5 << 32) + n % 5], path_vectors[n], rtol=1e-5, atol=1e-6
        )
    images = pq.read_table(tmp_path / "runs" / "hub" / "images.parquet")
    assert images.column_names == [ROW] and images.num_rows == 10
