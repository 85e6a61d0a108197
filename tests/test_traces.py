"""The memorability traces: their math, the three encoders against an independent computation
from transformers' own outputs, and `memscore score --model <encoder>-traces` end to end on a
real local Ray (several encoders in one pass, list columns through Parquet, S3 folders, resume,
one line for each bad --weights)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hf_encoders import LAYERS, TOKENS, make_encoder_folder, reference_pixels

from memscore.models.weights import TRACE_FEATURES

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
ENCODERS = ("clip", "dinov2", "siglip2")
RTOL = 1e-4  # the tolerance for traces against an independent computation
# values per image: L+1 for the hidden-state features, L for the per-block ones
LENGTHS = {
    "cls_mean": LAYERS + 1,
    "cls_max": LAYERS + 1,
    "cls_maxabs": LAYERS + 1,
    "cls_delta": LAYERS,
    "attention_entropy": LAYERS,
    "patch_uniformity": LAYERS + 1,
}


# ------------------------------------------------------------------ an independent reference
def reference_traces(model, pixels) -> dict[str, list[list[float]]]:
    """The six traces of each image, written from the definitions on transformers' own
    ``output_hidden_states`` / ``output_attentions``, one image and one layer at a time (the
    paper's loops; scipy-free entropy in bits; patch uniformity by leave-one-out)."""
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    hs, att = out.hidden_states, out.attentions
    assert len(hs) == len(att) + 1
    traces = {feature: [] for feature in TRACE_FEATURES}
    for n in range(pixels.shape[0]):
        cls = [h[n, 0].double() for h in hs]
        traces["cls_mean"].append([c.mean().item() for c in cls])
        traces["cls_max"].append([c.max().item() for c in cls])
        traces["cls_maxabs"].append([c.abs().max().item() for c in cls])
        traces["cls_delta"].append(
            [
                1 - torch.nn.functional.cosine_similarity(a[None], b[None]).item()
                for a, b in zip(cls[:-1], cls[1:])
            ]
        )
        entropies = []
        for a in att:
            row = a[n].double().mean(0)[0, 1:]  # token 0's row, heads averaged, itself dropped
            p = (row / row.sum()).tolist()
            entropies.append(-sum(x * math.log2(x) for x in p if x > 0))
        traces["attention_entropy"].append(entropies)
        uniformity = []
        for h in hs:
            patches = h[n, 1:].double()
            per_patch = []
            for j in range(patches.shape[0]):
                others = torch.cat([patches[:j], patches[j + 1 :]])
                per_patch.append(
                    torch.nn.functional.cosine_similarity(patches[j][None], others).mean().item()
                )
            uniformity.append(sum(per_patch) / len(per_patch))
        traces["patch_uniformity"].append(uniformity)
    return traces


def assert_traces_close(got: dict, want: dict, encoder: str, rtol: float = RTOL):
    for feature in TRACE_FEATURES:
        g = np.asarray(got[f"{encoder}_{feature}"], dtype=np.float64)
        w = np.asarray(want[feature], dtype=np.float64)
        assert g.shape == w.shape, (feature, g.shape, w.shape)
        # relative, with a floor for values near zero (a delta or mean can be ~1e-8)
        np.testing.assert_allclose(
            g, w, rtol=rtol, atol=rtol * max(1e-3, np.abs(w).max()), err_msg=f"{encoder}_{feature}"
        )


# ----------------------------------------------------------------------------- the math alone
def test_trace_math_on_known_values():
    """Uniform attention has log2(T - 1) bits; equal patches are uniformity 1, orthogonal 0."""
    from memscore.models.traces import compute_traces

    n, t, d = 2, 9, 16
    equal = torch.ones(n, t, d)
    orthogonal = torch.zeros(n, t, d)
    orthogonal[:, torch.arange(t), torch.arange(t)] = 3.0  # token i along axis i
    rows = torch.full((n, t), 1.0 / t)
    traces = compute_traces([equal, orthogonal, equal * -2], [rows, rows])
    assert traces["attention_entropy"].shape == (n, 2)
    torch.testing.assert_close(traces["attention_entropy"], torch.full((n, 2), math.log2(t - 1)))
    torch.testing.assert_close(traces["patch_uniformity"], torch.tensor([[1.0, 0.0, 1.0]] * n))
    torch.testing.assert_close(traces["cls_mean"], torch.tensor([[1.0, 3 / d, -2.0]] * n))
    torch.testing.assert_close(traces["cls_maxabs"], torch.tensor([[1.0, 3.0, 2.0]] * n))
    # equal -> axis 0 -> -equal: cosine 1/sqrt(d) then -1/sqrt(d)
    torch.testing.assert_close(traces["cls_delta"], torch.tensor([[1 - d**-0.5, 1 + d**-0.5]] * n))
    assert all(v.dtype == torch.float32 for v in traces.values())


def test_patch_uniformity_is_exact_when_patches_are_nearly_orthogonal():
    """The Gram matrix's diagonal is zeroed, not subtracted: a mean cosine of ~1e-4 over 256
    patches of 768 dimensions keeps its digits."""
    from memscore.models.traces import compute_traces

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 257, 768, generator=generator)
    rows = torch.full((1, 257), 1 / 257)
    got = compute_traces([hidden, hidden], [rows])["patch_uniformity"][0, 0].item()
    unit = torch.nn.functional.normalize(hidden[0, 1:].double(), dim=-1)
    gram = unit @ unit.T
    want = ((gram.sum() - gram.diagonal().sum()) / (256 * 255)).item()
    assert abs(want) < 1e-3
    assert abs(got - want) <= 1e-4 * abs(want) + 1e-9


# -------------------------------------------------------------- the encoders, no Ray involved
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {name: make_encoder_folder(name, root / name, seed=i) for i, name in enumerate(ENCODERS)}


def photos() -> list[Path]:
    return [
        p for p in sorted((ROOT / "examples" / "images").iterdir()) if p.suffix in (".png", ".jpg")
    ]


def reference_batch(encoder: str, folder: Path):
    """The photos as memscore decodes them, preprocessed by transformers' Pillow processor."""
    from memscore.stages.decode import read_image

    return torch.cat(
        [reference_pixels(encoder, folder, read_image(p.read_bytes())) for p in photos()]
    )


@pytest.mark.parametrize("encoder", ENCODERS)
def test_traces_equal_the_definitions_on_transformers_outputs(encoder, folders):
    from memscore.models import get_model
    from memscore.models.encoders import load_encoder

    traces_model = get_model(f"{encoder}-traces", weights=str(folders[encoder]))
    reference_model, _ = load_encoder(encoder, str(folders[encoder]))
    pixels = reference_batch(encoder, folders[encoder])
    with torch.inference_mode():
        got = {k: v.tolist() for k, v in traces_model(pixels).items()}
    want = reference_traces(reference_model, pixels)
    assert_traces_close(got, want, encoder)
    assert {len(v) for k, v in got.items() if k.endswith("_cls_mean")} == {len(photos())}
    for feature, length in LENGTHS.items():
        assert {len(row) for row in got[f"{encoder}_{feature}"]} == {length}


def test_hidden_states_are_before_the_post_layernorm(folders):
    """hs[L] is the last block's output: DINOv2's layernorm and SigLIP's post_layernorm come
    after it, so the traces never see them."""
    from memscore.models.encoders import load_encoder

    for encoder, norm_of in (
        ("dinov2", lambda m: m.layernorm),
        ("siglip2", lambda m: m.post_layernorm),
    ):
        model, preprocess = load_encoder(encoder, str(folders[encoder]))
        pixels = reference_batch(encoder, folders[encoder])[:2]
        with torch.inference_mode():
            out = model(pixel_values=pixels, output_hidden_states=True)
            normed = norm_of(model)(out.hidden_states[-1])
        assert len(out.hidden_states) == LAYERS + 1
        assert out.hidden_states[0].shape[1] == TOKENS[encoder]
        torch.testing.assert_close(out.last_hidden_state, normed)
        assert not torch.allclose(out.hidden_states[-1], normed)


def test_reduced_precision_still_gives_float32_traces(folders):
    from memscore.models import get_model

    model = get_model("clip-traces", weights=str(folders["clip"]))
    pixels = reference_batch("clip", folders["clip"])[:2]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        traces = model(pixels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in traces.values())


def test_score_images_writes_list_columns_with_null_rows(folders):
    """The model stage alone: typed list columns, one list per scored row, null for error rows,
    through Parquet with their lengths."""
    from memscore.stages.decode import DecodeImages
    from memscore.stages.predict import ScoreImages, output_types

    paths = [str(p) for p in photos()[:3]] + [str(ROOT / "tests/data/images/multipage_rgb.tif")]
    weights = {"clip-traces": str(folders["clip"]), "siglip2-traces": str(folders["siglip2"])}
    models = tuple(weights)
    scorer = ScoreImages(models, weights, batch_size=2)
    preprocess = {name: t for name, t in zip(models, (r[1] for r in scorer._runners))}
    table = scorer(DecodeImages("path", preprocess, io_threads=2)(pa.table({"path": paths})))
    types = output_types(models)
    assert list(types) == [f"{e}_{f}" for e in ("clip", "siglip2") for f in TRACE_FEATURES]
    assert table.column_names == [
        "path",
        *types,
        "memscore_error",
        "memscore_model",
        "memscore_width",
        "memscore_height",
    ]
    assert table.column("memscore_error").to_pylist()[3].startswith("not an image")
    for column, arrow_type in types.items():
        assert table.schema.field(column).type == arrow_type == pa.list_(pa.float32())
        values = table.column(column).to_pylist()
        assert values[3] is None
        feature = column.split("_", 1)[1]
        assert [len(v) for v in values[:3]] == [LENGTHS[feature]] * 3

    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    back = pq.read_table(pa.BufferReader(buffer.getvalue()))
    for column in types:
        assert pa.types.is_list(back.schema.field(column).type)
        assert back.column(column).to_pylist() == table.column(column).to_pylist()


def test_weights_per_model_rules():
    from memscore.config import MemscoreError, ScoreConfig

    def config(weights, models="clip-traces,dinov2-traces"):
        return ScoreConfig("x.csv", output="out", models=models, weights=weights).validated()

    assert config(None).model_weights() == {"clip-traces": None, "dinov2-traces": None}
    both = config("clip-traces=/a/clip,dinov2-traces=facebook/dinov2-base")
    assert both.model_weights() == {
        "clip-traces": "/a/clip",
        "dinov2-traces": "facebook/dinov2-base",
    }
    assert config("dinov2-traces=s3://b/d").model_weights() == {
        "clip-traces": None,
        "dinov2-traces": "s3://b/d",
    }
    # a Hugging Face id is not taken for a relative path
    assert (
        config("openai/clip-vit-base-patch32", "clip-traces").weights
        == "openai/clip-vit-base-patch32"
    )
    for bad, message in (
        ("/a/clip", "one value for 2 models"),
        ("resmem=x", "which --model does not score"),
        ("clip-traces=a,clip-traces=b", "names clip-traces twice"),
    ):
        with pytest.raises(MemscoreError, match=message) as caught:
            config(bad)
        assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------ memscore score, CLI
def images_folder(tmp_path: Path) -> Path:
    """The example photos, a greyscale PNG and an unreadable TIFF (an error row)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in photos():
        shutil.copy(path, folder / path.name)
    for name in ("coins.png", "multipage_rgb.tif"):
        shutil.copy(ROOT / "tests" / "data" / "images" / name, folder / name)
    return folder


def score_cli(capsys, *args: str) -> tuple[int, str]:
    from memscore.cli import main

    code = main(["score", *args])
    captured = capsys.readouterr()
    return code, captured.err


def read_scores(output: Path) -> pa.Table:
    return pq.read_table(output).sort_by("memscore_row")


def expected_from_reference(table: pa.Table, encoder: str, folder: Path) -> dict:
    """The independent traces of the table's scored rows, decoded as memscore decodes them."""
    from memscore.models.encoders import load_encoder
    from memscore.stages.decode import read_image

    model, _ = load_encoder(encoder, str(folder))
    ok = [e is None for e in table.column("memscore_error").to_pylist()]
    paths = [p for p, good in zip(table.column("path").to_pylist(), ok) if good]
    pixels = torch.cat(
        [reference_pixels(encoder, folder, read_image(Path(p).read_bytes())) for p in paths]
    )
    return reference_traces(model, pixels)


@pytest.mark.slow
def test_score_each_encoder_end_to_end_and_several_in_one_pass(
    ray_local, tmp_path, folders, capsys
):
    images = images_folder(tmp_path)
    singles = {}
    for encoder in ENCODERS:
        output = tmp_path / f"out_{encoder}"
        code, err = score_cli(
            capsys,
            str(images),
            "--output",
            str(output),
            "--model",
            f"{encoder}-traces",
            "--weights",
            str(folders[encoder]),
            "--batch-size",
            "3",
        )
        assert code == 0, err
        table = singles[encoder] = read_scores(output)
        assert table.num_rows == 7
        errors = table.column("memscore_error").to_pylist()
        assert sum(e is not None for e in errors) == 1  # the unreadable TIFF
        ok = [e is None for e in errors]
        got = {
            c: [v for v, good in zip(table.column(c).to_pylist(), ok) if good]
            for c in table.column_names
            if c.startswith(f"{encoder}_")
        }
        assert_traces_close(got, expected_from_reference(table, encoder, folders[encoder]), encoder)
        summary = json.loads((output / "_memscore.json").read_text())
        record = summary["models"][0]
        assert record["weights"] == "folder" and len(record["weights_sha256"]) == 64
        assert record["output_columns"] == [f"{encoder}_{f}" for f in TRACE_FEATURES]
        assert summary["rows_scored"] == 6

    # all three in one pass: each image decoded once, three pixel columns, same numbers
    output = tmp_path / "out_all"
    weights = ",".join(f"{e}-traces={folders[e]}" for e in ENCODERS)
    code, err = score_cli(
        capsys,
        str(images),
        "--output",
        str(output),
        "--model",
        ",".join(f"{e}-traces" for e in ENCODERS),
        "--weights",
        weights,
    )
    assert code == 0, err
    together = read_scores(output)
    assert set(together.column("memscore_model").to_pylist()) == {
        "clip-traces,dinov2-traces,siglip2-traces"
    }
    for encoder, table in singles.items():
        for feature in TRACE_FEATURES:
            column = f"{encoder}_{feature}"
            alone, both = table.column(column).to_pylist(), together.column(column).to_pylist()
            assert [v is None for v in alone] == [v is None for v in both]
            np.testing.assert_allclose(
                np.array([v for v in both if v is not None]),
                np.array([v for v in alone if v is not None]),
                rtol=1e-6,
                atol=1e-7,
            )
    # Parquet kept the list type and every list's length
    schema = pq.read_schema(next(output.glob("*.parquet")))
    for encoder in ENCODERS:
        for feature, length in LENGTHS.items():
            assert schema.field(f"{encoder}_{feature}").type == pa.list_(pa.float32())
            lengths = {
                len(v) for v in together.column(f"{encoder}_{feature}").to_pylist() if v is not None
            }
            assert lengths == {length}


@pytest.mark.slow
def test_a_folder_on_s3_and_a_changed_folder_refused_on_resume(
    ray_local, tmp_path, folders, s3_endpoint, capsys
):
    images = images_folder(tmp_path)
    bucket = s3_endpoint.make_bucket("encoders")
    for path in folders["dinov2"].iterdir():
        s3_endpoint.fs.put_file(str(path), f"{bucket}/dinov2/{path.name}")
    from s3server import TEST_ACCESS_KEY, TEST_SECRET

    # credentials named, not only in the env: a Ray started before the endpoint lacks them
    options = [
        f"--storage-option={k}={v}"
        for k, v in (
            ("endpoint_url", s3_endpoint.url),
            ("key", TEST_ACCESS_KEY),
            ("secret", TEST_SECRET),
        )
    ]
    local, remote = tmp_path / "local", tmp_path / "remote"
    for output, weights in ((local, str(folders["dinov2"])), (remote, f"s3://{bucket}/dinov2")):
        code, err = score_cli(
            capsys,
            str(images),
            "--output",
            str(output),
            "--model",
            "dinov2-traces",
            "--weights",
            weights,
            *options,
        )
        assert code == 0, err
    a, b = read_scores(local), read_scores(remote)
    for feature in TRACE_FEATURES:
        assert (
            a.column(f"dinov2_{feature}").to_pylist() == b.column(f"dinov2_{feature}").to_pylist()
        )
    summary = json.loads((remote / "_memscore.json").read_text())
    assert (
        summary["models"][0]["weights_sha256"]
        == json.loads((local / "_memscore.json").read_text())["models"][0]["weights_sha256"]
    )

    # The same command on a finished run whose folder now holds other tensors: refused.
    make_encoder_folder("dinov2", tmp_path / "changed", seed=7)
    moved = tmp_path / "moving"
    shutil.copytree(folders["dinov2"], moved)
    code, err = score_cli(
        capsys,
        str(images),
        "--output",
        str(tmp_path / "r"),
        "--model",
        "dinov2-traces",
        "--weights",
        str(moved),
        "--limit",
        "2",
    )
    assert code == 0, err
    shutil.copy(tmp_path / "changed" / "model.safetensors", moved / "model.safetensors")
    code, err = score_cli(
        capsys,
        str(images),
        "--output",
        str(tmp_path / "r"),
        "--model",
        "dinov2-traces",
        "--weights",
        str(moved),
        "--limit",
        "2",
        "--resume",
    )
    assert code == 2
    assert "weights_sha256" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_a_prefixed_run_and_a_folder_scan_keyed_by_image(
    ray_local, tmp_path, folders, capsys
):
    """The MemCat flow (issue 25): a table with its own memorability column, scored with
    --column-prefix pred_ and evaluated layer by layer, reads as CLIP's and DINOv2's features;
    and `--key image` on a folder scan's output is one line whose advice works."""
    from PIL import Image

    from memscore.cli import main

    images = images_folder(tmp_path)
    names = sorted(p.name for p in images.iterdir())
    # as MemCat's table: image paths relative to its folder, a measured memorability
    memcat = tmp_path / "memcat.csv"
    memcat.write_text(
        "image,memorability,category\n"
        + "".join(
            f"images/{name},{0.5 + 0.07 * i:.2f},{'ab'[i % 2]}\n" for i, name in enumerate(names)
        )
    )
    scores = tmp_path / "scores"
    code, err = score_cli(
        capsys,
        str(memcat),
        "--path-column",
        "image",
        "--output",
        str(scores),
        "--model",
        "clip-traces,dinov2-traces",
        "--weights",
        f"clip-traces={folders['clip']},dinov2-traces={folders['dinov2']}",
        "--column-prefix",
        "pred_",
    )
    assert code == 0, err
    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                str(scores),
                "--truth",
                str(memcat),
                "--truth-column",
                "memorability",
                "--key",
                "image",
                "--trace-columns",
                "all",
                "--report",
                str(report),
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    traces = json.loads((report / "metrics.json").read_text())["traces"]
    assert set(traces) == {f"pred_{e}_{f}" for e in ("clip", "dinov2") for f in TRACE_FEATURES}
    for name, figures in traces.items():
        encoder, feature = name[len("pred_") :].split("_", 1)
        assert (figures["encoder"], figures["feature"]) == (encoder, feature)
        assert figures["model"]["model"] == f"{encoder}-traces"
        assert figures["layers_in_column"] == LENGTHS[feature]
        assert figures["counts"]["evaluated"] == 6  # the unreadable TIFF has no traces
    # the change from hidden state i to i+1 is layer i+1, as docs/traces.md numbers it
    assert [layer["layer"] for layer in traces["pred_clip_cls_delta"]["layers"]] == list(
        range(1, LAYERS + 1)
    )
    text = (report / "report.md").read_text()
    assert "### `cls_delta`" in text and "| 0-1 | " in text
    assert "| layer | clip ρ [95% CI] | dinov2 ρ [95% CI] |" in text and "pred ρ" not in text
    figure = Image.open(report / "layers.png")
    assert figure.format == "PNG" and figure.width >= 1000  # three panels a row: six features
    assert len(figure.convert("RGB").getcolors(maxcolors=1 << 20)) > 20

    # A folder scan names its images in `path` only: --key image is refused with one line...
    scan = tmp_path / "scan"
    code, err = score_cli(
        capsys,
        str(images),
        "--output",
        str(scan),
        "--model",
        "clip-traces",
        "--weights",
        str(folders["clip"]),
        "--column-prefix",
        "pred_",
    )
    assert code == 0, err
    argv = [
        "evaluate",
        str(scan),
        "--truth-column",
        "memorability",
        "--trace-columns",
        "all",
        "--report",
        str(tmp_path / "scan_report"),
        "--bootstrap",
        "20",
    ]
    assert main([*argv, "--truth", str(memcat), "--key", "image"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"memscore: error: --key image: the predictions {scan} have no column 'image' "
        f"(predictions: path, "
    )
    assert "--truth: image, memorability, category); the join needs a column both" in err[0]
    assert "give --truth a 'path' column naming the same image files" in err[0]
    # ... and what it says to give joins every image.
    with_path = tmp_path / "memcat_path.csv"
    with_path.write_text(memcat.read_text().replace("image,", "path,", 1))
    assert main([*argv, "--truth", str(with_path)]) == 0
    result = json.loads((tmp_path / "scan_report" / "metrics.json").read_text())
    assert result["counts"]["matched"] == 7
    assert result["traces"]["pred_clip_cls_delta"]["encoder"] == "clip"


def test_bad_weights_are_one_line_before_any_ray_work(tmp_path, folders, capsys, monkeypatch):
    import huggingface_hub.constants

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos()[0], images / photos()[0].name)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cases = [
        (["--model", "clip-traces", "--weights", str(empty)], "not a Hugging Face model folder"),
        (
            ["--model", "clip-traces", "--weights", str(folders["siglip2"])],
            "'siglip_vision_model' model, not clip",
        ),
        (["--model", "clip-traces", "--weights", str(tmp_path / "nowhere")], "no such folder"),
        # the paper's model, not in this machine's (empty) Hugging Face cache
        (["--model", "dinov2-traces"], "facebook/dinov2-base is not in the local Hugging Face"),
        (
            ["--model", "clip-traces,dinov2-traces", "--weights", str(folders["clip"])],
            "one value for 2 models",
        ),
    ]
    for args, message in cases:
        code, err = score_cli(capsys, str(images), "--output", str(tmp_path / "out"), *args)
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow  # no Ray, but two Base-size CLIP towers built and run: ~20 s on 2 cores
def test_the_benchmark_script_runs(tmp_path):
    import subprocess
    import sys

    results = tmp_path / "traces.md"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "traces_cpu.py"),
            "--batch",
            "1",
            "--rounds",
            "1",
            "--encoders",
            "clip",
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    table = [line for line in results.read_text().splitlines() if line.startswith("| clip")]
    assert [line.split(" | ")[2] for line in table] == [
        "plain (sdpa)",
        "plain (eager)",
        "traces",
        "trace math",
    ]
