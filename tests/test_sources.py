"""The Source interface (memscore.sources): every registered kind implements it, and no code
outside memscore/sources/ asks which kind it holds.

Driven by the registration list, ``manifest.KINDS``: a new kind is tested by being registered
(and given a small example in ``EXAMPLES``, which the first test demands).
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memscore.errors import MemscoreError
from memscore.sources import base, formats
from memscore.sources.base import RowsRead, Snapshot, Source
from memscore.sources.manifest import KINDS, open_manifest

PACKAGE = Path(__file__).resolve().parent.parent / "memscore"


# ------------------------------------------------------------------ one small example per kind
def _csv(folder: Path, images: list[Path]) -> Path:
    path = folder / "m.csv"
    path.write_text("path,label\n" + "".join(f"{p},{i}\n" for i, p in enumerate(images)))
    return path


def _parquet(folder: Path, images: list[Path]) -> Path:
    path = folder / "m.parquet"
    pq.write_table(
        pa.table({"path": [str(p) for p in images], "label": list(range(len(images)))}), path
    )
    return path


def _jsonl(folder: Path, images: list[Path]) -> Path:
    path = folder / "m.jsonl"
    path.write_text(
        "".join(json.dumps({"path": str(p), "label": i}) + "\n" for i, p in enumerate(images))
    )
    return path


def _arrow(folder: Path, images: list[Path]) -> Path:
    """An Arrow IPC stream, as Hugging Face datasets writes its .arrow files."""
    path = folder / "m.arrow"
    table = pa.table({"path": [str(p) for p in images], "label": list(range(len(images)))})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _images(folder: Path, images: list[Path]) -> Path:
    path = folder / "photos"
    path.mkdir()
    for image in images:
        (path / image.name).write_bytes(image.read_bytes())
    return path


def _shards(folder: Path, images: list[Path]) -> Path:
    path = folder / "shards"
    path.mkdir()
    for i, image in enumerate(images):
        with tarfile.open(path / f"{i:06d}.tar", "w") as tar:
            data = image.read_bytes()
            info = tarfile.TarInfo(f"{i:04d}{image.suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _parquet_images(folder: Path, images: list[Path]) -> Path:
    """A Hugging Face-style folder: the images' bytes in a struct<bytes, path> column."""
    path = folder / "hub" / "data"
    path.mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": p.read_bytes(), "path": p.name} for p in images], image
                ),
                "label": list(range(len(images))),
            }
        ),
        path / "train-00000-of-00001.parquet",
    )
    (folder / "hub" / "README.md").write_text("---\nlicense: cc0\n---\n")
    return folder / "hub"


EXAMPLES = {
    "csv": _csv,
    "parquet": _parquet,
    "parquet-images": _parquet_images,
    "jsonl": _jsonl,
    "arrow": _arrow,
    "images": _images,
    "webdataset": _shards,
}


def test_every_registered_kind_has_an_example_and_its_files_are_in_the_one_suffix_table():
    kinds = [kind.kind for kind in KINDS]
    assert len(kinds) == len(set(kinds)), "two registered kinds share a name"
    assert set(EXAMPLES) == set(kinds), "give a new kind a small example in EXAMPLES"
    assert set(formats.SUFFIX_KINDS.values()) <= set(kinds), (
        "formats.SUFFIX_KINDS names the files of registered kinds only"
    )


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.kind)
def test_every_kind_implements_the_interface(kind):
    assert issubclass(kind, Source) and not inspect.isabstract(kind), (
        f"{kind.__name__} leaves {sorted(kind.__abstractmethods__)} unimplemented"
    )
    assert isinstance(kind.what, str) and kind.what
    assert isinstance(kind.is_table, bool) and isinstance(kind.row_ids_are_positions, bool)
    for name, member in inspect.getmembers(Source):
        if name.startswith("_") or not callable(member):
            continue
        # an override takes what the interface's callers pass (keywords by their names)
        expected = list(inspect.signature(getattr(Source, name)).parameters)
        got = list(inspect.signature(getattr(kind, name)).parameters)
        assert got == expected, f"{kind.__name__}.{name}{got} differs from Source's {expected}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.kind)
def test_every_kind_answers_the_interface_on_its_example(kind, tmp_path, example_images):
    """What each caller asks, on real files: opened from what a user gives, fingerprinted,
    frozen, read in the driver or refused there, counted, and how its images are reached."""
    given = str(EXAMPLES[kind.kind](tmp_path, example_images[:2]))
    source = open_manifest(given, rows_in_driver=False)
    assert type(source) is kind and source.kind == kind.kind and source.source == given
    assert source.files and source.path_column in source.columns

    fingerprint = source.fingerprint()
    assert (
        len(fingerprint) == 64
        and open_manifest(given, rows_in_driver=False).fingerprint() == fingerprint
    )

    try:
        kind.check_readable_in_driver(given)
    except MemscoreError as refused:
        with pytest.raises(MemscoreError) as caught:
            open_manifest(given)  # a command that reads rows in the driver
        assert str(caught.value) == str(refused)
        with pytest.raises(MemscoreError):
            source.read_all()
        assert not source.is_table
    else:
        rows = pa.concat_tables(source.read_all())
        assert rows.num_rows == 2 and tuple(rows.column_names) == source.columns_in_driver
        assert set(source.columns_in_driver) <= set(source.columns)
        ids = source.row_ids(2).to_pylist()
        assert len(set(ids)) == 2 and (ids == [0, 1] or not source.row_ids_are_positions)
        assert [t.num_rows for t in source.iter_tables(limit=1)] == [1]

    source.check_run_options(limit=None, id_column=None)
    snapshot = source.freeze(
        str(tmp_path / "out" / "snapshot"), limit=None, rows_per_file=1, id_column=None
    )
    assert isinstance(snapshot, Snapshot) and snapshot.files
    counts_folder = str(tmp_path / "out" / "counts")  # empty: no read task has recorded
    if source.row_ids_are_positions:
        assert snapshot.rows == 2
        assert source.rows_read(snapshot, counts_folder, output="out") == RowsRead(2, 2)
        assert (
            source.recorded_rows("out", summary=None, counts_folder=counts_folder, by_name=False)
            is None
        )
    else:  # its rows are counted as they are read: nothing read, nothing to count yet
        with pytest.raises(MemscoreError, match="^out: "):
            source.rows_read(snapshot, counts_folder, output="out")
        with pytest.raises(MemscoreError, match="^out: "):
            source.recorded_rows("out", summary=None, counts_folder=counts_folder, by_name=False)

    reading = source.image_reading()
    assert set(reading) == {"path_column", "bytes_column", "confine_to"}
    assert reading["path_column"] == source.path_column
    local = source.first_local_files(3, rows=10)
    assert local and all(Path(p).is_file() for p in local)


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.kind)
def test_options_a_kind_cannot_take_are_refused_in_one_line(kind, tmp_path, example_images):
    source = open_manifest(
        str(EXAMPLES[kind.kind](tmp_path, example_images[:1])), rows_in_driver=False
    )
    for options in ({"limit": 1, "id_column": None}, {"limit": None, "id_column": "path"}):
        try:
            source.check_run_options(**options)
        except MemscoreError as refused:
            assert "\n" not in str(refused) and str(refused).startswith(source.source)


# ---------------------------------------------------------- nothing outside sources/ names a kind
def _outside_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "sources" not in p.relative_to(PACKAGE).parts)


def _kind_mentions(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, code) of each place ``tree`` names a kind of source: a comparison with a kind's
    name or with a source's ``.kind``, a ``case`` of a kind's name, a keyword argument named
    like a kind (``webdataset=True``), an import of a kind's module."""
    names = {kind.kind for kind in KINDS}
    modules = {kind.__module__ for kind in KINDS}

    def names_a_kind(operand: ast.expr) -> bool:
        if isinstance(operand, ast.Constant):
            return operand.value in names
        if isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
            return any(names_a_kind(element) for element in operand.elts)
        # `manifest.kind`, `source.kind`: a source's kind, whatever it is compared with
        return (
            isinstance(operand, ast.Attribute)
            and operand.attr == "kind"
            and any(word in ast.unparse(operand.value) for word in ("manifest", "source"))
        )

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(names_a_kind(o) for o in (node.left, *node.comparators)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.MatchValue) and names_a_kind(node.value):
            found.append((node.lineno, f"case {ast.unparse(node.value)}"))
        elif isinstance(node, ast.keyword) and node.arg in names:
            found.append((node.lineno, f"{node.arg}=..."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            if imported & modules:
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name in modules]
    return sorted(found)


def test_no_module_outside_sources_names_a_kind():
    """Code outside memscore/sources/ asks the Source interface (``image_reading``,
    ``row_ids_are_positions``, ``is_table`` ...), never ``manifest.kind == "webdataset"``, a
    ``webdataset=`` flag, or a kind's own module."""
    mentions = {
        str(path.relative_to(PACKAGE.parent)): found
        for path in _outside_sources()
        if (found := _kind_mentions(ast.parse(path.read_text(), str(path))))
    }
    assert mentions == {}


def test_the_scan_sees_a_kind_named():
    code = (
        'if manifest.kind == "webdataset": pass\n'
        "x = open_manifest(s, webdataset=True)\n"
        "from memscore.sources.webdataset import read_shards\n"
        'if source.kind in ("images", "csv"): pass\n'
    )
    assert [line for line, _ in _kind_mentions(ast.parse(code))] == [1, 2, 3, 4]
    assert _kind_mentions(ast.parse('error.kind == "decode failed"\nformat="parquet"\n')) == []


# ------------------------------------------------------------------------ sources/ is layered
def _sources_imports() -> dict[str, set[tuple[str, str]]]:
    """module -> (imported module, name) for every import in memscore/sources/, those inside
    functions too."""
    graph = {}
    for path in sorted((PACKAGE / "sources").glob("*.py")):
        module = f"memscore.sources.{path.stem}"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(
                        (
                            full
                            if full.startswith("memscore.sources.")
                            and (PACKAGE / "sources" / f"{alias.name}.py").exists()
                            else node.module,
                            alias.name,
                        )
                    )
            elif isinstance(node, ast.Import):
                edges.update((alias.name, "") for alias in node.names)
        graph[module] = edges
    return graph


def test_sources_import_no_circle_and_no_private_name():
    graph = _sources_imports()
    private = [
        (module, target, name)
        for module, edges in graph.items()
        for target, name in edges
        if name.startswith("_") and target != module
    ]
    assert private == []

    def visit(module, path):
        for target, _ in graph.get(module, ()):
            if target in path:
                raise AssertionError(" -> ".join([*path, target]))
            if target in graph:
                visit(target, [*path, target])

    for module in graph:
        visit(module, [module])


def test_sources_import_no_job_config():
    for module, edges in _sources_imports().items():
        assert not any(
            target.startswith("memscore.config") or target.endswith(".config")
            for target, _ in edges
        ), module


def test_one_suffix_table():
    """The WebDataset check and the table reader read one table: a name one reads as a file
    the other never lists as a folder of shards."""
    from memscore.sources import webdataset

    for suffix, kind in formats.SUFFIX_KINDS.items():
        assert formats.kind_of(f"dir/x{suffix.upper()}") == kind
        assert formats.names_a_file(f"dir/x{suffix}") == (kind != "webdataset")
    assert webdataset.SHARD_SUFFIXES == formats.SHARD_SUFFIXES
    assert webdataset.IMAGE_MEMBERS == tuple(e.lstrip(".") for e in formats.IMAGE_EXTENSIONS)
    assert base.BATCH_ROWS > 0
