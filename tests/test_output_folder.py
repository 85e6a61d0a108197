"""--output never destroys what memscore did not write (issue: `--overwrite` deleted the photos).

Each case runs the real command line on real folders (or the real S3 endpoint) and checks,
afterwards, that every input file is still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from memscore import cli
from memscore.sinks.folder import prepare_output


def _fingerprint(folder) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256): what must survive."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_line_error(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("memscore: error: "), err
    return err


@pytest.fixture
def photos(tmp_path, example_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in example_images:
        shutil.copy(image, folder / image.name)
    (folder / "notes.txt").write_text("the user's own notes\n")
    return folder


def test_output_that_is_the_input_folder_is_refused_and_the_photos_survive(photos, capsys):
    before = _fingerprint(photos)
    err = _one_line_error(capsys, "score", str(photos), "--output", str(photos), "--overwrite")
    assert "is the input" in err
    assert _fingerprint(photos) == before


def test_output_inside_or_around_the_input_is_refused(photos, tmp_path, capsys, monkeypatch):
    before = _fingerprint(photos)
    inside = _one_line_error(
        capsys, "score", str(photos), "--output", str(photos / "scores"), "--overwrite"
    )
    assert "lies inside the input" in inside
    around = _one_line_error(capsys, "score", str(photos), "--output", str(tmp_path), "--overwrite")
    assert "contains the input" in around
    # the same with relative paths, as a user types them
    monkeypatch.chdir(tmp_path)
    relative = _one_line_error(capsys, "score", "photos/", "--output", "photos/", "--overwrite")
    assert f"--output {photos} is the input {photos}" in relative
    assert _fingerprint(photos) == before and not (photos / "scores").exists()


def test_output_folder_holding_the_manifest_file_is_refused(tmp_path, example_images, capsys):
    data = tmp_path / "data"
    data.mkdir()
    manifest = data / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in example_images))
    before = _fingerprint(data)
    err = _one_line_error(capsys, "score", str(manifest), "--output", str(data), "--overwrite")
    assert f"contains the input {manifest}" in err
    assert _fingerprint(data) == before


def test_overwrite_refuses_a_folder_with_a_file_memscore_did_not_write(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_memscore.json").write_text("{}")
    (out / "memscore-part_0a1b_000000-0.parquet").write_bytes(b"PAR1")
    (out / "notes.txt").write_text("mine")
    before = _fingerprint(out)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nx.jpg\n")
    err = _one_line_error(capsys, "score", str(manifest), "--output", str(out), "--overwrite")
    assert "memscore did not write (e.g. notes.txt)" in err
    assert _fingerprint(out) == before  # not even memscore's own files went


def test_overwrite_removes_memscores_own_files_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    (out / "_memscore" / "checkpoint").mkdir(parents=True)
    (out / "_memscore" / "checkpoint" / "ids.parquet").write_bytes(b"PAR1")
    (out / "_memscore.json").write_text("{}")
    (out / "memscore-part_0a1b_000000-0.parquet").write_bytes(b"PAR1")
    (out / "memscore-part_0a1b_000001-0.parquet").write_bytes(b"PAR1")
    assert prepare_output(str(out), overwrite=True, resume=False, storage_options={}) == "fresh"
    assert list(out.iterdir()) == []
    # A user's Parquet file is not memscore's, whatever its name looks like.
    (out / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(Exception, match="did not write"):
        prepare_output(str(out), overwrite=True, resume=False, storage_options={})
    assert (out / "part-0.parquet").read_bytes() == b"PAR1"


def test_bucket_root_output_is_refused_and_the_bucket_survives(s3_endpoint, tmp_path, capsys):
    bucket = s3_endpoint.make_bucket("keep")
    s3_endpoint.fs.pipe_file(f"{bucket}/precious.jpg", b"not to be deleted")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nx.jpg\n")
    for output in (f"s3://{bucket}", f"s3://{bucket}/"):
        err = _one_line_error(capsys, "score", str(manifest), "--output", output, "--overwrite")
        assert "is a bucket root" in err
    s3_endpoint.fs.invalidate_cache()
    assert s3_endpoint.fs.cat_file(f"{bucket}/precious.jpg") == b"not to be deleted"


def test_s3_output_inside_the_s3_input_folder_is_refused(s3_endpoint, capsys):
    bucket = s3_endpoint.make_bucket("photos")
    s3_endpoint.fs.pipe_file(f"{bucket}/photos/a.jpg", b"x")
    err = _one_line_error(
        capsys,
        "score",
        f"s3://{bucket}/photos/",
        "--output",
        f"s3://{bucket}/photos/scores/",
        "--overwrite",
    )
    assert "lies inside the input" in err
    s3_endpoint.fs.invalidate_cache()
    assert s3_endpoint.fs.cat_file(f"{bucket}/photos/a.jpg") == b"x"
