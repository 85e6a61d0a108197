"""`memscore evaluate`: metrics against scipy, the join's accounting, groups, the split-half
ceiling, the report files and figures, the CLI and the job entrypoint. Real files, no mocks."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import stats

from memscore.cli import build_parser, main
from memscore.config import EvaluateConfig, MemscoreError, add_arguments, from_args
from memscore.evaluation import metrics
from memscore.evaluation.job import REPORT_FILES, evaluate
from memscore.evaluation.plots import gaussian_kde

ROOT = Path(__file__).resolve().parent.parent

# A fixed table with ties on both sides (values repeat within each column).
X = np.array([0.61, 0.72, 0.72, 0.55, 0.90, 0.61, 0.83, 0.47, 0.72, 0.66, 0.58, 0.90])
Y = np.array([0.70, 0.80, 0.65, 0.50, 0.95, 0.70, 0.70, 0.40, 0.85, 0.60, 0.60, 0.88])


# --- metrics ----------------------------------------------------------------------------------


def test_summary_of_a_table_with_ties():
    # spearman and pearson are scipy's (memscore adds only the nan guards, tested below); the
    # summary is memscore's own
    figures = metrics.summary(X, Y, bootstrap=0)
    assert figures["spearman"] == metrics.spearman(X, Y)
    assert metrics.mse(X, Y) == pytest.approx(np.mean((X - Y) ** 2), abs=1e-12)
    assert metrics.mae(X, Y) == pytest.approx(np.mean(np.abs(X - Y)), abs=1e-12)
    assert figures["n"] == 12
    assert figures["pred_min"] == 0.47 and figures["pred_max"] == 0.90
    assert figures["truth_share_below_pred_min"] == pytest.approx(1 / 12)  # only 0.40 < 0.47
    assert figures["pred_mean"] == pytest.approx(X.mean())
    assert figures["truth_mean"] == pytest.approx(Y.mean())


def test_every_bootstrap_resample_is_scipys_spearman_of_the_drawn_pairs(monkeypatch):
    # Small chunks, so resamples are drawn over several chunks from the one Generator.
    monkeypatch.setattr(metrics, "_CHUNK_CELLS", 5 * X.size)
    rhos = metrics.bootstrap_spearman(X, Y, resamples=23, seed=11)
    rng = np.random.default_rng(11)
    rows = [
        rng.integers(0, X.size, size=(min(5, 23 - s), X.size), dtype=np.int32)
        for s in range(0, 23, 5)
    ]
    expected = [stats.spearmanr(X[i], Y[i]).statistic for i in np.concatenate(rows)]
    np.testing.assert_allclose(rhos, expected, rtol=0, atol=1e-12)


def test_bootstrap_interval_is_deterministic_for_a_seed_and_contains_rho():
    rng = np.random.default_rng(5)
    x = rng.random(200)
    y = x + rng.normal(0, 0.3, 200)
    first = metrics.summary(x, y, bootstrap=500, seed=3)["spearman_ci95"]
    assert metrics.summary(x, y, bootstrap=500, seed=3)["spearman_ci95"] == first
    assert metrics.summary(x, y, bootstrap=500, seed=4)["spearman_ci95"] != first
    lo, hi = first
    assert lo < metrics.spearman(x, y) < hi and hi - lo < 0.3


def test_undefined_figures_are_nan_not_errors_nor_warnings(recwarn):
    assert math.isnan(metrics.spearman([0.1, 0.2], [0.3, 0.4]))  # fewer than 3 pairs
    assert math.isnan(metrics.pearson([0.1, 0.2], [0.3, 0.4]))  # scipy raises below 2
    assert math.isnan(metrics.spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))  # constant
    assert math.isnan(metrics.pearson([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))
    assert math.isnan(metrics.spearman([0.1, 0.2, 0.3], [0.7, 0.7, 0.7]))
    # Nearly constant (a spread of 1e-15 around 1): r exists; scipy's warning stays inside.
    assert metrics.pearson(1 + np.array([0.0, 1.0, 3.0]) * 1e-15, X[:3]) == pytest.approx(
        stats.pearsonr(np.array([0.0, 1.0, 3.0]), X[:3]).statistic, abs=0.05
    )
    empty = metrics.summary(np.array([]), np.array([]))
    assert empty["n"] == 0 and math.isnan(empty["mse"])
    assert all(map(math.isnan, empty["spearman_ci95"]))
    assert metrics.spearman_brown(0.6) == pytest.approx(1.2 / 1.6)
    assert math.isnan(metrics.spearman_brown(float("nan")))
    assert not recwarn.list, [str(w.message) for w in recwarn]


def test_the_binned_kde_of_many_values_is_close_to_scipys_exact_one():
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 101)
    # Up to 5000 values it is scipy's own; above, memscore's binned sum, checked against it:
    large = rng.beta(8, 3, 20_000)  # summed over a fine histogram
    np.testing.assert_allclose(
        gaussian_kde(large, grid), stats.gaussian_kde(large)(grid), rtol=2e-3, atol=1e-3
    )
    assert gaussian_kde(np.array([0.5, 0.5]), grid) is None  # scipy raises on both
    assert gaussian_kde(np.array([0.5]), grid) is None


# --- a score output and ground truth on disk --------------------------------------------------

N = 40
CATEGORIES = ("animals", "food", "sports")


def _path(i: int) -> str:
    return f"/data/imgs/img{i:02d}.jpg"


def _truth_values(i: int) -> float:
    return round(0.45 + 0.5 * ((i * 7) % N) / N, 2)


def _prediction(i: int) -> float | None:
    if i < 2:
        return None  # the images memscore could not decode
    return round(0.42 + 0.4 * _truth_values(i) + 0.1 * ((i * 13) % 5) / 5, 2)


def _category(i: int) -> str:
    return "rare" if i in (30, 31) else CATEGORIES[i % 3]


@pytest.fixture
def score_output(tmp_path) -> Path:
    """Shaped like `memscore score` output: two part files, the summary, and the snapshot."""
    out = tmp_path / "scores"
    (out / "_memscore" / "manifest").mkdir(parents=True)
    table = pa.table(
        {
            "path": [_path(i) for i in range(N)],
            "memorability": pa.array([_prediction(i) for i in range(N)], pa.float32()),
            "memscore_error": [("decode failed: broken" if i < 2 else None) for i in range(N)],
            "memscore_row": pa.array(range(N), pa.int64()),
        }
    )
    pq.write_table(table.slice(0, 20), out / "part-00000.parquet")
    pq.write_table(table.slice(20), out / "part-00001.parquet")
    # Ray's snapshot of the manifest: a Parquet file under _memscore/ that must not be read.
    pq.write_table(table.slice(0, 5), out / "_memscore" / "manifest" / "block-0.parquet")
    (out / "_memscore.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "models": [
                    {
                        "model": "resmem",
                        "weights": "RETRAIN",
                        "weights_file": "model.pt",
                        "output_column": "memorability",
                        "weights_sha256": "0123456789ab" * 5,
                    }
                ],
            }
        )
    )
    return out


@pytest.fixture
def truth_csv(tmp_path) -> Path:
    """Ground truth for images 0..37 (38, 39 unlabelled) plus one image never scored."""
    lines = ["path,hr,category,half_a,half_b"]
    for i in range(N - 2):
        hr = "" if i == 5 else f"{_truth_values(i)}"  # one empty label
        a = _truth_values(i) + 0.05 * ((i * 3) % 4 - 1.5)
        b = _truth_values(i) + 0.05 * ((i * 5) % 4 - 1.5)
        lines.append(f"{_path(i)},{hr},{_category(i)},{a:.3f},{b:.3f}")
    lines.append("/data/imgs/only_truth.jpg,0.5,food,0.5,0.5")
    path = tmp_path / "truth.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _expected_pairs(rows=range(N)):
    """Prediction and truth arrays the evaluation must use, in path order, by hand."""
    keep = [i for i in rows if i < N - 2 and i != 5 and _prediction(i) is not None]
    keep.sort(key=_path)
    pred = np.array([np.float32(_prediction(i)) for i in keep], dtype=np.float64)
    truth = np.array([_truth_values(i) for i in keep])
    return keep, pred, truth


def _config(score_output, truth_csv, tmp_path, **changes) -> EvaluateConfig:
    values = {
        "predictions": str(score_output),
        "truth": str(truth_csv),
        "truth_column": "hr",
        "report": str(tmp_path / "report"),
        "bootstrap": 200,
    }
    return EvaluateConfig(**{**values, **changes})


# --- the evaluation ---------------------------------------------------------------------------


def test_join_by_path_counts_every_row_and_the_figures_are_scipys(
    score_output, truth_csv, tmp_path
):
    result = evaluate(_config(score_output, truth_csv, tmp_path))
    assert result["counts"] == {
        "predictions_rows": 40,
        "truth_rows": 39,
        "predictions_null_key": 0,
        "truth_null_key": 0,
        "matched": 38,
        "predictions_without_truth": 2,
        "truth_without_prediction": 1,
        "excluded_null_prediction": 2,
        "excluded_null_truth": 1,
        "evaluated": 35,
    }
    _, pred, truth = _expected_pairs()
    overall = result["overall"]
    assert overall["n"] == 35
    assert overall["spearman"] == pytest.approx(stats.spearmanr(pred, truth).statistic, abs=1e-12)
    assert overall["pearson"] == pytest.approx(stats.pearsonr(pred, truth).statistic, abs=1e-12)
    assert overall["mse"] == pytest.approx(np.mean((pred - truth) ** 2), abs=1e-12)
    assert overall["mae"] == pytest.approx(np.mean(np.abs(pred - truth)), abs=1e-12)
    assert overall["pred_min"] == pred.min() and overall["pred_max"] == pred.max()
    assert overall["truth_share_below_pred_min"] == pytest.approx(np.mean(truth < pred.min()))
    lo, hi = overall["spearman_ci95"]
    assert lo < overall["spearman"] < hi
    assert result["model"]["model"] == "resmem" and result["warnings"] == []
    # The same seed gives the same interval.
    again = evaluate(_config(score_output, truth_csv, tmp_path))
    assert again["overall"]["spearman_ci95"] == overall["spearman_ci95"]


def test_group_figures_equal_the_figures_of_each_subset(score_output, truth_csv, tmp_path):
    result = evaluate(_config(score_output, truth_csv, tmp_path, group_by=("category",)))
    groups = result["groups"]["category"]
    assert list(groups) == ["animals", "food", "rare", "sports"]
    for name, figures in groups.items():
        _, pred, truth = _expected_pairs(i for i in range(N) if _category(i) == name)
        expected = metrics.summary(pred, truth, bootstrap=200, seed=0)
        for field_name, value in expected.items():
            if isinstance(value, list) or (isinstance(value, float) and math.isnan(value)):
                continue
            assert figures[field_name] == pytest.approx(value, abs=1e-12), (name, field_name)
        if name != "rare":
            assert figures["spearman_ci95"] == pytest.approx(expected["spearman_ci95"])
    assert sum(g["n"] for g in groups.values()) == result["overall"]["n"]
    # Two images: no correlation, written as null, and the report still renders.
    rare = groups["rare"]
    assert rare["n"] == 2 and rare["spearman"] is None and rare["spearman_ci95"] == [None, None]
    assert rare["mse"] is not None
    on_disk = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert on_disk["groups"]["category"]["rare"]["spearman"] is None
    assert "| rare | 2 | – |" in (tmp_path / "report" / "report.md").read_text()


def test_split_half_ceiling_is_the_halves_spearman_and_its_spearman_brown(
    score_output, truth_csv, tmp_path
):
    result = evaluate(
        _config(score_output, truth_csv, tmp_path, split_half_columns=("half_a", "half_b"))
    )
    keep, _, _ = _expected_pairs()
    table = {line.split(",")[0]: line.split(",") for line in truth_csv.read_text().splitlines()}
    a = np.array([float(table[_path(i)][3]) for i in keep])
    b = np.array([float(table[_path(i)][4]) for i in keep])
    half = result["overall"]["split_half"]
    rho = stats.spearmanr(a, b).statistic
    assert half["n"] == 35
    assert half["spearman"] == pytest.approx(rho, abs=1e-12)
    assert half["spearman_brown"] == pytest.approx(2 * rho / (1 + rho), abs=1e-12)
    assert "split-half ρ / Spearman-Brown" in (tmp_path / "report" / "report.md").read_text()


def test_report_files_are_consistent_and_the_pngs_are_real_images(
    score_output, truth_csv, tmp_path
):
    result = evaluate(_config(score_output, truth_csv, tmp_path))
    report = tmp_path / "report"
    assert sorted(p.name for p in report.iterdir()) == sorted(result["files"].values())
    assert set(result["files"].values()) == set(REPORT_FILES.values()) - {"layers.png"}
    assert json.loads((report / "metrics.json").read_text()) == result
    text = (report / "report.md").read_text()
    overall = result["overall"]
    assert f"{overall['spearman']:.3f} [{overall['spearman_ci95'][0]:.3f}, " in text
    assert "](distribution.png)" in text and "](scatter.png)" in text
    assert "| **evaluated** | **35** |" in text
    assert "| predictions without ground truth | 2 |" in text
    for name in ("distribution.png", "scatter.png"):
        data = (report / name).read_bytes()
        Image.open(io.BytesIO(data)).verify()
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width >= 500 and image.height >= 400
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, name  # drawn, not blank


def test_many_points_are_binned_and_constant_predictions_do_not_crash(tmp_path):
    n = 6000  # above the scatter's one-point-each limit: a hexbin
    rng = np.random.default_rng(2)
    truth = rng.beta(8, 3, n)
    paths = [f"img{i}.jpg" for i in range(n)]
    pq.write_table(
        pa.table({"path": paths, "memorability": 0.4 + 0.5 * truth}), tmp_path / "pred.parquet"
    )
    pq.write_table(pa.table({"path": paths, "hr": truth}), tmp_path / "truth.parquet")
    result = evaluate(
        EvaluateConfig(
            str(tmp_path / "pred.parquet"),
            str(tmp_path / "truth.parquet"),
            "hr",
            str(tmp_path / "big"),
            bootstrap=50,
        )
    )
    assert result["overall"]["spearman"] == pytest.approx(1.0)
    assert Image.open(tmp_path / "big" / "scatter.png").width >= 500

    pq.write_table(
        pa.table({"path": paths[:10], "memorability": [0.5] * 10}), tmp_path / "flat.parquet"
    )
    flat = evaluate(
        EvaluateConfig(
            str(tmp_path / "flat.parquet"),
            str(tmp_path / "truth.parquet"),
            "hr",
            str(tmp_path / "flat"),
        )
    )
    assert flat["overall"]["spearman"] is None and flat["overall"]["pearson"] is None
    assert flat["counts"]["truth_without_prediction"] == n - 10
    assert (tmp_path / "flat" / "distribution.png").stat().st_size > 1000


def test_join_by_key_across_file_kinds_and_key_types(tmp_path):
    # Predictions as one CSV with integer ids; truth as JSON lines with text ids and no paths.
    pred = tmp_path / "pred.csv"
    pred.write_text(
        "image_id,memorability,path\n"
        + "".join(f"{i},{0.5 + 0.01 * i if i != 3 else ''},/x/{i}.jpg\n" for i in range(10))
    )
    truth = tmp_path / "truth.jsonl"
    truth.write_text(
        "".join(
            json.dumps({"image_id": str(i), "score": 0.3 + 0.02 * i}) + "\n" for i in range(2, 12)
        )
    )
    result = evaluate(
        EvaluateConfig(
            str(pred), str(truth), "score", str(tmp_path / "r"), key="image_id", bootstrap=0
        )
    )
    counts = result["counts"]
    assert (
        counts["matched"],
        counts["predictions_without_truth"],
        counts["truth_without_prediction"],
        counts["excluded_null_prediction"],
        counts["evaluated"],
    ) == (8, 2, 2, 1, 7)
    assert result["key"] == "image_id" and result["overall"]["spearman"] == pytest.approx(1.0)
    assert result["overall"]["spearman_ci95"] == [None, None]  # --bootstrap 0


def test_duplicate_keys_are_refused_naming_one(score_output, truth_csv, tmp_path):
    with truth_csv.open("a") as f:
        f.write(f"{_path(7)},0.9,food,0.9,0.9\n")
    with pytest.raises(
        MemscoreError,
        match=r"--truth .*1 'path' value\(s\) occur more than "
        r"once, e.g. '/data/imgs/img07.jpg' \(2 times\)",
    ):
        evaluate(_config(score_output, truth_csv, tmp_path))
    pred = tmp_path / "dup.csv"
    pred.write_text("path,memorability\na.jpg,0.5\nb.jpg,0.6\na.jpg,0.7\n")
    with pytest.raises(MemscoreError, match=r"the predictions .*'a.jpg' \(2 times\)"):
        evaluate(_config(pred, truth_csv, tmp_path))


def test_nothing_matching_is_one_line_showing_a_key_from_each_side(score_output, tmp_path):
    truth = tmp_path / "relative.csv"
    truth.write_text("path,hr\nimgs/img00.jpg,0.5\nimgs/img01.jpg,0.6\n")
    with pytest.raises(MemscoreError) as caught:
        evaluate(_config(score_output, truth, tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert "predictions '/data/imgs/img00.jpg'" in message and "truth 'imgs/img00.jpg'" in message
    assert "absolute paths" in message and "--key" in message


def test_paths_named_differently_join_as_memscore_resolves_them(tmp_path):
    """A truth table beside the images with relative paths, predictions from a folder scan with
    absolute ones (and the reverse: a run of a CSV manifest keeps its relative paths, which
    resolve against the manifest's folder, recorded in the run summary)."""
    images = tmp_path / "photos"
    names = [f"img{i:02d}.jpg" for i in range(6)]
    hr = [0.5, 0.6, 0.55, 0.8, 0.7, 0.9]
    truth = tmp_path / "labels.csv"
    truth.write_text("path,hr\n" + "".join(f"photos/./{n},{h}\n" for n, h in zip(names, hr)))
    scanned = tmp_path / "scanned.parquet"
    pq.write_table(
        pa.table(
            {
                "path": [str(images / n) for n in names],
                "memorability": pa.array(hr[::-1], pa.float32()),
            }
        ),
        scanned,
    )
    result = evaluate(_config(scanned, truth, tmp_path))
    assert result["counts"]["matched"] == 6
    assert result["overall"]["spearman"] == pytest.approx(-1.0)
    assert any(
        "joined on the image paths as memscore resolves them" in w for w in result["warnings"]
    )

    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(
        pa.table(
            {"path": [f"photos/{n}" for n in names], "memorability": pa.array(hr, pa.float32())}
        ),
        run / "part-00000.parquet",
    )
    (run / "_memscore.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "manifest": str(tmp_path / "m.csv"),
                "manifest_base_dir": str(tmp_path),
                "models": [],
            }
        )
    )
    absolute = tmp_path / "absolute.csv"
    absolute.write_text("path,hr\n" + "".join(f"{images / n},{h}\n" for n, h in zip(names, hr)))
    result = evaluate(_config(run, absolute, tmp_path, report=str(tmp_path / "r2")))
    assert result["counts"]["matched"] == 6 and result["overall"]["spearman"] == pytest.approx(1)


def test_a_runs_one_score_column_is_evaluated_when_none_is_named(score_output, truth_csv, tmp_path):
    """`memscore score --model memnet` writes memorability_memnet: evaluating that output
    without --prediction-column evaluates it; a named column, or a run with several score
    columns, is never replaced."""
    table = pq.read_table(score_output).rename_columns(
        ["path", "memorability_memnet", "memscore_error", "memscore_row"]
    )
    run = tmp_path / "memnet_run"
    run.mkdir()
    pq.write_table(table, run / "part-00000.parquet")
    record = {"model": "memnet", "weights": "checkpoint", "output_column": "memorability_memnet"}
    (run / "_memscore.json").write_text(json.dumps({"status": "complete", "models": [record]}))
    result = evaluate(_config(run, truth_csv, tmp_path))
    expected = evaluate(_config(score_output, truth_csv, tmp_path, report=str(tmp_path / "r0")))
    assert result["prediction_column"] == "memorability_memnet"
    assert result["overall"]["spearman"] == expected["overall"]["spearman"]
    assert result["counts"]["evaluated"] == expected["counts"]["evaluated"]

    with pytest.raises(MemscoreError, match="no column 'memorability'"):
        evaluate(_config(run, truth_csv, tmp_path, prediction_column="memorability"))
    two = {"model": "falseresmem", "output_column": "false_alarm"}
    (run / "_memscore.json").write_text(json.dumps({"status": "complete", "models": [record, two]}))
    with pytest.raises(MemscoreError, match="no column 'memorability'"):
        evaluate(_config(run, truth_csv, tmp_path))


def test_paths_that_match_as_written_are_not_resolved(tmp_path):
    """Relative names equal on both sides join as written, wherever the two tables are."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pq.write_table(
        pa.table(
            {
                "path": ["x.jpg", "y.jpg", "z.jpg"],
                "memorability": pa.array([0.5, 0.6, 0.7], pa.float32()),
            }
        ),
        tmp_path / "a" / "pred.parquet",
    )
    (tmp_path / "b" / "truth.csv").write_text("path,hr\nx.jpg,0.1\ny.jpg,0.2\nz.jpg,0.3\n")
    result = evaluate(
        _config(tmp_path / "a" / "pred.parquet", tmp_path / "b" / "truth.csv", tmp_path)
    )
    assert result["counts"]["matched"] == 3 and not result["warnings"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"truth_column": "nope"},
            "no column 'nope' (columns: path, hr, category, half_a, half_b); "
            "name it with --truth-column",
        ),
        (
            {"prediction_column": "false_alarm"},
            "no column 'false_alarm' (columns: path, memorability, memscore_error, memscore_row); name it with "
            "--prediction-column",
        ),
        ({"key": "image_id"}, "no column 'image_id'"),
        ({"group_by": ("scene",)}, "--group-by scene: neither --truth nor the predictions"),
        ({"truth_column": "category"}, "column 'category' is string, not numbers (e.g. 'animals')"),
        ({"split_half_columns": ("half_a", "half_a")}, "names the same column twice"),
        ({"bootstrap": -1}, "--bootstrap must not be negative"),
    ],
)
def test_user_errors_are_one_line(score_output, truth_csv, tmp_path, change, message):
    with pytest.raises(MemscoreError) as caught:
        evaluate(_config(score_output, truth_csv, tmp_path, **change))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_join_column_one_side_lacks_is_one_line_naming_both_sides_columns(
    score_output, tmp_path, capsys
):
    """The README's `--key image` on a folder scan's output, which names its images in `path`
    and has no `image` column: the line says what each side has and what joins them, and what
    it says to give works."""
    rows = "".join(f"{_path(i)},{_truth_values(i)},{_category(i)}\n" for i in range(N))
    memcat = tmp_path / "memcat.csv"
    memcat.write_text("image,memorability,category\n" + rows)
    argv = [
        "evaluate",
        str(score_output),
        "--truth-column",
        "memorability",
        "--report",
        str(tmp_path / "r"),
        "--bootstrap",
        "20",
    ]
    assert main([*argv, "--truth", str(memcat), "--key", "image"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"memscore: error: --key image: the predictions {score_output} have no column 'image' "
        f"(predictions: path, memorability, memscore_error, memscore_row; --truth: image, "
        f"memorability, category); the join needs a column both tables have, and these share "
        f"none. The predictions name their images in 'path', as a folder scan's output does: "
        f"give --truth a 'path' column naming the same image files (relative paths resolve "
        f"against its folder) and leave out --key, or score --truth's table itself (its "
        f"columns pass through to the output) and join on one of them with --key"
    ]
    assert not (tmp_path / "r" / "report.md").exists()
    # What it says: a 'path' column of the same files, no --key.
    with_path = tmp_path / "with_path.csv"
    with_path.write_text("path,memorability,category\n" + rows)
    assert main([*argv, "--truth", str(with_path)]) == 0
    assert capsys.readouterr().out.startswith("memscore: evaluated 38 of 40 matched rows")
    # The other way round: --truth lacks the key the predictions have; both have 'path'.
    assert main([*argv, "--truth", str(with_path), "--key", "memscore_row"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"memscore: error: --key memscore_row: --truth {with_path} has no column "
        f"'memscore_row' (predictions: path, memorability, memscore_error, memscore_row; "
        f"--truth: path, memorability, category)"
    )
    assert err[0].endswith("both have 'path'; leave out --key to join on it")
    # Predictions as a CSV file without the key: its columns are read all the same.
    table = pq.read_table(sorted(score_output.glob("*.parquet")))
    (tmp_path / "pred.csv").write_text(
        "path,memorability\n"
        + "".join(
            f"{p},{m}\n"
            for p, m in zip(
                table.column("path").to_pylist(), table.column("memorability").to_pylist()
            )
        )
    )
    with pytest.raises(MemscoreError) as caught:
        evaluate(
            EvaluateConfig(
                str(tmp_path / "pred.csv"),
                str(memcat),
                "memorability",
                str(tmp_path / "r"),
                key="category",
            )
        )
    assert str(caught.value).startswith(
        f"--key category: the predictions {tmp_path / 'pred.csv'} have no column 'category' "
        f"(predictions: path, memorability; --truth: image, memorability, category)"
    )
    assert "The predictions name their images in 'path'" in str(caught.value)


def test_an_unfinished_run_is_evaluated_with_a_warning(score_output, truth_csv, tmp_path):
    (score_output / "_memscore.json").unlink()
    result = evaluate(_config(score_output, truth_csv, tmp_path))
    assert result["model"] is None and "the run did not finish" in result["warnings"][0]
    assert "Warning: " in (tmp_path / "report" / "report.md").read_text()


def test_predictions_and_report_on_s3(s3_endpoint, score_output, truth_csv, tmp_path):
    bucket = s3_endpoint.make_bucket()
    s3_endpoint.fs.put(str(score_output), f"{bucket}/scores", recursive=True)
    # a traces report's figure left in the folder, and an object of the user's
    s3_endpoint.fs.pipe_file(f"{bucket}/eval/report/layers.png", b"an older report's")
    s3_endpoint.fs.pipe_file(f"{bucket}/eval/report/notes.txt", b"mine")
    report = f"s3://{bucket}/eval/report"
    result = evaluate(
        EvaluateConfig(
            f"s3://{bucket}/scores",
            str(truth_csv),
            "hr",
            report,
            bootstrap=100,
            storage_options=s3_endpoint.storage_options,
        )
    )
    assert result["counts"]["evaluated"] == 35 and result["model"]["model"] == "resmem"
    s3_endpoint.fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in s3_endpoint.fs.ls(f"{bucket}/eval/report"))
    assert names == sorted([*result["files"].values(), "notes.txt"])
    assert s3_endpoint.fs.cat_file(f"{bucket}/eval/report/notes.txt") == b"mine"
    assert json.loads(s3_endpoint.fs.cat_file(f"{bucket}/eval/report/metrics.json")) == result


# --- the command line and the job -------------------------------------------------------------


def test_every_config_field_is_an_option_and_back():
    parser = argparse.ArgumentParser()
    add_arguments(parser, EvaluateConfig)
    args = parser.parse_args(
        [
            "scores/",
            "--truth",
            "t.csv",
            "--truth-column",
            "hr",
            "--report",
            "r/",
            "--prediction-column",
            "false_alarm",
            "--path-column",
            "file",
            "--key",
            "id",
            "--group-by",
            "category,scene",
            "--trace-columns",
            "clip_cls_mean,dinov2_attention_entropy",
            "--split-half-columns",
            "a",
            "b",
            "--bootstrap",
            "10",
            "--seed",
            "3",
            "--storage-option",
            "anon=true",
        ]
    )
    assert from_args(args, EvaluateConfig) == EvaluateConfig(
        predictions="scores/",
        truth="t.csv",
        truth_column="hr",
        report="r/",
        prediction_column="false_alarm",
        path_column="file",
        key="id",
        group_by=("category", "scene"),
        split_half_columns=("a", "b"),
        bootstrap=10,
        seed=3,
        trace_columns=("clip_cls_mean", "dinov2_attention_entropy"),
        storage_options={"anon": True},
    )
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(EvaluateConfig)}
    defaults = build_parser().parse_args(
        ["evaluate", "s/", "--truth", "t", "--truth-column", "c", "--report", "r"]
    )
    assert from_args(defaults, EvaluateConfig) == EvaluateConfig("s/", "t", "c", "r")


def test_cli_prints_one_line_and_exits_0_or_2(score_output, truth_csv, tmp_path, capsys):
    argv = [
        "evaluate",
        str(score_output),
        "--truth",
        str(truth_csv),
        "--truth-column",
        "hr",
        "--report",
        str(tmp_path / "cli"),
        "--bootstrap",
        "100",
        "--group-by",
        "category",
        "--split-half-columns",
        "half_a",
        "half_b",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("memscore: evaluated 35 of 38 matched rows: Spearman rho ")
    assert "split-half ceiling" in out and out.endswith(str(tmp_path / "cli"))
    assert main([*argv[:4], "--truth-column", "missing", *argv[6:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memscore: error: --truth ")
    assert main(["evaluate", str(tmp_path / "absent"), *argv[2:]]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_the_job_entrypoint_takes_the_cli_options(score_output, truth_csv, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "memscore_job_evaluate", ROOT / "jobs" / "evaluate.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = [
        str(score_output),
        "--truth",
        str(truth_csv),
        "--truth-column",
        "hr",
        "--report",
        str(tmp_path / "job"),
        "--bootstrap",
        "50",
    ]
    args = job.parse_args(argv)
    assert from_args(args, EvaluateConfig) == from_args(
        build_parser().parse_args(["evaluate", *argv]), EvaluateConfig
    )
    assert job.main(args) == 0
    assert (tmp_path / "job" / "report.md").exists()
    assert job.main(job.parse_args([*argv[:3], "--truth-column", "nope", *argv[5:]])) == 2


# --- trace columns: one value per layer -------------------------------------------------------

TRACE_N = 60


def _trace_truth(i: int) -> float:
    return round(0.4 + 0.5 * ((i * 17) % TRACE_N) / TRACE_N, 3)


def _planted_layers(i: int, length: int, weights, seed: int) -> list[float]:
    """Layer k = weights[k] * truth + noise: a planted correlation whose sign and strength
    change with the layer (weight 0: pure noise; None: the same value for every image)."""
    rng = np.random.default_rng(seed * 1000 + i)
    noise = rng.normal(0, 0.1, length)
    return [
        0.25 if w is None else w * _trace_truth(i) + noise[k]
        for k, w in enumerate(weights[:length])
    ]


@pytest.fixture
def traces_output(tmp_path) -> tuple[Path, Path, dict]:
    """A traces run's output (list<float32> columns, a scalar autoencoder loss) and its truth.

    Rows 0 and 1 have null lists (not scored), row 2 a short clip_cls_mean list, row 3 a null
    value at clip_cls_mean's layer 2, row 4 no ground truth.
    """
    out = tmp_path / "traces"
    out.mkdir()
    cls_mean, delta, entropy, loss = [], [], [], []
    for i in range(TRACE_N):
        mean = _planted_layers(i, 5, [None, 3.0, -1.0, 0.0, 0.5], seed=1)
        if i == 2:
            mean = mean[:3]
        if i == 3:
            mean[2] = None
        cls_mean.append(None if i < 2 else mean)
        delta.append(None if i < 2 else _planted_layers(i, 4, [0.2, -2.0, 1.0, 0.0], seed=2))
        entropy.append(None if i < 2 else _planted_layers(i, 4, [-0.5, 0.0, 1.5, 4.0], seed=3))
        loss.append(None if i < 2 else 80.0 + 120.0 * _trace_truth(i) + (i % 7) * 4.0)
    floats = pa.list_(pa.float32())
    table = pa.table(
        {
            "path": [_path(i) for i in range(TRACE_N)],
            "clip_cls_mean": pa.array(cls_mean, floats),
            "clip_cls_delta": pa.array(delta, floats),
            "dinov2_attention_entropy": pa.array(entropy, floats),
            "clip_sae_loss": pa.array(loss, pa.float32()),
            "memscore_error": [("decode failed" if i < 2 else None) for i in range(TRACE_N)],
        }
    )
    pq.write_table(table.slice(0, 25), out / "part-00000.parquet")
    pq.write_table(table.slice(25), out / "part-00001.parquet")
    (out / "_memscore.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "models": [
                    {
                        "model": "clip-traces",
                        "weights": "openai/clip-vit-base-patch32",
                        "output_columns": ["clip_cls_mean", "clip_cls_delta"],
                    },
                    {
                        "model": "clip-sae",
                        "weights": "/runs/sae/best",
                        "output_column": "clip_sae_loss",
                    },
                ],
            }
        )
    )
    truth = tmp_path / "truth.csv"
    truth.write_text(
        "path,hr\n"
        + "".join(f"{_path(i)},{'' if i == 4 else _trace_truth(i)}\n" for i in range(TRACE_N))
    )
    columns = {
        name: table.column(name).to_pylist()
        for name in ("clip_cls_mean", "clip_cls_delta", "dinov2_attention_entropy")
    }
    return out, truth, columns


def _expected_layer_rhos(lists, length: int) -> list[tuple[int, float]]:
    """(n, scipy's rho) per layer, from the lists as written: rows with a list of ``length``
    values and a ground truth, each layer without its null values."""
    expected = []
    for k in range(length):
        pairs = [
            (lst[k], _trace_truth(i))
            for i, lst in enumerate(lists)
            if lst is not None and len(lst) == length and i != 4 and lst[k] is not None
        ]
        x, y = np.array(pairs, dtype=np.float64).T
        constant = np.ptp(x) == 0  # scipy warns and gives nan; memscore reports null
        expected.append((len(pairs), float("nan") if constant else stats.spearmanr(x, y).statistic))
    return expected


def test_each_layer_of_a_trace_column_is_scipys_spearman(traces_output, tmp_path):
    out, truth, columns = traces_output
    result = evaluate(
        EvaluateConfig(
            str(out),
            str(truth),
            "hr",
            str(tmp_path / "r"),
            prediction_column="clip_sae_loss",
            trace_columns="all",
            bootstrap=300,
            seed=2,
        )
    )
    traces = result["traces"]
    assert list(traces) == ["clip_cls_mean", "clip_cls_delta", "dinov2_attention_entropy"]
    for name, length in (
        ("clip_cls_mean", 5),
        ("clip_cls_delta", 4),
        ("dinov2_attention_entropy", 4),
    ):
        figures = traces[name]
        assert figures["layers_in_column"] == length
        for layer, (n, rho) in zip(figures["layers"], _expected_layer_rhos(columns[name], length)):
            assert layer["n"] == n, (name, layer["index"])
            if np.isnan(rho):
                assert layer["spearman"] is None and layer["spearman_ci95"] == [None, None]
                continue
            assert layer["spearman"] == pytest.approx(rho, abs=1e-12), (name, layer["index"])
            lo, hi = layer["spearman_ci95"]
            assert lo <= layer["spearman"] <= hi
    # The planted correlations: layer 0 of cls_mean is constant, layer 1 strong, 3 noise.
    mean = traces["clip_cls_mean"]
    assert mean["layers"][0]["spearman"] is None
    assert mean["layers"][1]["spearman"] > 0.9 and abs(mean["layers"][3]["spearman"]) < 0.5
    assert mean["strongest"]["index"] == 1
    assert traces["clip_cls_delta"]["strongest"]["spearman"] < -0.9
    assert mean["encoder"] == "clip" and mean["feature"] == "cls_mean"
    assert mean["model"]["model"] == "clip-traces"
    # Rows left out, and why: null lists, a short list, a missing truth, a missing value.
    assert mean["counts"] == {
        "matched": 60,
        "excluded_null_list": 2,
        "excluded_other_length": 1,
        "excluded_null_truth": 1,
        "evaluated": 56,
    }
    assert mean["list_lengths"] == {"3": 1, "5": 57}
    assert [layer["n"] for layer in mean["layers"]] == [56, 56, 55, 56, 56]
    assert traces["clip_cls_delta"]["counts"]["evaluated"] == 57
    assert any(
        "clip_cls_mean: 1 matched row(s) have lists of another length than the "
        "column's 5 layers (lengths seen in the predictions: 3 (1))" in w
        for w in result["warnings"]
    )
    # The change from layer i to i+1 is layer i + 1, as the paper draws it.
    assert [(layer["index"], layer["layer"]) for layer in traces["clip_cls_delta"]["layers"]] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
    ]
    # The scalar column beside them: the usual figures, on its own scale.
    valid = [i for i in range(2, TRACE_N) if i != 4]
    loss = np.array(
        [np.float32(80.0 + 120.0 * _trace_truth(i) + (i % 7) * 4.0) for i in valid],
        dtype=np.float64,
    )
    assert result["overall"]["spearman"] == pytest.approx(
        stats.spearmanr(loss, [_trace_truth(i) for i in valid]).statistic, abs=1e-12
    )
    assert result["model"]["model"] == "clip-sae"
    # A loss is not a memorability score: no MSE against one.
    assert result["overall"]["on_truth_scale"] is False
    assert result["overall"]["mse"] is None and result["overall"]["mae"] is None


def test_trace_report_lists_every_layer_and_draws_the_curves(traces_output, tmp_path):
    out, truth, _ = traces_output
    report = tmp_path / "r"
    result = evaluate(
        EvaluateConfig(
            str(out),
            str(truth),
            "hr",
            str(report),
            prediction_column="clip_sae_loss",
            trace_columns="all",
            bootstrap=100,
        )
    )
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES.values())
    assert json.loads((report / "metrics.json").read_text()) == result
    text = (report / "report.md").read_text()
    assert "## Per-layer traces" in text and "](layers.png)" in text
    assert "| `clip_cls_mean` | 5 | 56 | 2 | 1 | 1 | 1: " in text
    assert "### `cls_mean`" in text and "| layer | clip ρ [95% CI] |" in text
    mean = result["traces"]["clip_cls_mean"]["layers"]
    for layer in mean[1:]:
        assert f"| {layer['layer']} | {_rho_text_of(layer)}" in text
    assert "| 0 | – |" in text  # the constant layer: no rho
    assert "(n 55)" in text  # the layer with a missing value says its n
    assert "is on another scale than the ground truth" in text
    for label in ("0-1", "1-2", "2-3", "3-4"):
        assert f"| {label} | " in text
    assert "### `attention_entropy`" in text and "| layer | dinov2 ρ [95% CI] |" in text
    for name in ("layers.png", "scatter.png", "distribution.png"):
        data = (report / name).read_bytes()
        Image.open(io.BytesIO(data)).verify()
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.width >= 500 and image.height >= 400, name
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, name


def _rho_text_of(layer: dict) -> str:
    lo, hi = layer["spearman_ci95"]
    return f"{layer['spearman']:.3f} [{lo:.3f}, {hi:.3f}]"


def test_traces_alone_and_named_columns(traces_output, tmp_path, capsys):
    out, truth, _ = traces_output
    result = evaluate(
        EvaluateConfig(
            str(out),
            str(truth),
            "hr",
            str(tmp_path / "t"),
            trace_columns="dinov2_attention_entropy",
            bootstrap=50,
        )
    )
    assert result["prediction_column"] is None and result["overall"] is None
    assert list(result["traces"]) == ["dinov2_attention_entropy"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "layers.png",
        "metrics.json",
        "report.md",
    ]
    assert "## Figures" not in (tmp_path / "t" / "report.md").read_text()
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--truth",
                str(truth),
                "--truth-column",
                "hr",
                "--report",
                str(tmp_path / "cli"),
                "--trace-columns",
                "all",
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("memscore: 3 trace column(s) of 60 matched rows, strongest ")
    assert "\n" not in line


def _with_prefix(out: Path, target: Path, prefix: str, *, summary: bool = True) -> Path:
    """The traces run ``out`` as `memscore score --column-prefix PREFIX` writes it: the
    models' columns renamed, and the summary recording the prefix and the renamed columns
    (``summary=False``: one Parquet file, as a run's rows copied elsewhere)."""

    def renamed(name: str) -> str:
        return prefix + name if name.startswith(("clip_", "dinov2_")) else name

    table = pq.read_table(sorted(out.glob("*.parquet")))
    table = table.rename_columns([renamed(c) for c in table.column_names])
    if not summary:
        pq.write_table(table, target)
        return target
    target.mkdir()
    pq.write_table(table.slice(0, 25), target / "part-00000.parquet")
    pq.write_table(table.slice(25), target / "part-00001.parquet")
    record = json.loads((out / "_memscore.json").read_text())
    record["models"].append(
        {
            "model": "dinov2-traces",
            "weights": "facebook/dinov2-base",
            "output_columns": ["dinov2_attention_entropy"],
        }
    )
    for model in record["models"]:
        if "output_columns" in model:
            model["output_columns"] = [renamed(c) for c in model["output_columns"]]
        else:
            model["output_column"] = renamed(model["output_column"])
    record["config"] = {"column_prefix": prefix, "path_column": "path"}
    (target / "_memscore.json").write_text(json.dumps(record))
    return target


def test_a_column_prefix_is_read_off_before_the_encoder_and_feature(traces_output, tmp_path):
    """`--column-prefix pred_` (as a manifest with its own memorability column needs) must not
    make `pred` an encoder: the run's summary records the prefix, and a table without one is
    read by the known encoder and feature names after whatever prefix."""
    out, truth, _ = traces_output

    def run(predictions: Path, report: str) -> dict:
        return evaluate(
            EvaluateConfig(
                str(predictions),
                str(truth),
                "hr",
                str(tmp_path / report),
                trace_columns="all",
                bootstrap=50,
                seed=1,
            )
        )

    plain = run(out, "plain")
    prefixed = run(_with_prefix(out, tmp_path / "pred", "pred_"), "pred")
    # no summary, and a prefix that does not end in "_" before an encoder with a digit
    loose = run(_with_prefix(out, tmp_path / "loose.parquet", "m2_", summary=False), "loose")
    for result, prefix in ((prefixed, "pred_"), (loose, "m2_")):
        assert list(result["traces"]) == [prefix + name for name in plain["traces"]]
        for name, want in plain["traces"].items():
            got = result["traces"][prefix + name]
            assert (got["encoder"], got["feature"]) == (want["encoder"], want["feature"]), name
            assert got["layers"] == want["layers"] and got["strongest"] == want["strongest"]
        # cls_delta's list index i is the change to layer i + 1, as for any run
        assert [
            layer["layer"] for layer in result["traces"][prefix + "clip_cls_delta"]["layers"]
        ] == [1, 2, 3, 4]
        # one panel per feature, one curve per encoder: the same figure as the plain run's
        assert (tmp_path / result["report"] / "layers.png").read_bytes() == (
            tmp_path / "plain" / "layers.png"
        ).read_bytes()
        text = (tmp_path / result["report"] / "report.md").read_text()
        assert "### `cls_delta`" in text and "| layer | clip ρ [95% CI] |" in text
        assert "| layer | dinov2 ρ [95% CI] |" in text and "| 0-1 | " in text
        assert "### `" + prefix not in text and f"| {prefix.rstrip('_')} ρ" not in text
    assert prefixed["traces"]["pred_clip_cls_mean"]["model"]["model"] == "clip-traces"
    assert prefixed["traces"]["pred_dinov2_attention_entropy"]["model"]["model"] == "dinov2-traces"


def test_a_reused_report_folder_holds_only_this_reports_files(traces_output, tmp_path):
    """Files of a report's names (REPORT_FILES) that this report does not write are removed;
    anything else in the folder, and a folder left by a failed evaluation, stays as it was."""
    out, truth, _ = traces_output
    report = tmp_path / "report"
    (report / "old").mkdir(parents=True)
    foreign = {"notes.txt": b"mine", "layers.png.bak": b"mine too", "old/layers.png": b"and mine"}
    for name, data in foreign.items():
        (report / name).write_bytes(data)

    def run(**options) -> dict:
        return evaluate(
            EvaluateConfig(str(out), str(truth), "hr", str(report), bootstrap=20, **options)
        )

    def files() -> dict[str, bytes]:
        return {
            p.relative_to(report).as_posix(): p.read_bytes()
            for p in report.rglob("*")
            if p.is_file()
        }

    everything = run(prediction_column="clip_sae_loss", trace_columns="all")
    assert set(files()) == {*REPORT_FILES.values(), *foreign}
    assert set(everything["files"].values()) == set(REPORT_FILES.values())
    before = files()
    with pytest.raises(MemscoreError, match="no column 'nope'"):
        run(prediction_column="nope")
    assert files() == before

    plain = run(prediction_column="clip_sae_loss")  # no trace columns: no layers.png
    assert set(files()) == {
        "report.md",
        "metrics.json",
        "distribution.png",
        "scatter.png",
        *foreign,
    }
    assert set(plain["files"].values()) == set(files()) - set(foreign)
    assert "layers.png" not in (report / "report.md").read_text()

    traces = run(trace_columns="dinov2_attention_entropy")  # traces alone: no scalar figures
    assert set(files()) == {"report.md", "metrics.json", "layers.png", *foreign}
    assert json.loads((report / "metrics.json").read_text()) == traces
    assert "](distribution.png)" not in (report / "report.md").read_text()
    image = Image.open(report / "layers.png")
    assert image.format == "PNG" and image.width >= 500
    assert traces["traces"]["dinov2_attention_entropy"]["layers_in_column"] == 4
    assert {name: files()[name] for name in foreign} == foreign


def test_trace_columns_from_json_lines(tmp_path):
    """Lists read from JSON lines (no memscore run): ints and floats, nulls in lists."""
    rng = np.random.default_rng(4)
    truth = rng.random(30)
    lines = [
        json.dumps(
            {
                "path": f"{i}.jpg",
                "hr": float(truth[i]),
                "x_depth": [
                    float(truth[i] + rng.normal(0, 0.2)),
                    int(i % 3),
                    None if i == 0 else float(-truth[i]),
                ],
            }
        )
        for i in range(30)
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    result = evaluate(
        EvaluateConfig(
            str(tmp_path / "p.jsonl"),
            str(tmp_path / "p.jsonl"),
            "hr",
            str(tmp_path / "j"),
            trace_columns="x_depth",
            bootstrap=0,
        )
    )
    layers = result["traces"]["x_depth"]["layers"]
    assert layers[2]["spearman"] == pytest.approx(-1.0) and layers[2]["n"] == 29
    values = [json.loads(line)["x_depth"][1] for line in lines]
    assert layers[1]["spearman"] == pytest.approx(stats.spearmanr(values, truth).statistic)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"trace_columns": "clip_sae_loss"},
            "column 'clip_sae_loss' is float, not a list of numbers; --trace-columns takes list columns",
        ),
        ({"trace_columns": "clip_nope"}, "no column 'clip_nope'"),
        (
            {"prediction_column": "clip_cls_mean"},
            "column 'clip_cls_mean' is a list column (one value per layer): name it in --trace-columns",
        ),
        ({"trace_columns": "all,clip_cls_mean"}, "--trace-columns all takes no other names"),
        (
            {"trace_columns": "all", "group_by": ("path",)},
            "--group-by and --split-half-columns report the figures of --prediction-column",
        ),
        (
            {"trace_columns": "clip_cls_mean", "prediction_column": "clip_cls_mean"},
            "named both as --prediction-column",
        ),
    ],
)
def test_trace_column_errors_are_one_line(traces_output, tmp_path, change, message):
    out, truth, _ = traces_output
    with pytest.raises(MemscoreError) as caught:
        evaluate(EvaluateConfig(str(out), str(truth), "hr", str(tmp_path / "e"), **change))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_all_finds_no_list_column_in_a_scalar_run(score_output, truth_csv, tmp_path):
    with pytest.raises(MemscoreError, match="--trace-columns all: no list column of numbers"):
        evaluate(_config(score_output, truth_csv, tmp_path, trace_columns="all"))


def test_predictions_off_the_truths_scale_get_their_own_axis():
    truth = np.linspace(0.3, 0.95, 50)
    assert metrics.on_one_scale(truth * 0.9 + 0.1, truth)
    assert metrics.on_one_scale(np.array([-0.4, 1.6]), truth)  # a regression model's overshoot
    assert not metrics.on_one_scale(80 + 100 * truth, truth)  # an autoencoder's loss
