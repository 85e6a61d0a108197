"""End to end through a real S3 endpoint (moto_server on loopback): manifests, images, output.

Every test asks for ``s3_endpoint`` before ``ray_local``, so that when this module starts the
session's Ray, its workers inherit the AWS_* variables the endpoint fixture set. Ray started earlier
by another module cannot get them afterwards; ``ray_env`` checks what the workers really see, and
the in-process tests that rely on the environment alone are skipped in that case (the CLI
subprocess test, with its own fresh Ray, always covers that path).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from s3server import TEST_ACCESS_KEY, TEST_SECRET

import memscore
from memscore import cli

ROOT = Path(__file__).resolve().parent.parent
# What memscore appends to the manifest's columns, in order.
ADDED = [
    "memscore_row",
    "memorability",
    "memscore_error",
    "memscore_model",
    "memscore_width",
    "memscore_height",
]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def ray_env(s3_endpoint, ray_local):
    """True when the Ray workers see the endpoint's AWS_* environment (Ray started after it)."""
    import ray

    @ray.remote(num_cpus=0)
    def worker_env():
        return os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID")

    return ray.get(worker_env.remote()) == (s3_endpoint.url, TEST_ACCESS_KEY)


@pytest.fixture(scope="module")
def s3_images(s3_endpoint, example_images):
    """A bucket with the five example images under images/; -> (bucket, [s3 urls])."""
    bucket = s3_endpoint.make_bucket("images")
    urls = []
    for path in example_images:
        key = f"{bucket}/images/{path.name}"
        s3_endpoint.fs.put_file(str(path), key)
        urls.append(f"s3://{key}")
    return bucket, urls


def manifest_table(urls: list[str]) -> pa.Table:
    n = len(urls)
    return pa.table(
        {
            "uri": pa.array(urls, pa.string()),
            "id": pa.array(range(n), pa.int64()),
            "label": pa.array([f"café ☕ {i}" for i in range(n)], pa.string()),
            "tags": pa.array(
                [[f"t{i}", "x"] if i % 2 else [] for i in range(n)], pa.list_(pa.string())
            ),
            "score_prior": pa.array([0.25 * i for i in range(n - 1)] + [None], pa.float64()),
        }
    )


def put_parquet(fs, key: str, table: pa.Table) -> None:
    with fs.open(key, "wb") as f:
        pq.write_table(table, f)


def read_s3_output(fs, folder: str) -> pa.Table:
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    assert files, f"no Parquet under s3://{folder}"
    tables = []
    for key in files:
        with fs.open(key, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).sort_by("id")


def read_s3_summary(fs, folder: str) -> dict:
    key = f"{folder.rstrip('/')}/_memscore.json"
    assert fs.exists(key), f"no s3://{key}"
    return json.loads(fs.cat_file(key))


def check_scores(table: pa.Table, reference_scores: dict[str, float], path_column: str) -> None:
    assert table.column("memscore_error").null_count == table.num_rows, table.column(
        "memscore_error"
    ).to_pylist()
    for path, value in zip(
        table.column(path_column).to_pylist(), table.column("memorability").to_pylist()
    ):
        expected = reference_scores[path.rsplit("/", 1)[-1]]
        assert value is not None and abs(value - expected) <= 1e-5, (path, value, expected)


def assert_no_secret_in_s3(fs, folder: str) -> None:
    fs.invalidate_cache()
    keys = fs.find(folder)
    assert any(k.endswith("_memscore.json") for k in keys)
    for key in keys:
        assert TEST_SECRET.encode() not in fs.cat_file(key), f"secret in s3://{key}"


def assert_no_secret_in_dir(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "_memscore.json" for p in files)
    for path in files:
        assert TEST_SECRET.encode() not in path.read_bytes(), f"secret in {path}"


# -------------------------------------------------------------------------------------- tests
def test_parquet_manifest_on_s3_to_s3(s3_endpoint, ray_local, ray_env, s3_images, reference_scores):
    fs = s3_endpoint.fs
    _, urls = s3_images
    bucket = s3_endpoint.make_bucket()
    original = manifest_table(urls)
    put_parquet(fs, f"{bucket}/manifest.parquet", original)
    options = {"endpoint_url": s3_endpoint.url}
    if not ray_env:  # Ray started before the endpoint existed: its workers lack the AWS_* env
        options.update(key=TEST_ACCESS_KEY, secret=TEST_SECRET)

    summary = memscore.score(
        memscore.ScoreConfig(
            manifest=f"s3://{bucket}/manifest.parquet",
            output=f"s3://{bucket}/scores/",
            path_column="uri",
            storage_options=options,
        )
    )

    table = read_s3_output(fs, f"{bucket}/scores")
    assert table.num_rows == original.num_rows
    assert table.column_names == original.column_names + ADDED
    assert table.select(original.column_names).schema == original.schema
    assert table.select(original.column_names).equals(original.sort_by("id"))
    check_scores(table, reference_scores, "uri")
    assert table.column("memscore_error").null_count == 5
    assert set(table.column("memscore_model").to_pylist()) == {"resmem"}

    written = read_s3_summary(fs, f"{bucket}/scores")
    assert written["rows_in"] == written["rows_out"] == 5
    assert written["rows_scored"] == 5 and written["rows_with_errors"] == 0
    assert written["status"] == "complete"
    assert summary["rows_out"] == 5
    assert_no_secret_in_s3(fs, f"{bucket}/scores")


def test_local_csv_with_s3_urls_env_only(
    s3_endpoint, ray_local, ray_env, s3_images, tmp_path, reference_scores
):
    """No storage options at all: the driver and the Ray workers find S3 through AWS_* alone."""
    if not ray_env:
        pytest.skip(
            "Ray was started before the S3 endpoint: its workers lack the AWS_* env "
            "(covered by test_cli_subprocess_env_only)"
        )
    _, urls = s3_images
    manifest = tmp_path / "manifest.csv"
    pacsv.write_csv(pa.table({"uri": urls, "id": list(range(len(urls)))}), manifest)
    output = tmp_path / "out"

    summary = memscore.score(
        memscore.ScoreConfig(manifest=str(manifest), output=str(output), path_column="uri")
    )

    table = pq.read_table(output).sort_by("id")
    assert table.num_rows == 5 and table.column("uri").to_pylist() == urls
    check_scores(table, reference_scores, "uri")
    written = json.loads((output / "_memscore.json").read_text())
    assert written["rows_in"] == written["rows_out"] == summary["rows_out"] == 5
    assert_no_secret_in_dir(output)


def test_s3_csv_relative_paths_and_a_missing_image(
    s3_endpoint, ray_local, example_images, reference_scores
):
    """Relative paths resolve against the manifest's S3 folder; an s3:// image that does not
    exist is that row's "missing file" error while the others are scored. Credentials are given
    as storage options here, so they must be redacted from the summary."""
    fs = s3_endpoint.fs
    bucket = s3_endpoint.make_bucket()
    paths = []
    for path in example_images:
        fs.put_file(str(path), f"{bucket}/data/pics/{path.name}")
        paths.append(f"pics/{path.name}")
    missing = f"s3://{bucket}/data/pics/not-there.png"
    paths.insert(2, missing)
    body = io.BytesIO()
    pacsv.write_csv(pa.table({"path": paths, "id": list(range(len(paths)))}), body)
    fs.pipe_file(f"{bucket}/data/manifest.csv", body.getvalue())
    options = {"endpoint_url": s3_endpoint.url, "key": TEST_ACCESS_KEY, "secret": TEST_SECRET}

    summary = memscore.score(
        memscore.ScoreConfig(
            manifest=f"s3://{bucket}/data/manifest.csv",
            output=f"s3://{bucket}/out/",
            storage_options=options,
        )
    )

    table = read_s3_output(fs, f"{bucket}/out")
    assert table.column("path").to_pylist() == paths  # the manifest's values, not resolved URLs
    errors = table.column("memscore_error").to_pylist()
    assert errors[2] is not None and errors[2].startswith("missing file"), errors
    assert missing in errors[2]
    assert table.column("memorability")[2].as_py() is None
    assert [e for i, e in enumerate(errors) if i != 2] == [None] * 5
    check_scores(table.filter(pc.is_null(table.column("memscore_error"))), reference_scores, "path")
    written = read_s3_summary(fs, f"{bucket}/out")
    assert written["rows_in"] == written["rows_out"] == summary["rows_out"] == 6
    assert written["rows_scored"] == 5 and written["rows_with_errors"] == 1
    assert written["error_kinds"] == {"missing file": 1}
    assert written["config"]["storage_options"]["secret"] == "***"
    assert written["config"]["storage_options"]["endpoint_url"] == s3_endpoint.url
    assert_no_secret_in_s3(fs, f"{bucket}/out")


def test_cli_subprocess_env_only(s3_endpoint, s3_images, reference_scores, tmp_path):
    """A fresh driver with its own local Ray, the endpoint and credentials only in AWS_* vars."""
    fs = s3_endpoint.fs
    _, urls = s3_images
    bucket = s3_endpoint.make_bucket()
    put_parquet(fs, f"{bucket}/manifest.parquet", manifest_table(urls))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(s3_endpoint.env, RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memscore.cli",
            "score",
            f"s3://{bucket}/manifest.parquet",
            "--output",
            f"s3://{bucket}/out2/",
            "--path-column",
            "uri",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("memscore: 5 rows"), proc.stdout[-2000:]
    assert TEST_SECRET not in proc.stdout and TEST_SECRET not in proc.stderr
    table = read_s3_output(fs, f"{bucket}/out2")
    assert table.num_rows == 5
    check_scores(table, reference_scores, "uri")
    assert read_s3_summary(fs, f"{bucket}/out2")["rows_out"] == 5
    assert_no_secret_in_s3(fs, f"{bucket}/out2")


# ---------------------------------------------------------------------------- errors up front
@pytest.fixture
def no_scoring(monkeypatch):
    """Fail the test if the run gets as far as building the Ray pipeline."""
    import memscore.scoring.job

    def refuse(*args, **kwargs):
        raise AssertionError("scoring started; the error should have been raised before")

    monkeypatch.setattr(memscore.scoring.job, "build_dataset", refuse)
    monkeypatch.setattr(memscore.scoring.job, "init_ray", refuse)


def test_output_bucket_missing_fails_before_scoring(s3_endpoint, s3_images, no_scoring, capsys):
    fs = s3_endpoint.fs
    _, urls = s3_images
    bucket = s3_endpoint.make_bucket()
    put_parquet(fs, f"{bucket}/manifest.parquet", manifest_table(urls))
    output = "s3://memscore-no-such-bucket-0d9e/scores/"
    options = {"endpoint_url": s3_endpoint.url}

    with pytest.raises(memscore.MemscoreError, match="no-such-bucket"):
        memscore.score(
            memscore.ScoreConfig(
                manifest=f"s3://{bucket}/manifest.parquet",
                output=output,
                path_column="uri",
                storage_options=options,
            )
        )

    code = cli.main(
        ["score", f"s3://{bucket}/manifest.parquet", "--output", output, "--path-column", "uri"]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memscore: error:"), captured.err
    assert TEST_SECRET not in captured.err


def test_manifest_missing_fails_before_scoring(s3_endpoint, no_scoring):
    bucket = s3_endpoint.make_bucket()
    absent = (f"s3://{bucket}/nope.parquet", "s3://memscore-absent-manifest-bucket-7c21/m.csv")
    for manifest in absent:
        with pytest.raises(memscore.MemscoreError, match="no such file"):
            memscore.score(
                memscore.ScoreConfig(
                    manifest=manifest,
                    output=f"s3://{bucket}/out/",
                    path_column="uri",
                    storage_options={"endpoint_url": s3_endpoint.url},
                )
            )
    assert not s3_endpoint.fs.exists(f"{bucket}/out")


def test_finetune_reads_and_writes_s3_and_its_checkpoint_scores_from_s3(
    s3_endpoint, ray_local, tmp_path
):
    """Labelled images on S3 -> Ray Train with its storage on S3 -> score with s3://.../best."""
    from synthetic import write_tint_dataset

    from memscore.finetuning.job import LABELLED_ROW, ROW, finetune
    from memscore.models.checkpoint import read_checkpoint_info

    fs = s3_endpoint.fs
    bucket = s3_endpoint.make_bucket()
    manifest = write_tint_dataset(tmp_path, 24, seed=3)
    fs.put(str(tmp_path / "images"), f"{bucket}/data/images", recursive=True)
    fs.put_file(str(manifest), f"{bucket}/data/labels.csv")
    options = {"endpoint_url": s3_endpoint.url, "key": TEST_ACCESS_KEY, "secret": TEST_SECRET}

    summary = finetune(
        memscore.FinetuneConfig(
            f"s3://{bucket}/data/labels.csv",
            output=f"s3://{bucket}/runs",
            name="s3",
            model="memnet",
            epochs=2,
            batch_size=8,
            optimizer="adamw",
            split_fractions="0.6,0.4,0",
            rows_per_block=8,
            storage_options=options,
        )
    )
    assert summary["epochs_run"] == 2 and summary["rows_in"] == 24
    run = f"{bucket}/runs/s3"
    assert fs.exists(f"{run}/best/model.safetensors") and fs.exists(f"{run}/finetune.json")
    assert any("checkpoint_" in p for p in fs.ls(f"{run}/ray_train"))  # Ray Train's own storage
    assert read_checkpoint_info(f"s3://{run}/best", options)["model"] == "memnet"
    fs.invalidate_cache()
    for key in fs.find(run):  # the run's files, Ray Train's included, never hold the secret
        assert TEST_SECRET.encode() not in fs.cat_file(key), f"secret in s3://{key}"

    scored = memscore.score(
        memscore.ScoreConfig(
            f"s3://{run}/splits/validation_images.parquet",
            output=f"s3://{bucket}/val_scores",
            models=("memnet",),
            weights=f"s3://{run}/best",
            storage_options=options,
        )
    )
    seen = pq.read_table(io.BytesIO(fs.cat_file(f"{run}/best/validation_predictions.parquet")))
    fs.invalidate_cache()
    table = pa.concat_tables(
        pq.read_table(io.BytesIO(fs.cat_file(key)))
        for key in fs.find(f"{bucket}/val_scores")
        if key.endswith(".parquet")
    )
    assert scored["rows_out"] == seen.num_rows == table.num_rows
    # the scored split carries the labelled row's id as labelled_row (scoring numbers its own
    # rows memscore_row)
    joined = seen.join(
        table.select([LABELLED_ROW, "memorability_memnet"]).rename_columns(
            [ROW, "memorability_memnet"]
        ),
        keys=ROW,
    )
    assert joined.num_rows == seen.num_rows
    assert (
        max(
            abs(a - b)
            for a, b in zip(
                joined.column("prediction").to_pylist(),
                joined.column("memorability_memnet").to_pylist(),
            )
        )
        < 1e-5
    )
