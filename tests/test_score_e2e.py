"""The scoring job end to end on a real local Ray: every manifest format, bad images, bad manifests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import badimages
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from PIL import Image

import memscore
from memscore import cli

# What memscore appends to the manifest's columns, in order.
ADDED = [
    "memscore_row",
    "memorability",
    "memscore_error",
    "memscore_model",
    "memscore_width",
    "memscore_height",
]


def metadata_table(paths: list[str], *, with_list: bool = True) -> pa.Table:
    """Manifest rows with metadata columns of several types, nulls included."""
    n = len(paths)
    columns = {
        "path": pa.array(paths, pa.string()),
        "id": pa.array(range(n), pa.int64()),
        "rating": pa.array([0.5 + i for i in range(n - 1)] + [None], pa.float64()),
        "caption": pa.array([f"photo {i}: café ☕ 東京" for i in range(n)], pa.string()),
        "count": pa.array([None] + list(range(1, n)), pa.int64()),
    }
    if with_list:
        columns["tags"] = pa.array(
            [[f"t{i}", "x"] if i % 2 else [] for i in range(n)], pa.list_(pa.string())
        )
    return pa.table(columns)


def run(manifest, output, **kwargs) -> dict:
    return memscore.score(
        memscore.ScoreConfig(manifest=str(manifest), output=str(output), **kwargs)
    )


def read_output(output) -> pa.Table:
    table = pq.read_table(str(output))
    return table.sort_by("id") if "id" in table.column_names else table


def check_scores(table: pa.Table, reference_scores: dict[str, float]) -> None:
    assert table.column("memscore_error").null_count == table.num_rows, table.column(
        "memscore_error"
    ).to_pylist()
    for path, score in zip(
        table.column("path").to_pylist(), table.column("memorability").to_pylist()
    ):
        expected = reference_scores[path.rsplit("/", 1)[-1]]
        assert abs(score - expected) <= 1e-5, (path, score, expected)
    assert set(table.column("memscore_model").to_pylist()) == {"resmem"}
    assert table.schema.field("memorability").type == pa.float32()


def test_folder_of_images(ray_local, tmp_path, example_images, reference_scores):
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    for i, image in enumerate(example_images):
        shutil.copy(image, (folder / "nested" if i % 2 else folder) / image.name)
    (folder / "notes.txt").write_text("not an image, not listed")
    secret = tmp_path / "elsewhere" / "private.png"
    secret.parent.mkdir()
    shutil.copy(example_images[0], secret)
    (folder / "link.png").symlink_to(secret)  # a link out of the scanned folder
    summary = run(folder, tmp_path / "out")
    table = pq.read_table(tmp_path / "out").sort_by("memscore_row")
    assert table.column_names == ["path"] + ADDED
    assert table.num_rows == len(example_images) + 1
    link = table.filter(pc.equal(table.column("path"), str(folder / "link.png")))
    assert link.column("memscore_error")[0].as_py().startswith("outside input folder:")
    assert link.column("memorability")[0].as_py() is None
    check_scores(table.filter(pc.is_null(table.column("memscore_error"))), reference_scores)
    assert summary["rows_in"] == summary["rows_out"] == len(example_images) + 1
    assert summary["rows_scored"] == len(example_images)
    on_disk = json.loads((tmp_path / "out" / "_memscore.json").read_text())
    assert on_disk["rows_out"] == len(example_images) + 1
    assert on_disk["error_kinds"] == {"outside input folder": 1}
    assert len(on_disk["models"][0]["weights_sha256"]) == 64
    assert on_disk["versions"]["ray"] and on_disk["versions"]["torch"]
    assert on_disk["images_per_s"] > 0


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_manifest_formats_keep_every_column_and_type(
    fmt, ray_local, tmp_path, example_images, reference_scores
):
    # Relative paths, resolved against the manifest's folder.
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for image in example_images:
        shutil.copy(image, images / image.name)
    original = metadata_table([f"images/{p.name}" for p in example_images], with_list=fmt != "csv")
    manifest = tmp_path / "data" / f"manifest.{fmt}"
    if fmt == "csv":
        pacsv.write_csv(original, manifest)
        expected = pacsv.read_csv(manifest)  # what the user's CSV means to Arrow
    elif fmt == "parquet":
        pq.write_table(original, manifest)
        expected = original
    else:
        manifest.write_text(
            "\n".join(json.dumps(row, ensure_ascii=False) for row in original.to_pylist()) + "\n",
            encoding="utf-8",
        )
        expected = pajson.read_json(manifest)
    summary = run(manifest, tmp_path / "out")
    table = read_output(tmp_path / "out")
    assert table.num_rows == original.num_rows == summary["rows_out"]
    assert table.column_names == expected.column_names + ADDED
    meta = table.select(expected.column_names)
    assert meta.schema == expected.schema
    assert meta.equals(expected.sort_by("id"))
    check_scores(table, reference_scores)
    sizes = [
        Image.open(images / p.rsplit("/", 1)[-1]).size for p in table.column("path").to_pylist()
    ]
    assert table.column("memscore_width").to_pylist() == [w for w, _ in sizes]
    assert table.column("memscore_height").to_pylist() == [h for _, h in sizes]


def _img2dataset_metadata(paths: list[str]) -> pa.Table:
    """The columns img2dataset writes beside each image (its parquet output), plus the path."""
    n = len(paths)
    return pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "url": [f"https://example.org/{i}.jpg" for i in range(n)],
            "caption": [f"a photo, number {i}" for i in range(n)],
            "status": ["success"] * n,
            "error_message": pa.array([None] * n, pa.string()),
            "width": pa.array([256] * n, pa.int64()),
            "height": pa.array([256] * n, pa.int64()),
            "original_width": pa.array([512 + i for i in range(n)], pa.int64()),
            "original_height": pa.array([384 + i for i in range(n)], pa.int64()),
            "exif": [json.dumps({"Image Orientation": "Horizontal (normal)"})] * n,
            "sha256": [f"{i:064x}" for i in range(n)],
            "path": paths,
        }
    )


def _laion_metadata(paths: list[str]) -> pa.Table:
    n = len(paths)
    return pa.table(
        {
            "URL": [f"https://example.org/{i}.jpg" for i in range(n)],
            "TEXT": [f"caption {i}" for i in range(n)],
            "WIDTH": pa.array([640.0] * n),
            "HEIGHT": pa.array([480.0] * n),
            "similarity": pa.array([0.31] * n),
            "punsafe": pa.array([0.01] * n),
            "pwatermark": pa.array([0.2] * n),
            "path": paths,
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("make", [_img2dataset_metadata, _laion_metadata])
def test_real_dataset_metadata_scores_with_no_option_and_comes_back_unchanged(
    make, ray_local, tmp_path, example_images, reference_scores
):
    original = make([str(p) for p in example_images])
    manifest = tmp_path / "metadata.parquet"
    pq.write_table(original, manifest)
    summary = run(manifest, tmp_path / "out")
    table = pq.read_table(tmp_path / "out").sort_by("memscore_row")
    assert summary["rows_out"] == original.num_rows
    assert table.column_names == original.column_names + ADDED
    assert table.select(original.column_names).equals(original)  # every column, every value
    check_scores(table, reference_scores)


@pytest.mark.slow
def test_a_ground_truth_memorability_column_is_scored_with_a_column_prefix(
    ray_local, tmp_path, example_images, reference_scores, capsys
):
    labels = tmp_path / "labels.csv"
    truth = [0.61, 0.84, 0.72, 0.55, 0.93, 0.68][: len(example_images)]
    labels.write_text(
        "path,memorability\n" + "".join(f"{p},{t}\n" for p, t in zip(example_images, truth))
    )
    assert cli.main(["score", str(labels), "--output", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "'memorability' would be overwritten" in err and "--column-prefix pred_" in err
    assert (
        cli.main(
            ["score", str(labels), "--output", str(tmp_path / "out"), "--column-prefix", "pred_"]
        )
        == 0
    )
    table = pq.read_table(tmp_path / "out").sort_by("memscore_row")
    assert table.column_names == [
        "path",
        "memorability",
        "memscore_row",
        "pred_memorability",
        *ADDED[2:],
    ]
    assert table.column("memorability").to_pylist() == truth  # the labels, untouched
    scored = table.drop_columns(["memorability"]).rename_columns(
        ["path", "memscore_row", "memorability", *ADDED[2:]]
    )
    check_scores(scored, reference_scores)
    summary = json.loads((tmp_path / "out" / "_memscore.json").read_text())
    assert summary["models"][0]["output_column"] == "pred_memorability"
    # and evaluate reads the prefixed column against the labels
    assert (
        cli.main(
            [
                "evaluate",
                str(tmp_path / "out"),
                "--truth",
                str(labels),
                "--truth-column",
                "memorability",
                "--prediction-column",
                "pred_memorability",
                "--report",
                str(tmp_path / "report"),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["counts"]["evaluated"] == len(example_images)


def test_bad_images_become_error_rows_and_good_ones_are_scored(
    ray_local, tmp_path, example_images, reference_scores
):
    bad = badimages.write_all(tmp_path / "bad")
    missing = str(tmp_path / "bad" / "does-not-exist.jpg")
    rows = [str(p) for p in example_images] + [str(p) for p in bad.values()] + [missing]
    kinds = (
        [None] * len(example_images)
        + list(badimages.EXPECTED_KIND[k] for k in bad)
        + ["missing file"]
    )
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": rows, "id": list(range(len(rows)))}), manifest)
    summary = run(manifest, tmp_path / "out", decode_batch_size=7, batch_size=4)
    table = read_output(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(len(rows)))  # none lost, none doubled
    for path, kind, error, score in zip(
        rows,
        kinds,
        table.column("memscore_error").to_pylist(),
        table.column("memorability").to_pylist(),
    ):
        if kind is None:
            assert error is None and 0 < score < 1, (path, error)
        else:
            assert error is not None and error.startswith(kind + ":"), (path, kind, error)
            assert score is None
    assert summary["rows_with_errors"] == sum(k is not None for k in kinds)
    assert summary["rows_scored"] == sum(k is None for k in kinds)
    assert set(summary["error_kinds"]) == {k for k in kinds if k}
    good = table.filter(pc.is_in(table.column("id"), pa.array(range(len(example_images)))))
    check_scores(good, reference_scores)


def test_limit_and_overwrite(ray_local, tmp_path, example_images):
    manifest = tmp_path / "m.parquet"
    pq.write_table(metadata_table([str(p) for p in example_images]), manifest)
    out = tmp_path / "out"
    assert run(manifest, out, limit=2)["rows_out"] == 2
    assert read_output(out).column("id").to_pylist() == [0, 1]  # the first rows, not any rows
    with pytest.raises(memscore.MemscoreError, match="not empty"):
        run(manifest, out, limit=3)
    assert run(manifest, out, limit=3, overwrite=True)["rows_out"] == 3
    assert read_output(out).column("id").to_pylist() == [0, 1, 2]


def _cli_error(capsys, *argv) -> str:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("memscore: error: ")
    return err


def test_bad_manifests_stop_with_one_line(tmp_path, capsys, example_images):
    out = str(tmp_path / "out")
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,id\na.jpg,1\n")
    assert "no column 'path'" in _cli_error(capsys, "score", str(no_path), "--output", out)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("path,id\n")
    assert "no rows" in _cli_error(capsys, "score", str(header_only), "--output", out)
    zero = tmp_path / "zero.jsonl"
    zero.write_text("")
    assert "no rows" in _cli_error(capsys, "score", str(zero), "--output", out)
    empty_pq = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), empty_pq)
    assert "no rows" in _cli_error(capsys, "score", str(empty_pq), "--output", out)
    for reserved in ("memorability", "memscore_error", "memscore_width", "memscore_future"):
        clash = tmp_path / f"clash_{reserved}.csv"
        clash.write_text(f"path,{reserved}\n{example_images[0]},1\n")
        assert f"'{reserved}' would be overwritten" in _cli_error(
            capsys, "score", str(clash), "--output", out
        )
    assert "no such file" in _cli_error(
        capsys, "score", str(tmp_path / "nope.csv"), "--output", out
    )
    odd = tmp_path / "manifest.xlsx"
    odd.write_text("x")
    assert "not a manifest" in _cli_error(capsys, "score", str(odd), "--output", out)
    assert "matches no file" in _cli_error(
        capsys, "score", str(tmp_path / "*.nothing"), "--output", out
    )
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    assert "no image files" in _cli_error(capsys, "score", str(empty_dir), "--output", out)
    assert "unknown model" in _cli_error(
        capsys, "score", str(no_path), "--output", out, "--model", "memnet9000"
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    good = tmp_path / "good.csv"
    good.write_text(f"path\n{example_images[0]}\n")
    assert "not empty" in _cli_error(capsys, "score", str(good), "--output", str(busy))


def test_cli_subprocess_exit_code_and_message(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file\nx.jpg\n")
    result = subprocess.run(
        [sys.executable, "-m", "memscore.cli", "score", str(bad), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"memscore: error: {bad}: no column 'path' (columns: file); name the image column with "
        f"--path-column"
    ]


def test_models_command_lists_weights_and_licence(capsys):
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert "resmem" in text and "RETRAIN" in text and "non-commercial" in text
    assert "column=memorability" in text


def _run_on_a_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with a 160-column pseudo-terminal as stdin, stdout and stderr, as a user's
    shell would; return its exit code and everything it drew."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    leader, follower = pty.openpty()
    # A fresh pty is 0 columns wide, and tqdm draws nothing in no columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    drawn = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not chunk:
                    break
                drawn += chunk
            elif proc.poll() is not None:  # exited, and nothing else is writing
                break
        else:
            proc.kill()
        code = proc.wait(timeout=30)
    finally:
        os.close(leader)
    return code, drawn.decode("utf-8", errors="replace")


@pytest.mark.slow
def test_score_on_a_terminal_draws_ray_progress_bars(tmp_path, example_images):
    """Ray Data's progress bars stay on: on a terminal, the model stage's bar counts the rows."""
    import re

    code, drawn = _run_on_a_terminal(
        [
            sys.executable,
            "-m",
            "memscore.cli",
            "score",
            str(example_images[0].parent),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, drawn[-3000:]
    assert "tqdm is not installed" not in drawn
    # e.g. "- MapBatches(ScoreImages): Tasks: 0; ... 100%|█████| 5.00/5.00 [00:21<00:00, ...]"
    bars = re.findall(r"MapBatches\(ScoreImages\)[^\r\n]*?(\d+)%\|", drawn)
    assert bars and bars[-1] == "100", drawn[-3000:]
    n = len(example_images)
    assert f"memscore: {n} rows, {n} scored, 0 errors" in drawn
