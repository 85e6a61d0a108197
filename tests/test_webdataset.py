"""The WebDataset reader (memscore.sources.webdataset): real tar shards written with tarfile from the
example images, local and on a real S3 endpoint; the bad shards of issue 16; no Ray except the
one test of the Ray Data read path (slow)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from pickle_payload import TouchesMarker

from memscore import columns
from memscore.config import MemscoreError
from memscore.sources.webdataset import (
    IMAGE,
    IMAGE_EXT,
    KEY,
    READ_ERROR_KINDS,
    URL,
    expand_braces,
    expand_shards,
    is_webdataset,
    iter_shard,
    read_shard,
    read_shards,
    sample_id,
    split_sample_id,
    unify_tables,
)

ROW, ERROR = columns.ROW, columns.ERROR


def write_tar(path: Path, members, *, mode: str = "w") -> Path:
    """A shard with ``members`` ((name, bytes) pairs) in the given order."""
    with tarfile.open(path, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(example_images, marker: Path, start: int = 0):
    """Members of one sample per example image: the image, txt, json, cls; a .pth and a .pkl
    holding the marker payload; one sample has a mask (``seg.png``) beside its image."""
    members = []
    for i, image in enumerate(example_images):
        key = f"{start + i:06d}"
        ext = image.suffix.lstrip(".")
        members.append((f"{key}.{ext}", image.read_bytes()))
        members.append((f"{key}.txt", f"café ☕ {image.stem}".encode()))
        members.append((f"{key}.json", json.dumps({"name": image.name, "i": i}).encode()))
        members.append((f"{key}.cls", str(i % 3).encode()))
        if i == 0:
            members.append((f"{key}.pth", pickle.dumps(TouchesMarker(marker))))
        if i == 1:
            members.append((f"{key}.pkl", pickle.dumps(TouchesMarker(marker))))
        if i == 2:
            members.append((f"{key}.seg.png", example_images[1].read_bytes()))
    return members


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "UNPICKLED"


@pytest.fixture
def shard(tmp_path, example_images, marker) -> Path:
    return write_tar(tmp_path / "000000.tar", sample_members(example_images, marker))


def rows(table: pa.Table) -> list[dict]:
    return table.drop_columns([IMAGE]).to_pylist()


def errors(table: pa.Table) -> list:
    return table.column(ERROR).to_pylist()


def kind(error: str | None) -> str | None:
    """The error's kind, checked to be one the reader lists (``READ_ERROR_KINDS``): every bad
    shard test below thereby checks that list."""
    if error is None:
        return None
    found = error.split(":", 1)[0]
    assert found in READ_ERROR_KINDS, f"{found!r} is missing from READ_ERROR_KINDS"
    return found


# ----------------------------------------------------------------------------- good shards
def test_one_row_per_sample(shard, example_images, marker):
    table = read_shard(str(shard), None, shard_index=3)
    assert table.num_rows == len(example_images)
    assert table.column_names == [
        KEY,
        URL,
        "cls",
        "json",
        "pkl",
        "pth",
        "seg.png",
        "txt",
        ROW,
        ERROR,
        IMAGE,
        IMAGE_EXT,
    ]
    assert table.column(KEY).to_pylist() == [f"{i:06d}" for i in range(5)]
    assert set(table.column(URL).to_pylist()) == {str(shard)}
    assert table.column(ROW).to_pylist() == [sample_id(3, i) for i in range(5)]
    assert [split_sample_id(r) for r in table.column(ROW).to_pylist()] == [(3, i) for i in range(5)]
    assert errors(table) == [None] * 5
    # the image member is handed on internally, byte for byte, and is not a member column
    assert table.column(IMAGE).to_pylist() == [p.read_bytes() for p in example_images]
    assert table.column(IMAGE_EXT).to_pylist() == [p.suffix.lstrip(".") for p in example_images]
    assert "png" not in table.column_names and "jpg" not in table.column_names
    # text members are strings, the others bytes; a member a sample lacks is null
    schema = table.schema
    assert schema.field("txt").type == pa.string() and schema.field("json").type == pa.string()
    assert schema.field("cls").type == pa.string()
    assert schema.field("pth").type == pa.binary() and schema.field("seg.png").type == pa.binary()
    first = rows(table)[0]
    assert first["txt"] == f"café ☕ {example_images[0].stem}"
    assert json.loads(first["json"])["name"] == example_images[0].name
    assert table.column("seg.png").to_pylist()[2] == example_images[1].read_bytes()
    assert table.column("seg.png").null_count == 4
    # the pickled members are their bytes: never unpickled ...
    assert not marker.exists()
    payload = table.column("pth").to_pylist()[0]
    assert payload == pickle.dumps(TouchesMarker(marker))
    # ... and the payload is real: unpickling it does write the marker
    pickle.loads(payload)
    assert marker.exists()


def test_stream_of_tables_is_the_same_rows(shard):
    whole = read_shard(str(shard), None, 1)
    pieces = list(iter_shard(str(shard), None, 1, max_table_bytes=1))
    assert len(pieces) == whole.num_rows  # a table per sample at that bound
    assert {tuple(t.column_names) for t in pieces} != {tuple(whole.column_names)}
    assert unify_tables(pieces).equals(whole)


def test_unify_tables_text_that_is_not_utf8_becomes_binary(tmp_path, example_images):
    image = example_images[-1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar",
        [("a.jpg", image), ("a.txt", b"plain"), ("b.jpg", image), ("b.txt", b"\xff\xfe latin")],
    )
    whole = read_shard(str(path))
    assert whole.schema.field("txt").type == pa.binary()
    assert whole.column("txt").to_pylist() == [b"plain", b"\xff\xfe latin"]
    first, second = iter_shard(str(path), max_table_bytes=1)
    assert first.schema.field("txt").type == pa.string()  # each table on its own ...
    assert second.schema.field("txt").type == pa.binary()
    assert unify_tables([first, second]).equals(whole)  # ... unified without loss


def test_webdataset_naming_rules(tmp_path, example_images):
    """Key = path up to the first dot of the base name; extensions lower-cased; directories,
    links, names without a dot and __meta__ files are not samples; a second image member is a
    plain column; members of ./-prefixed and nested paths group as webdataset groups them."""
    jpg, png = example_images[-1].read_bytes(), example_images[1].read_bytes()
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("__info__", b"meta")
        add("./train", kind=tarfile.DIRTYPE)
        add("./train/a.b.JPG", jpg)
        add("./train/a.b.PNG", png)
        add("./train/a.b.en.txt", b"caption")
        add("./train/a.b.link", kind=tarfile.SYMTYPE)
        add("README", b"no extension")
        add("./train/c.jpeg", jpg)
    table = read_shard(str(path))
    assert table.column(KEY).to_pylist() == ["./train/a", "./train/c"]
    # a.b.JPG is member "b.jpg" of key "./train/a": not an image extension, so that sample has
    # no image member (as webdataset would give no "jpg" key) and its members are columns
    assert [kind(e) for e in errors(table)] == ["no image", None]
    first = rows(table)[0]
    assert (first["b.jpg"], first["b.png"], first["b.en.txt"]) == (jpg, png, "caption")
    assert table.column(IMAGE_EXT).to_pylist() == [None, "jpeg"]
    assert not {"link", "b.link", "README", "__info__"} & set(table.column_names)


def test_image_member_preference(tmp_path, example_images):
    jpg, png = example_images[-1].read_bytes(), example_images[1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar",
        [
            ("a.JPG", jpg),
            ("a.png", png),
            ("a.txt", b"t"),
            ("b.png", png),
            ("b.webp", b"not read as webp"),
        ],
    )
    table = read_shard(str(path))
    assert errors(table) == [None, None]
    assert table.column(IMAGE_EXT).to_pylist() == ["jpg", "png"]  # manifest's order: jpg first
    assert table.column(IMAGE).to_pylist() == [jpg, png]
    assert table.column("png").to_pylist() == [png, None]  # the other image is a member
    assert table.column("webp").to_pylist() == [None, b"not read as webp"]


def test_gzipped_shard(tmp_path, example_images, marker):
    plain = write_tar(tmp_path / "a.tar", sample_members(example_images, marker))
    gz = write_tar(tmp_path / "a.tar.gz", sample_members(example_images, marker), mode="w:gz")
    assert (
        read_shard(str(gz)).drop_columns([URL]).equals(read_shard(str(plain)).drop_columns([URL]))
    )


# ------------------------------------------------------------------------------- bad shards
@pytest.mark.parametrize("cut", ["in_member", "at_boundary", "in_header", "before_end_block"])
def test_truncated_shard(tmp_path, shard, cut):
    """The samples before the damage are rows; the sample being read is one error row with
    the members read so far; nothing after; never a hang or a silently short shard."""
    data = shard.read_bytes()
    members = []
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # the member that starts sample 000002 and the one before it
    start = next(m for m in members if m.name.startswith("000002"))
    boundary = start.offset  # header of 000002's first member
    cuts = {
        "in_member": start.offset_data + 1000,
        "at_boundary": boundary,
        "in_header": boundary + 100,
        "before_end_block": members[-1].offset_data + (members[-1].size + 511) // 512 * 512,
    }
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: cuts[cut]])
    table = read_shard(str(path))
    whole = read_shard(str(shard))
    last = "000004" if cut == "before_end_block" else "000001" if cut != "in_member" else "000002"
    keys = table.column(KEY).to_pylist()
    assert keys[-1] == last and keys == whole.column(KEY).to_pylist()[: len(keys)]
    assert errors(table)[:-1] == [None] * (len(keys) - 1)
    assert kind(errors(table)[-1]) == "truncated shard"
    assert str(path) in errors(table)[-1]
    assert table.column(IMAGE).to_pylist()[-1] is None  # never scored
    assert table.column(ROW).to_pylist() == list(range(len(keys)))
    good = table.slice(0, len(keys) - 1)
    assert good.column(IMAGE).equals(whole.slice(0, len(keys) - 1).column(IMAGE))
    if cut == "before_end_block":  # the last sample's members were all read: kept
        assert rows(table)[-1]["txt"] == rows(whole)[-1]["txt"]


def test_garbage_header_in_the_middle(tmp_path, shard):
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        offset = next(m for m in tar.getmembers() if m.name.startswith("000003")).offset
    data[offset : offset + 512] = b"\x07" * 512
    path = tmp_path / "garbage.tar"
    path.write_bytes(bytes(data))
    table = read_shard(str(path))
    assert table.column(KEY).to_pylist() == ["000000", "000001", "000002"]
    assert [kind(e) for e in errors(table)] == [None, None, "truncated shard"]


@pytest.mark.parametrize("content", [b"", b"short", "jpeg", b"x" * 5000])
def test_not_a_tar(tmp_path, content, example_images):
    data = example_images[-1].read_bytes() if content == "jpeg" else content
    path = tmp_path / "fake.tar"
    path.write_bytes(data)
    table = read_shard(str(path), None, 2)
    assert table.num_rows == 1
    assert table.column(KEY).to_pylist() == [None]
    assert table.column(ROW).to_pylist() == [sample_id(2, 0)]
    assert kind(errors(table)[0]) == "not a tar" and str(path) in errors(table)[0]


def test_empty_shard_is_one_error_row(tmp_path):
    path = write_tar(tmp_path / "empty.tar", [])
    table = read_shard(str(path))
    assert [kind(e) for e in errors(table)] == ["empty shard"]
    only_meta = write_tar(tmp_path / "meta.tar", [("README", b"x"), ("__info__", b"y")])
    assert [kind(e) for e in errors(read_shard(str(only_meta)))] == ["empty shard"]


def test_missing_shard_is_one_error_row(tmp_path):
    table = read_shard(str(tmp_path / "gone.tar"), None, 5)
    assert [kind(e) for e in errors(table)] == ["missing shard"]
    assert table.column(ROW).to_pylist() == [sample_id(5, 0)]


def test_sample_without_image(tmp_path, example_images):
    jpg = example_images[-1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar",
        [("a.jpg", jpg), ("b.txt", b"caption of b"), ("b.json", b"{}"), ("c.jpg", jpg)],
    )
    table = read_shard(str(path))
    assert [kind(e) for e in errors(table)] == [None, "no image", None]
    assert "'b'" in errors(table)[1] and "json, txt" in errors(table)[1]
    assert rows(table)[1]["txt"] == "caption of b"  # its members are kept


def test_duplicated_key(tmp_path, example_images):
    jpg, png = example_images[-1].read_bytes(), example_images[1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", jpg),
            ("a.txt", b"first a"),
            ("b.jpg", jpg),
            ("a.jpg", png),
            ("a.txt", b"second a"),  # the same key again, later
            ("c.jpg", jpg),
            ("c.jpg", png),  # the same member twice in a row
        ],
    )
    table = read_shard(str(path))
    assert table.column(KEY).to_pylist() == ["a", "b", "a", "c", "c"]
    assert [kind(e) for e in errors(table)] == [None, None, "duplicate key", None, "duplicate key"]
    assert "sample 0" in errors(table)[2] and "sample 3" in errors(table)[4]
    assert table.column("txt").to_pylist() == ["first a", None, "second a", None, None]
    assert table.column(IMAGE).to_pylist() == [jpg, jpg, None, jpg, None]
    assert table.column(ROW).to_pylist() == list(range(5))


def test_unsorted_shard_never_splits_a_sample_silently(tmp_path, example_images):
    jpg = example_images[-1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", jpg),
            ("b.jpg", jpg),
            ("b.txt", b"b"),
            ("a.txt", b"a's caption, apart"),
            ("c.jpg", jpg),
        ],
    )
    for max_table_bytes in (1, 2**30):  # the same answer however the shard is cut into tables
        table = unify_tables(list(iter_shard(str(path), max_table_bytes=max_table_bytes)))
        assert table.column(KEY).to_pylist() == ["a", "b", "a", "c"]
        assert [kind(e) for e in errors(table)] == [None, None, "unsorted shard", None]
        assert "key 'a'" in errors(table)[2] and "sample 0" in errors(table)[2]
        assert table.column("txt").to_pylist() == [None, "b", "a's caption, apart", None]


def test_too_large_member_is_not_read(tmp_path, example_images):
    jpg = example_images[-1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar", [("a.jpg", jpg), ("a.txt", b"x" * (len(jpg) + 1)), ("b.jpg", jpg)]
    )
    table = read_shard(str(path), max_member_bytes=len(jpg))
    assert [kind(e) for e in errors(table)] == ["too large", None]
    assert "a.txt" in errors(table)[0]
    assert "txt" not in table.column_names  # never read into memory


def test_reserved_member_names(tmp_path, example_images):
    jpg = example_images[-1].read_bytes()
    path = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", jpg),
            ("a.memscore_row", b"7"),
            ("b.jpg", jpg),
            ("b.memorability", b"0.9"),
            ("c.jpg", jpg),
            ("c.__key__", b"k"),
        ],
    )
    table = read_shard(str(path), reserved_columns=("memorability",))
    assert [kind(e) for e in errors(table)] == ["reserved name"] * 3
    assert table.column(ROW).to_pylist() == [0, 1, 2]  # memscore's own, not the member's
    assert table.column(KEY).to_pylist() == ["a", "b", "c"]
    assert "memorability" not in table.column_names


def test_corrupted_gzip_shard(tmp_path, example_images, marker):
    gz = write_tar(tmp_path / "a.tar.gz", sample_members(example_images, marker), mode="w:gz")
    data = bytearray(gz.read_bytes())
    data[len(data) // 2] ^= 0xFF  # deflate may decode this: only the gzip checksum sees it
    gz.write_bytes(bytes(data))
    table = read_shard(str(gz))
    assert kind(errors(table)[-1]) == "truncated shard"
    gz.write_bytes(bytes(data[:-4]))  # the trailer cut short
    assert kind(errors(read_shard(str(gz)))[-1]) == "truncated shard"


# ------------------------------------------------------------------------------ expansion
def test_expand_braces():
    assert expand_braces("s/{000000..000002}.tar") == [f"s/00000{i}.tar" for i in range(3)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]
    assert expand_braces("{0..10..5}") == ["0", "5", "10"]
    assert expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("{train,val}/{0..1}.tar") == [
        "train/0.tar",
        "train/1.tar",
        "val/0.tar",
        "val/1.tar",
    ]
    assert expand_braces("{x}/a.tar") == ["{x}/a.tar"]  # no range, no comma: literal


@pytest.fixture
def shard_folder(tmp_path, example_images, marker) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        write_tar(folder / f"{i:06d}.tar", sample_members(example_images[:2], marker, start=2 * i))
    return folder


def test_expand_shards_local(shard_folder, tmp_path, monkeypatch):
    expected = [str(shard_folder / f"{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(shard_folder / "{000000..000002}.tar")) == expected
    assert expand_shards(str(shard_folder / "{000002,000000,000001}.tar")) == expected  # sorted
    assert expand_shards(str(shard_folder / "*.tar")) == expected
    assert expand_shards(str(shard_folder)) == expected
    assert expand_shards(str(shard_folder / "000001.tar")) == expected[1:2]
    monkeypatch.chdir(tmp_path)  # relative paths are made absolute
    assert expand_shards("shards/{000000..000001}.tar") == expected[:2]
    with pytest.raises(MemscoreError, match=r"1 of 4 named shards are missing, e\.g\. .*000003"):
        expand_shards(str(shard_folder / "{000000..000003}.tar"))
    with pytest.raises(MemscoreError, match="matches no shard"):
        expand_shards(str(shard_folder / "*.tar.gz"))
    with pytest.raises(MemscoreError, match="no such file or folder"):
        expand_shards(str(tmp_path / "nowhere"))
    (tmp_path / "table.parquet").write_bytes(b"x")
    with pytest.raises(MemscoreError, match="not a .tar shard"):
        expand_shards(str(tmp_path / "table.parquet"))


def test_is_webdataset(shard_folder, tmp_path, example_images):
    assert is_webdataset(str(shard_folder))
    assert is_webdataset(str(shard_folder / "000000.tar"))
    assert is_webdataset("s3://bucket/shards/{000000..000099}.tar")
    assert is_webdataset("shards/*.tar")
    assert is_webdataset("shards/{a,b}.tar.gz")
    assert not is_webdataset("manifest.parquet")
    assert not is_webdataset("images/*.jpg")
    (shard_folder / "photo.jpg").write_bytes(example_images[-1].read_bytes())
    assert not is_webdataset(str(shard_folder))  # a folder with an image is an image folder
    assert not is_webdataset(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------- S3
def test_shards_on_s3(s3_endpoint, shard_folder, tmp_path):
    fs = s3_endpoint.fs
    bucket = s3_endpoint.make_bucket("shards")
    for path in sorted(shard_folder.iterdir()):
        fs.put_file(str(path), f"{bucket}/wds/{path.name}")
    damaged = (shard_folder / "000002.tar").read_bytes()
    fs.pipe_file(f"{bucket}/bad/000000.tar", damaged[: len(damaged) // 2])
    fs.pipe_file(f"{bucket}/bad/000001.tar", b"not a tar at all")
    options = s3_endpoint.storage_options
    root = f"s3://{bucket}/wds"
    expected = [f"{root}/{i:06d}.tar" for i in range(3)]
    assert expand_shards(f"{root}/{{000000..000002}}.tar", options) == expected
    assert expand_shards(f"{root}/*.tar", options) == expected
    assert expand_shards(root, options) == expected
    assert is_webdataset(root, options)
    with pytest.raises(MemscoreError, match="named shards are missing"):
        expand_shards(f"{root}/{{000000..000004}}.tar", options)
    for index, url in enumerate(expected):
        remote = read_shard(url, options, index)
        local = read_shard(str(shard_folder / url.rsplit("/", 1)[1]), None, index)
        assert remote.column(URL).to_pylist() == [url] * local.num_rows
        assert remote.drop_columns([URL]).equals(local.drop_columns([URL]))
    truncated = read_shard(f"s3://{bucket}/bad/000000.tar", options)
    assert kind(errors(truncated)[-1]) == "truncated shard"
    assert errors(truncated)[:-1] == [None] * (truncated.num_rows - 1)
    assert [kind(e) for e in errors(read_shard(f"s3://{bucket}/bad/000001.tar", options))] == [
        "not a tar"
    ]
    assert [kind(e) for e in errors(read_shard(f"s3://{bucket}/bad/gone.tar", options))] == [
        "missing shard"
    ]


# -------------------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_read_shards_with_ray(ray_local, shard_folder, marker):
    shards = expand_shards(str(shard_folder))
    dataset = read_shards(shards)
    got = sorted(dataset.take_all(), key=lambda r: r[ROW])
    expected = unify_tables([read_shard(url, None, i) for i, url in enumerate(shards)])
    assert [r[ROW] for r in got] == expected.column(ROW).to_pylist()
    assert [r[KEY] for r in got] == expected.column(KEY).to_pylist()
    assert [r[IMAGE] for r in got] == expected.column(IMAGE).to_pylist()
    assert [r["txt"] for r in got] == expected.column("txt").to_pylist()
    # the .pth members went through Ray's workers and object store as bytes, never unpickled
    assert [r["pth"] for r in got] == expected.column("pth").to_pylist()
    assert not marker.exists()


@pytest.mark.slow
def test_read_shards_resume_through_ray_checkpoint(ray_local, shard_folder, tmp_path):
    """Ray Data's CheckpointConfig on memscore_row works on this read (a Read operator, not a
    file read): rows committed by an interrupted run are not written again."""
    import pyarrow.parquet as pq
    from ray.data import DataContext

    from memscore.sinks import open_sink, resume

    shards = expand_shards(str(shard_folder))
    output = str(tmp_path / "out")
    context = DataContext.get_current()
    context.checkpoint_config = resume.checkpoint_config(output, {})
    try:
        # a first run that stopped once shard 0's rows were committed ...
        open_sink(output).write(read_shards(shards[:1]).drop_columns([IMAGE]), 1000)
        # ... and the resumed run over every shard
        open_sink(output).write(read_shards(shards).drop_columns([IMAGE]), 1000)
    finally:
        context.checkpoint_config = None
    files = open_sink(output).files()
    written = unify_tables([pq.read_table(f) for f in files])
    expected = unify_tables([read_shard(url, None, i) for i, url in enumerate(shards)])
    assert sorted(written.column(ROW).to_pylist()) == expected.column(ROW).to_pylist()
