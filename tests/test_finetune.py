"""Fine-tuning with Ray Train on a real local Ray, CPU: learning, splits, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from processes import kill_after_first_train_checkpoint, ray_processes
from synthetic import write_tint_dataset

import memscore
from memscore.cli import main
from memscore.config import TRAINING_DEFAULTS, FinetuneConfig, MemscoreError
from memscore.evaluation.metrics import spearman
from memscore.finetuning.job import LABELLED_ROW, ROW, SPLIT, finetune
from memscore.finetuning.splits import assign_splits, normalise_split_column, parse_fractions
from memscore.models import get_model, get_model_weights
from memscore.models.checkpoint import read_checkpoint_info

IMAGES = 160
BAD_ROWS = [  # two unreadable images and three rows without a usable label
    {"path": "images/missing.png", "memorability": "0.5", "category": "cool"},
    {"path": "images/corrupt.png", "memorability": "0.6", "category": "warm"},
    {"path": "images/img_0000.png", "memorability": "", "category": "cool"},
    {"path": "images/img_0001.png", "memorability": "n/a", "category": "warm"},
    # Arrow reads the whole column as text because of this one: every label is parsed
    {"path": "images/img_0002.png", "memorability": "abc", "category": "warm"},
]


def memnet_config(manifest: Path, output: Path, **overrides) -> FinetuneConfig:
    """MemNet from scratch with the default optimiser, learning rate and batch size."""
    settings = dict(
        name="tint", model="memnet", epochs=4, patience=8, rows_per_block=64, decode_batch_size=32
    )
    settings.update(overrides)
    return FinetuneConfig(str(manifest), output=str(output), **settings)


@pytest.fixture(scope="module")
def tint_run(tmp_path_factory, ray_local):
    """MemNet trained from scratch, with the defaults, on images whose label is the strength
    of their tint. (The defaults before issue 15, SGD at lr 1e-3 on batches of 32, left the
    validation Spearman at -0.86 after 6 epochs on 240 such images.)"""
    folder = tmp_path_factory.mktemp("tint")
    manifest = write_tint_dataset(folder, IMAGES, extra_rows=BAD_ROWS)
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    config = memnet_config(manifest, folder / "runs")
    summary = finetune(config)
    return {
        "folder": folder,
        "manifest": manifest,
        "config": config,
        "summary": summary,
        "run": folder / "runs" / "tint",
    }


def test_memnet_from_scratch_learns_to_rank_what_its_random_start_ranks_wrongly(tint_run):
    summary, run = tint_run["summary"], tint_run["run"]
    validation = pq.read_table(run / "splits" / "validation.parquet")
    # The same random start as the trainer's (seed 0, rank 0), scored on the validation images.
    torch.manual_seed(0)
    untrained = get_model("memnet", weights=None, mode="modern")
    pre = get_model_weights("memnet").MODERN.transforms
    with torch.inference_mode():
        before = untrained(
            torch.stack(
                [pre(Image.open(p).convert("RGB")) for p in validation.column("path").to_pylist()]
            )
        )
    labels = validation.column("memorability").to_numpy()
    assert spearman(before.numpy(), labels) < 0.5  # about -0.9: it ranks them the wrong way

    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(len(history)))
    assert summary["best"]["val_spearman"] > 0.8, history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["pipeline"] == "MODERN" and summary["started_from"] == "scratch"
    assert summary["warnings"] == []


def test_the_defaults_are_chosen_by_the_start_and_recorded(tint_run):
    summary, run = tint_run["summary"], tint_run["run"]
    chosen = {
        "start": "scratch",
        "defaulted": ["optimizer", "lr", "batch_size"],
        **TRAINING_DEFAULTS["scratch"],
    }
    assert summary["training_defaults"] == chosen
    assert {k: summary["config"][k] for k in TRAINING_DEFAULTS["scratch"]} == TRAINING_DEFAULTS[
        "scratch"
    ]
    on_disk = json.loads((run / "finetune.json").read_text())
    assert on_disk["training_defaults"] == chosen
    training = read_checkpoint_info(str(run / "best"))["training"]
    assert {k: training[k] for k in TRAINING_DEFAULTS["scratch"]} == TRAINING_DEFAULTS["scratch"]
    # published weights, a checkpoint and M3M's start from ResMem adapt: the other column
    config = FinetuneConfig("x.csv", output="o", lr=0.5)
    for start in ("RETRAIN", str(run / "best"), "resmem-init"):
        adapted = config.with_training_defaults(start)
        assert (adapted.optimizer, adapted.lr, adapted.batch_size) == (
            TRAINING_DEFAULTS["pretrained"]["optimizer"],
            0.5,
            TRAINING_DEFAULTS["pretrained"]["batch_size"],
        )


def test_help_names_the_defaults_of_each_start(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, name in (("--lr", "lr"), ("--batch-size", "batch_size")):
        scratch, pretrained = (TRAINING_DEFAULTS[k][name] for k in ("scratch", "pretrained"))
        assert scratch != pretrained
        assert (
            f"(default: {scratch} from scratch, {pretrained} from published weights"
            in text.split(f" {flag} ", 1)[1]
        )
    assert f"or adamw (default: {TRAINING_DEFAULTS['scratch']['optimizer']})" in text


def test_the_test_split_is_scored_with_the_best_checkpoint_and_evaluated(tint_run):
    summary, run = tint_run["summary"], tint_run["run"]
    test = summary["test"]
    overall = test["metrics"]["overall"]
    scores = pq.read_table(list((run / "test_scores").glob("*.parquet")))
    truth = pq.read_table(run / "splits" / "test.parquet")
    joined = scores.join(truth.select([LABELLED_ROW, "memorability"]), keys=LABELLED_ROW).filter(
        pc.is_valid(pc.field("memorability_memnet"))
    )
    assert overall["n"] == joined.num_rows > 5
    expected = spearman(
        joined.column("memorability_memnet").to_numpy(), joined.column("memorability").to_numpy()
    )
    assert overall["spearman"] == pytest.approx(expected, abs=1e-12)
    with Image.open(run / "test_report" / "distribution.png") as image:
        assert image.size[0] > 300
    assert (
        json.loads((run / "test_report" / "metrics.json").read_text())["overall"]["n"]
        == overall["n"]
    )


def test_rows_without_label_or_image_are_skipped_and_counted(tint_run):
    summary, run = tint_run["summary"], tint_run["run"]
    assert summary["rows_in"] == IMAGES + len(BAD_ROWS)
    assert summary["rows_without_label"] == 3
    assert summary["label_problem_kinds"] == {"no label": 2, "non-numeric label": 1}
    splits = {
        s: pq.read_table(run / "splits" / f"{s}.parquet") for s in ("train", "validation", "test")
    }
    assert sum(t.num_rows for t in splits.values()) == IMAGES + 2  # labelled rows, each once
    # the text column's labels are kept as the numbers they are
    assert all(t.schema.field("memorability").type == pa.float64() for t in splits.values())
    rows = pa.concat_tables(splits.values()).column(ROW).to_pylist()
    assert sorted(rows) == sorted(set(rows))
    test_errors = pq.read_table(list((run / "test_scores").glob("*.parquet"))).column(
        "memscore_error"
    )
    image_errors = (
        sum(summary["rows_with_image_errors"].values())
        + test_errors.length()
        - test_errors.null_count
    )
    assert image_errors == 2
    kinds = {k for split in summary["image_error_kinds"].values() for k in split}
    kinds |= {e.split(":")[0] for e in test_errors.drop_null().to_pylist()}
    assert kinds == {"missing file", "not an image"}


def test_a_checkpoint_scores_as_the_trainer_saw_it_on_validation(tint_run, tmp_path):
    run = tint_run["run"]
    info = read_checkpoint_info(str(run / "best"))
    assert info["model"] == "memnet" and info["weights"] == "MODERN"
    assert info["manifest_fingerprint"] and info["training"]["epochs"] == 4
    seen = pq.read_table(run / "best" / "validation_predictions.parquet")
    summary = memscore.score(
        memscore.ScoreConfig(
            str(run / "splits" / "validation_images.parquet"),
            output=str(tmp_path / "scores"),
            models=("memnet",),
            weights=str(run / "best"),
        )
    )
    assert (
        summary["rows_out"]
        == pq.read_metadata(run / "splits" / "validation_images.parquet").num_rows
    )
    scored = pq.read_table(list((tmp_path / "scores").glob("*.parquet")))
    joined = seen.join(
        scored.select([LABELLED_ROW, "memorability_memnet"]), keys=ROW, right_keys=LABELLED_ROW
    )
    assert joined.num_rows == seen.num_rows
    np.testing.assert_allclose(
        joined.column("memorability_memnet").to_numpy(),
        joined.column("prediction").to_numpy(),
        atol=1e-5,
    )
    # and through the registry, strictly
    model = memscore.get_model("memnet", weights=str(run / "best"))
    assert model.mode == "modern"


def test_the_split_is_a_stable_hash_of_the_path(tint_run):
    run, config = tint_run["run"], tint_run["config"]
    table = pa.concat_tables(
        pq.read_table(run / "splits" / f"{s}.parquet") for s in ("train", "validation", "test")
    )
    original = pyarrow.csv.read_csv(tint_run["manifest"]).column("path").take(table.column(ROW))
    again = assign_splits(original, parse_fractions(config.split_fractions), config.split_seed)
    assert again.to_pylist() == table.column(SPLIT).to_pylist()
    counts = {s: table.column(SPLIT).to_pylist().count(s) for s in ("train", "validation", "test")}
    assert 0.7 < counts["train"] / table.num_rows < 0.9  # 0.8 of 162, give or take the hash


def test_a_finished_run_is_reported_again_and_a_different_one_is_refused(tint_run):
    clock = time.perf_counter()
    again = finetune(tint_run["config"])
    assert again["finished_at"] == tint_run["summary"]["finished_at"]
    assert time.perf_counter() - clock < 30
    # what each call did (the CLI's "already complete: nothing to do"), not part of the file
    assert tint_run["summary"]["work_done"] is True and again["work_done"] is False
    assert "work_done" not in json.loads((tint_run["run"] / "finetune.json").read_text())
    other = memnet_config(tint_run["manifest"], tint_run["folder"] / "runs", lr=0.5)
    with pytest.raises(MemscoreError, match="other settings \\(lr differ"):
        finetune(other)


def test_split_helpers_refuse_what_they_cannot_split():
    assert parse_fractions("0.7,0.3,0") == (0.7, 0.3, 0.0)
    for bad in ("0.5,0.5", "0.8,0.1,0.2", "1,0,0", "a,b,c"):
        with pytest.raises(ValueError):
            parse_fractions(bad)
    assert normalise_split_column(pa.array(["Train", " val", "TEST", "dev"]), "s").to_pylist() == [
        "train",
        "validation",
        "test",
        "validation",
    ]
    with pytest.raises(ValueError, match="holds 'holdout'"):
        normalise_split_column(pa.array(["train", "holdout"]), "s")


def test_bad_settings_are_one_line_errors(tmp_path):
    manifest = write_tint_dataset(tmp_path, 6)
    cases = {
        "unknown model 'nope'": dict(model="nope"),
        "--mode must be head or full": dict(mode="half"),
        "--augment: unknown rotate": dict(augment="crop,rotate"),
        "--split-fractions": dict(split_fractions="0.9,0.2,0"),
        "no --label-column 'score'": dict(label_column="score"),
        "no --split-column 'fold'": dict(split_column="fold"),
    }
    for message, overrides in cases.items():
        with pytest.raises(MemscoreError, match=message):
            finetune(
                FinetuneConfig(
                    str(manifest), output=str(tmp_path / "o"), **{"model": "memnet", **overrides}
                )
            )


def _run_cli(manifest: Path, output: Path, *extra: str, env=None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "memscore.cli",
        "finetune",
        str(manifest),
        "--output",
        str(output),
        "--name",
        "two",
        "--model",
        "memnet",
        "--epochs",
        "3",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--rows-per-block",
        "16",
        *extra,
    ]
    return subprocess.Popen(
        command,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_workers_killed_mid_run_resume_from_the_saved_epoch(tmp_path):
    manifest = write_tint_dataset(tmp_path, 48, seed=1)
    output = tmp_path / "runs"
    ray_before = set(ray_processes())
    # Rank 0 trains epoch 0, reports its checkpoint, then stalls at the start of epoch 1.
    fault = {"MEMSCORE_INJECT_FAULT": f"train-epoch:stall-after-once:{tmp_path / 'fired'}"}
    driver = _run_cli(manifest, output, env=fault)
    kill_after_first_train_checkpoint(driver, output / "two", ray_before)
    history = json.loads((output / "two" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0]

    again = _run_cli(manifest, output)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    summary = json.loads((output / "two" / "finetune.json").read_text())
    assert summary["starts"] == [0, 1]  # the second start began at epoch 1, not 0
    assert summary["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert summary["history"][0] == history[0]  # epoch 0 was not trained again
    assert summary["workers"] == 2 and all(h["train_rows"] > 0 for h in summary["history"])
    assert summary["best"]["val_spearman"] is not None


@pytest.fixture(scope="module")
def photo_manifest(tmp_path_factory, example_images):
    """Real photos with made-up labels: enough to take a training step with ResMem."""
    folder = tmp_path_factory.mktemp("photos")
    more = Path(__file__).parent / "data" / "images"
    photos = sorted(example_images) + sorted(
        p for p in more.iterdir() if p.suffix in (".png", ".jpg")
    )
    rows = [
        {"path": str(p), "memorability": 0.5 + 0.4 * (i % 5) / 4, "split": ("train", "val")[i % 2]}
        for i, p in enumerate(photos[:8])
    ]
    manifest = folder / "labels.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


@pytest.mark.parametrize("mode", ["head", "full"])
def test_head_mode_keeps_every_resnet_tensor_and_full_mode_retrains_it(
    mode, photo_manifest, tmp_path, ray_local
):
    from safetensors.torch import load_file

    summary = finetune(
        FinetuneConfig(
            str(photo_manifest),
            output=str(tmp_path),
            name=mode,
            model="resmem",
            mode=mode,
            split_column="split",
            epochs=1,
            batch_size=4,
            lr=0.01,
            augment="none",
        )
    )
    assert summary["started_from"] == "RETRAIN" and summary["rows_per_split"]["train"] == 4
    trained = load_file(str(tmp_path / mode / "best" / "model.safetensors"))
    published = get_model_weights("resmem").DEFAULT.load_state_dict()
    assert trained.keys() == published.keys()
    resnet = [k for k in published if k.startswith("features.")]
    same = [k for k in resnet if torch.equal(trained[k], published[k])]
    head_changed = not torch.equal(trained["fc6.weight"], published["fc6.weight"])
    assert head_changed
    if mode == "head":
        assert same == resnet  # parameters and BatchNorm statistics, bit for bit
    else:
        assert len(same) < len(resnet) // 2


def test_m3m_trains_from_resmem_with_its_segmentation_branch_frozen(
    photo_manifest, tmp_path, monkeypatch, ray_local
):
    from safetensors.torch import load_file
    from torchvision.models.segmentation import fcn_resnet50

    from memscore.models.m3m import FCN_ENV, FCN_FILENAME

    torch.manual_seed(1)  # a stand-in for torchvision's published FCN file (no network here)
    fcn = fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).state_dict()
    torch.save(fcn, tmp_path / FCN_FILENAME)
    monkeypatch.setenv(FCN_ENV, str(tmp_path / FCN_FILENAME))  # the driver finds it ...

    summary = finetune(
        FinetuneConfig(
            str(photo_manifest),
            output=str(tmp_path / "runs"),
            name="m3m",
            model="m3m",
            split_column="split",
            epochs=1,
            batch_size=4,
            lr=0.01,
            augment="none",
        )
    )
    assert summary["started_from"] == "resmem-init" and summary["epochs_run"] == 1
    trained = load_file(str(tmp_path / "runs" / "m3m" / "best" / "model.safetensors"))
    # ... and the workers loaded that file, and training left it (and the ResNet) untouched
    for key, value in fcn.items():
        if not key.startswith("aux_classifier."):
            assert torch.equal(trained[f"segmentation.{key}"], value), key
    published = get_model_weights("resmem").DEFAULT.load_state_dict()
    assert all(
        torch.equal(trained[k], v) for k, v in published.items() if k.startswith("features.")
    )
    # fc6's columns for the segmentation features start at zero: a step moved them
    assert trained["fc6.weight"][:, 9216 + 1000 :].abs().sum() > 0
    model = memscore.get_model("m3m", weights=str(tmp_path / "runs" / "m3m" / "best"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())


@pytest.mark.slow
def test_a_run_that_learns_nothing_ends_with_a_warning(tmp_path, ray_local, capsys):
    # A learning rate too small to move the random start, which ranks these images the wrong
    # way round (about -0.9): the run completes, and says that it learnt nothing.
    manifest = write_tint_dataset(tmp_path, 24, seed=2)
    rc = main(
        [
            "finetune",
            str(manifest),
            "--output",
            str(tmp_path / "runs"),
            "--name",
            "flat",
            "--model",
            "memnet",
            "--epochs",
            "1",
            "--lr",
            "1e-9",
            "--augment",
            "none",
            "--split-fractions",
            "0.5,0.5,0",
            "--rows-per-block",
            "16",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads((tmp_path / "runs" / "flat" / "finetune.json").read_text())
    assert summary["best"]["val_spearman"] < 0.1
    assert len(summary["warnings"]) == 1
    assert "the best validation Spearman is -0." in summary["warnings"][0]
    warnings = [line for line in err.splitlines() if line.startswith("memscore: warning:")]
    assert warnings == [f"memscore: warning: {summary['warnings'][0]}"]
    assert out.startswith("memscore: 1 epoch, best epoch 0 (validation Spearman ")
    assert "None" not in out and "no test rows" in out  # --split-fractions 0.5,0.5,0
    # an explicit option is kept, the others take the defaults of a start from scratch
    assert summary["training_defaults"] == {
        "start": "scratch",
        "defaulted": ["optimizer", "batch_size"],
        **TRAINING_DEFAULTS["scratch"],
        "lr": 1e-9,
    }


@pytest.mark.slow
def test_a_manifest_whose_paths_do_not_resolve_stops_with_one_line(
    tmp_path, ray_local, capsys, monkeypatch
):
    # The paths are relative to the folder the manifest was written from, not to the
    # manifest's own folder: every one resolves to ft/ft/images/... and is missing.
    write_tint_dataset(tmp_path / "ft", 20)
    rows = pyarrow.csv.read_csv(tmp_path / "ft" / "labels.csv")
    rows = rows.set_column(0, "path", pc.binary_join_element_wise("ft", rows.column("path"), "/"))
    pyarrow.csv.write_csv(rows, tmp_path / "ft" / "labels.csv")
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "finetune",
            "ft/labels.csv",
            "--output",
            "runs",
            "--model",
            "memnet",
            "--epochs",
            "1",
            "--split-fractions",
            "0.5,0.5,0",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and "memscore:" not in out  # no result line (Ray may print its own)
    ours = [line for line in err.splitlines() if line.startswith("memscore:")]  # not Ray's log
    assert len(ours) == 1, err[-3000:]
    error = ours[0]
    assert error.startswith("memscore: error: ") and "no train rows and no validation rows" in error
    assert "commonest problem: missing file (20 rows), e.g. " in error
    assert f"{tmp_path}/ft/ft/images/img_00" in error
    # refused before training: no state.json or splits/ to refuse the corrected command with
    assert not (tmp_path / "runs" / "finetune").exists()


def test_a_manifest_without_numeric_labels_stops_with_one_line(tmp_path):
    # Found before any image is read: every label is text that is not a number.
    manifest = write_tint_dataset(tmp_path, 8)
    rows = pyarrow.csv.read_csv(manifest)
    labels = pa.array(["abc"] * (rows.num_rows - 1) + [""], pa.string())
    pyarrow.csv.write_csv(rows.set_column(1, "memorability", labels), manifest)
    with pytest.raises(MemscoreError) as raised:
        finetune(
            FinetuneConfig(
                str(manifest),
                output=str(tmp_path / "runs"),
                model="memnet",
                split_fractions="0.5,0.5,0",
            )
        )
    message = str(raised.value)
    assert "\n" not in message and "0 of " in message
    assert "commonest problem: non-numeric label (" in message
    assert f"e.g. {tmp_path}/images/img_00" in message


def test_overwrite_never_deletes_a_folder_that_is_not_a_memscore_run(tmp_path):
    """--overwrite deletes a run folder memscore made (it holds state.json), never another."""
    from memscore.errors import MemscoreError
    from memscore.training.run_folder import check_run_folder, prepare_run_folder

    theirs = tmp_path / "runs" / "mine"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(MemscoreError, match="not a memscore finetune run"):
        prepare_run_folder(
            str(theirs),
            {"lr": 1},
            job="finetune",
            summary_file="f.json",
            is_complete=lambda s: True,
            overwrite=True,
        )
    assert (theirs / "notes.txt").read_text() == "keep me"

    ours = tmp_path / "runs" / "ours"
    # the checks alone write nothing: a run refused after them leaves no state behind
    assert (
        check_run_folder(
            str(ours), {"lr": 1}, job="finetune", summary_file="f.json", is_complete=lambda s: True
        )
        == "fresh"
    )
    assert not ours.exists()
    assert (
        prepare_run_folder(
            str(ours), {"lr": 1}, job="finetune", summary_file="f.json", is_complete=lambda s: True
        )
        == "fresh"
    )
    (ours / "f.json").write_text("{}")
    assert (
        prepare_run_folder(
            str(ours), {"lr": 1}, job="finetune", summary_file="f.json", is_complete=lambda s: True
        )
        == "complete"
    )
    with pytest.raises(MemscoreError, match="lr differ"):
        prepare_run_folder(
            str(ours), {"lr": 2}, job="finetune", summary_file="f.json", is_complete=lambda s: True
        )
    # --overwrite: the old run stays until the new one's checks pass and it starts
    assert (
        check_run_folder(
            str(ours),
            {"lr": 2},
            job="finetune",
            summary_file="f.json",
            is_complete=lambda s: True,
            overwrite=True,
        )
        == "fresh"
    )
    assert (ours / "f.json").exists()
    assert (
        prepare_run_folder(
            str(ours),
            {"lr": 2},
            job="finetune",
            summary_file="f.json",
            is_complete=lambda s: True,
            overwrite=True,
        )
        == "fresh"
    )
    assert not (ours / "f.json").exists()
