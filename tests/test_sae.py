"""The traces paper's sparse autoencoder: its loss, `memscore train-sae` on Ray Train (learning,
one worker against two, kill and resume) and `--model clip-sae` scoring, on tiny seeded random
encoders (tests/hf_encoders.py) and real image files. Ray runs are marked slow."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import torch
from hf_encoders import make_encoder_folder, reference_pixels
from PIL import Image
from processes import kill_after_first_train_checkpoint, ray_processes
from safetensors.torch import load_file
from synthetic import write_tint_dataset

from memscore.cli import build_parser
from memscore.columns import ERROR, ROW
from memscore.config import MemscoreError, TrainSAEConfig, add_arguments, from_args
from memscore.models import CheckpointKeyError, WeightsNotFoundError
from memscore.models.checkpoint import read_checkpoint_info
from memscore.models.registry import weights_for
from memscore.models.sae import (
    TENSOR_KEYS,
    SparseAutoencoder,
    load_sae,
    save_sae_checkpoint,
    training_loss,
)
from memscore.stages.decode import DecodeImages
from memscore.train_sae.job import train_sae, zscore_statistics
from memscore.train_sae.representations import REPRESENTATION, EncodeImages

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 40


# --- the autoencoder, without Ray -------------------------------------------------------------


def test_the_loss_is_the_papers_and_the_score_its_reconstruction_term():
    torch.manual_seed(3)
    sae = SparseAutoencoder(dim=12, latents=5)
    z = torch.randn(4, 12)
    # The paper's training step, as its script writes it.
    decoded = sae.fc2(torch.relu(sae.fc1(z)))
    expected = torch.nn.MSELoss(reduction="sum")(decoded, z) + 1e-5 * sae.fc1(z).abs().sum()
    loss, reconstruction = training_loss(sae, z, 1e-5)
    assert torch.allclose(loss, expected) and torch.allclose(
        reconstruction, ((decoded - z) ** 2).sum()
    )
    # Scoring: raw vectors are z-scored with the stored statistics first.
    x = torch.randn(4, 12) * 3 + 1
    with torch.no_grad():
        sae.mean.copy_(x.mean(0))
        sae.std.copy_(x.std(0))
    w1, b1, w2, b2 = (
        p.detach().numpy().astype(np.float64)
        for p in (sae.fc1.weight, sae.fc1.bias, sae.fc2.weight, sae.fc2.bias)
    )
    zn = (x.numpy() - x.mean(0).numpy()) / (x.std(0).numpy() + 1e-8)
    rec = np.maximum(zn @ w1.T + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(
        sae.reconstruction_error(x).detach().numpy(), ((rec - zn) ** 2).sum(1), rtol=1e-5
    )


def test_zscore_statistics_are_torchs_mean_and_std():
    x = np.random.default_rng(0).normal(2, 3, (50, 7)).astype(np.float32)
    mean, std = zscore_statistics(x)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(mean, t.mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(std, t.std(0).numpy(), rtol=1e-5)  # Bessel-corrected, as torch


def test_checkpoints_hold_exactly_the_six_tensors_and_load_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 4)
    save_sae_checkpoint(str(tmp_path / "best"), sae, encoder="clip", encoder_weights="/enc")
    assert sorted(load_file(str(tmp_path / "best" / "model.safetensors"))) == sorted(TENSOR_KEYS)
    info = read_checkpoint_info(str(tmp_path / "best"))
    assert (info["model"], info["encoder"], info["encoder_weights"], info["output_column"]) == (
        "clip-sae",
        "clip",
        "/enc",
        "clip_sae_loss",
    )
    loaded = load_sae(str(tmp_path / "best"))
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    tensors = {k: v.clone() for k, v in sae.state_dict().items()}
    save_file({**tensors, "extra": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointKeyError, match="unexpected: extra"):
        load_sae(str(tmp_path / "extra.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "std"}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointKeyError, match="missing: std"):
        load_sae(str(tmp_path / "m.safetensors"))


def test_encoder_actor_gives_each_images_representation(tmp_path, example_images):
    """The decode stage and EncodeImages, called as plain functions, equal transformers' own
    processor and the encoder on each image; a row whose image is missing keeps its error."""
    from transformers import Dinov2Model

    folder = make_encoder_folder("dinov2", tmp_path / "dinov2", seed=1)
    encode = EncodeImages("dinov2", str(folder), batch_size=2)
    paths = [str(p) for p in example_images[:3]] + [str(tmp_path / "missing.jpg")]
    table = pa.table({"path": paths, ROW: pa.array(range(4), pa.int64())})
    decoded = DecodeImages("path", {"dinov2": encode.preprocess})(table)
    out = encode(decoded)
    assert out.column(ERROR).to_pylist()[3].startswith("missing file")
    vectors = out.column(REPRESENTATION).to_pylist()
    assert vectors[3] is None and out.column_names[-1] == REPRESENTATION
    assert not any(c.startswith("__memscore") for c in out.column_names)
    model = Dinov2Model.from_pretrained(str(folder)).eval()
    for path, got in zip(paths[:3], vectors[:3]):
        pixels = reference_pixels("dinov2", folder, Image.open(path).convert("RGB"))
        with torch.inference_mode():
            # the paper's hidden_states[-1][:, 0]: before Dinov2Model's final layernorm
            expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][0, 0]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


# --- options ----------------------------------------------------------------------------------


def test_every_option_maps_onto_the_config_and_the_job_takes_the_same(tmp_path):
    argv = [
        "m.csv",
        "--output",
        "runs",
        "--encoder",
        "dinov2",
        "--name",
        "d",
        "--latents",
        "50",
        "--l1",
        "0",
        "--lr",
        "0.001",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--weights",
        "facebook/dinov2-base",
    ]
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainSAEConfig)
    config = from_args(parser.parse_args(argv), TrainSAEConfig)
    assert (
        config.encoder,
        config.latents,
        config.l1,
        config.lr,
        config.epochs,
        config.batch_size,
        config.workers,
        config.weights,
    ) == ("dinov2", 50, 0.0, 0.001, 2, 4, 2, "facebook/dinov2-base")  # an id stays an id
    assert {a.dest for a in parser._actions} - {"help"} == {
        f.name for f in dataclasses.fields(TrainSAEConfig)
    }
    assert from_args(build_parser().parse_args(["train-sae", *argv]), TrainSAEConfig) == config
    spec = importlib.util.spec_from_file_location("job_train_sae", ROOT / "jobs" / "train_sae.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert from_args(job.parse_args(argv), TrainSAEConfig) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder": "vit"}, "--encoder must be one of clip, dinov2, siglip2"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"name": "a/b"}, "--name 'a/b': use a plain folder name"),
        ({"weights": "/nowhere/clip"}, "--weights /nowhere/clip: no such folder"),
    ],
)
def test_bad_settings_are_one_line_before_any_ray_work(tmp_path, change, message):
    manifest = write_tint_dataset(tmp_path, 3)
    folder = make_encoder_folder("clip", tmp_path / "clip")
    settings = {"encoder": "clip", "weights": str(folder), **change}
    with pytest.raises(MemscoreError) as caught:
        train_sae(TrainSAEConfig(str(manifest), output=str(tmp_path / "runs"), **settings))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_scoring_weights_are_a_train_sae_checkpoint_of_that_encoder(tmp_path):
    folder = make_encoder_folder("clip", tmp_path / "clip")
    sae = SparseAutoencoder(32, 4)
    save_sae_checkpoint(str(tmp_path / "best"), sae, encoder="clip", encoder_weights=str(folder))
    weights = weights_for("clip-sae", str(tmp_path / "best"))
    assert weights.meta["output_column"] == "clip_sae_loss"
    assert weights.transforms.processor == "CLIPImageProcessor"
    with pytest.raises(ValueError, match="a checkpoint of 'clip-sae', not of 'dinov2-sae'"):
        weights_for("dinov2-sae", str(tmp_path / "best"))
    with pytest.raises(WeightsNotFoundError, match="no published weights: train an autoencoder"):
        weights_for("clip-sae", None)
    with pytest.raises(WeightsNotFoundError, match="not a memscore checkpoint folder"):
        weights_for("clip-sae", str(folder))


# --- training and scoring on Ray --------------------------------------------------------------


def _config(manifest: Path, output: Path, encoder_folder: Path, **changes) -> TrainSAEConfig:
    settings = dict(
        encoder="clip",
        weights=str(encoder_folder),
        name="one",
        epochs=3,
        batch_size=2,
        rows_per_block=16,
        decode_batch_size=16,
    )
    return TrainSAEConfig(str(manifest), output=str(output), **{**settings, **changes})


@pytest.fixture(scope="module")
def sae_run(tmp_path_factory, ray_local):
    """An autoencoder trained with the paper's settings but 3 epochs of batches of 2, on the
    representations of 40 images and a missing one, by a tiny seeded random CLIP."""
    folder = tmp_path_factory.mktemp("sae")
    manifest = write_tint_dataset(
        folder,
        IMAGES,
        extra_rows=[{"path": "images/missing.png", "memorability": "0.5", "category": "x"}],
    )
    encoder = make_encoder_folder("clip", folder / "clip", seed=2)
    config = _config(manifest, folder / "runs", encoder)
    return {
        "folder": folder,
        "manifest": manifest,
        "encoder": encoder,
        "config": config,
        "summary": train_sae(config),
        "run": folder / "runs" / "one",
    }


def _reference_vectors(encoder: Path, paths: list[str]) -> np.ndarray:
    """CLIP's last-layer CLS token before the post-layernorm, through transformers' own
    Pillow processor, image by image."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(str(encoder)).eval()
    vectors = []
    for path in paths:
        pixels = reference_pixels("clip", encoder, Image.open(path).convert("RGB"))
        with torch.inference_mode():
            vectors.append(
                model(pixel_values=pixels, output_hidden_states=True)
                .hidden_states[-1][0, 0]
                .numpy()
            )
    return np.stack(vectors).astype(np.float64)


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_a_scoreable_checkpoint(sae_run):
    summary, run = sae_run["summary"], sae_run["run"]
    assert (summary["rows_in"], summary["rows_trained"], summary["rows_with_image_errors"]) == (
        IMAGES + 1,
        IMAGES,
        1,
    )
    assert list(summary["image_error_kinds"]) == ["missing file"]
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and summary["epochs_run"] == 3
    losses = [summary["initial_reconstruction_loss"]] + [h["reconstruction_loss"] for h in history]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.97 * losses[0]
    assert json.loads((run / "history.json").read_text()) == history
    # best/: the six tensors, the z-score statistics of the training images' representations,
    # and the encoder named.
    tensors = load_file(str(run / "best" / "model.safetensors"))
    assert sorted(tensors) == sorted(TENSOR_KEYS)
    assert tuple(tensors["fc1.weight"].shape) == (100, 32)
    paths = sorted(str(p) for p in (sae_run["folder"] / "images").glob("img_*.png"))
    vectors = _reference_vectors(sae_run["encoder"], paths)
    np.testing.assert_allclose(tensors["mean"].numpy(), vectors.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tensors["std"].numpy(), vectors.std(0, ddof=1), rtol=1e-4)
    info = read_checkpoint_info(str(run / "best"))
    assert (info["model"], info["encoder"], info["encoder_weights"]) == (
        "clip-sae",
        "clip",
        str(sae_run["encoder"]),
    )
    assert info["metrics"] == history[-1]
    # A finished run is reported, not trained again.
    assert train_sae(sae_run["config"])["finished_at"] == summary["finished_at"]


@pytest.mark.slow
def test_the_scored_loss_is_the_reconstruction_error_recomputed_from_the_checkpoint(
    sae_run, tmp_path
):
    from scipy import stats

    from memscore.config import EvaluateConfig, ScoreConfig
    from memscore.evaluation.job import evaluate
    from memscore.scoring.job import score

    out = tmp_path / "scores"
    # Beside the encoder's traces, as a user would run them: one decode, one output.
    summary = score(
        ScoreConfig(
            str(sae_run["manifest"]),
            output=str(out),
            models=("clip-sae", "clip-traces"),
            weights=f"clip-sae={sae_run['run'] / 'best'},clip-traces={sae_run['encoder']}",
            rows_per_block=16,
        )
    )
    assert summary["rows_scored"] == IMAGES and summary["models"][0]["weights_sha256"]
    table = pq.read_table(out).sort_by(ROW)
    assert table.schema.field("clip_sae_loss").type == pa.float32()
    rows = [i for i, e in enumerate(table.column(ERROR).to_pylist()) if e is None]
    paths = [str(sae_run["folder"] / p) for p in table.column("path").to_pylist()]
    scored = table.column("clip_sae_loss").to_numpy(zero_copy_only=False)
    assert np.isnan(scored[[i for i in range(table.num_rows) if i not in rows]]).all()
    # The recomputation: the checkpoint's tensors in numpy, float64.
    t = {
        k: v.numpy().astype(np.float64)
        for k, v in load_file(str(sae_run["run"] / "best" / "model.safetensors")).items()
    }
    x = _reference_vectors(sae_run["encoder"], [paths[i] for i in rows])
    z = (x - t["mean"]) / (t["std"] + 1e-8)
    reconstruction = (
        np.maximum(z @ t["fc1.weight"].T + t["fc1.bias"], 0) @ t["fc2.weight"].T + t["fc2.bias"]
    )
    np.testing.assert_allclose(scored[rows], ((reconstruction - z) ** 2).sum(1), rtol=1e-4)

    # evaluate on the real output: the loss's figures and every trace layer's rho, as scipy's.
    result = evaluate(
        EvaluateConfig(
            str(out),
            str(sae_run["manifest"]),
            "memorability",
            str(tmp_path / "report"),
            prediction_column="clip_sae_loss",
            trace_columns="all",
            bootstrap=50,
        )
    )
    truth = {
        p: float(m)
        for p, m in zip(
            *[
                pa.csv.read_csv(sae_run["manifest"]).column(c).to_pylist()
                for c in ("path", "memorability")
            ]
        )
    }
    labels = np.array([truth[table.column("path")[i].as_py()] for i in rows])
    assert result["overall"]["spearman"] == pytest.approx(
        stats.spearmanr(scored[rows], labels).statistic, abs=1e-12
    )
    assert sorted(result["traces"]) == sorted(
        f"clip_{f}"
        for f in (
            "cls_mean",
            "cls_max",
            "cls_maxabs",
            "cls_delta",
            "attention_entropy",
            "patch_uniformity",
        )
    )
    for name, figures in result["traces"].items():
        values = np.array([table.column(name)[i].as_py() for i in rows], dtype=np.float64)
        assert figures["counts"]["evaluated"] == IMAGES
        assert figures["layers_in_column"] == values.shape[1]
        for layer in figures["layers"]:
            column = values[:, layer["index"]]
            if np.ptp(column) == 0:  # the embeddings' CLS: the same for every image
                assert layer["spearman"] is None
            else:
                assert layer["spearman"] == pytest.approx(
                    stats.spearmanr(column, labels).statistic, abs=1e-12
                ), (name, layer)
    assert (tmp_path / "report" / "layers.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_workers_take_the_same_steps_as_one_with_twice_the_batch(sae_run):
    two = train_sae(dataclasses.replace(sae_run["config"], name="two", workers=2, batch_size=1))
    one = sae_run["summary"]
    assert two["workers"] == 2 and two["rows_trained"] == one["rows_trained"]
    for a, b in zip(one["history"], two["history"]):
        for key in ("train_loss", "reconstruction_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["epoch"], key)
    first = load_file(str(sae_run["run"] / "best" / "model.safetensors"))
    second = load_file(str(sae_run["folder"] / "runs" / "two" / "best" / "model.safetensors"))
    for key in TENSOR_KEYS:
        torch.testing.assert_close(second[key], first[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_saved_epoch_and_ends_as_an_uninterrupted_one(
    sae_run, tmp_path
):
    output = tmp_path / "runs"
    config = sae_run["config"]
    command = [
        sys.executable,
        "-m",
        "memscore.cli",
        "train-sae",
        str(sae_run["manifest"]),
        "--output",
        str(output),
        "--name",
        "one",
        "--encoder",
        "clip",
        "--weights",
        str(sae_run["encoder"]),
        "--epochs",
        str(config.epochs),
        "--batch-size",
        str(config.batch_size),
        "--rows-per-block",
        "16",
        "--decode-batch-size",
        "16",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_before = set(ray_processes())
    # Rank 0 trains epoch 0, reports its checkpoint, then stalls at the start of epoch 1.
    fault = {**env, "MEMSCORE_INJECT_FAULT": f"train-epoch:stall-after-once:{tmp_path / 'f'}"}
    driver = subprocess.Popen(
        command,
        env=fault,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    kill_after_first_train_checkpoint(driver, output / "one", ray_before)
    killed = json.loads((output / "one" / "history.json").read_text())
    assert [h["epoch"] for h in killed] == [0] and not (output / "one" / "best").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    line = [text for text in again.stdout.splitlines() if text.startswith("memscore:")][-1]
    assert line.startswith(
        f"memscore: autoencoder on clip representations of {IMAGES} images "
        f"(1 failed), 3 epochs: mean reconstruction loss "
    )
    summary = json.loads((output / "one" / "train_sae.json").read_text())
    assert summary["starts"] == [0, 1] and summary["resumed_from_epoch"] == 1
    assert summary["representations_computed_now"] is False  # read back, not encoded again
    assert summary["history"][0] == killed[0]  # epoch 0 was not trained again
    # Each epoch's order comes from (seed, epoch): the resumed run ends where the uninterrupted
    # one (the module's run, same settings) ended.
    resumed = load_file(str(output / "one" / "best" / "model.safetensors"))
    uninterrupted = load_file(str(sae_run["run"] / "best" / "model.safetensors"))
    for key in TENSOR_KEYS:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-7)
