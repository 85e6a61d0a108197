"""M3M: the frozen segmentation branch, finding the FCN weights, strict checkpoints, ResMem init."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.models.segmentation import fcn_resnet50

from memscore.models import CheckpointKeyError, WeightsNotFoundError, get_model, get_model_weights
from memscore.models._api import build_with_weights
from memscore.models.m3m import (
    FCN_ENV,
    FCN_FILENAME,
    FCN_URL,
    M3M,
    NO_WEIGHTS_MESSAGE,
    RESMEM_FEATURES,
    M3M_Weights,
    fcn_state_dict,
    locate_fcn_weights,
    m3m,
    m3m_for_training,
)
from memscore.stages.decode import pixels_column
from memscore.stages.predict import ScoreImages

PRE = M3M_Weights.DEFAULT.transforms


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a stand-in FCN file, laid out as torchvision's
    published one (auxiliary head included), with seeded random tensors."""
    torch.manual_seed(1)
    state = fcn_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    ).state_dict()
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / FCN_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return home, path, state


@pytest.fixture(scope="module")
def from_resmem(torch_home) -> M3M:
    """``m3m_for_training()`` as fine-tuning starts it, the FCN file found in the hub cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(FCN_ENV, raising=False)
        patch.setenv("TORCH_HOME", str(torch_home[0]))
        return m3m_for_training().eval()


@pytest.fixture(scope="module")
def model(from_resmem) -> M3M:
    """A model whose scores depend on every branch and do not saturate, as a trained one's:
    ResMem's tensors (shared with ``from_resmem``, buffers cloned) and small random weights on
    fc6's segmentation columns. (A randomly initialised ResNet-152 saturates the sigmoid.)"""
    buffers = dict(from_resmem.named_buffers())
    state = {k: v.clone() if k in buffers else v for k, v in from_resmem.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    fc6 = state["fc6.weight"].clone()
    fc6[:, RESMEM_FEATURES:] = 0.01 * torch.randn(fc6.shape[0], 1024, generator=generator)
    state["fc6.weight"] = fc6
    return build_with_weights(M3M, state, source="test").eval()


@pytest.fixture(scope="module")
def pixels(example_images) -> np.ndarray:
    """Two real images, as the decode stage hands them to the model stage."""
    return np.stack([PRE.to_array(Image.open(p).convert("RGB")) for p in example_images[:2]])


@pytest.fixture(scope="module")
def expected(model, pixels) -> torch.Tensor:
    with torch.inference_mode():
        return model(PRE.to_tensor(pixels))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("m3m") / "m3m.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def no_fcn_anywhere(monkeypatch, tmp_path):
    monkeypatch.delenv(FCN_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))


def test_runs_on_real_images_with_class_probabilities_in_between(model, pixels, expected):
    x = PRE.to_tensor(pixels)
    with torch.inference_mode():
        seg = model.segment(x)
    assert seg.shape == (2, 21, 227, 227)
    torch.testing.assert_close(seg.sum(dim=1), torch.ones(2, 227, 227))
    assert expected.shape == (2,)
    assert torch.all((expected >= 0) & (expected <= 1))
    assert model.fc6.in_features == RESMEM_FEATURES + 1024
    assert "aux_classifier" not in dict(model.segmentation.named_children())


def test_weights_take_resmems_input_and_do_not_pretend_to_exist():
    assert get_model_weights("m3m") is M3M_Weights
    # M3M's ResMem branches start from ResMem's weights (training init): they need its input
    assert M3M_Weights.DEFAULT.transforms == get_model_weights("resmem").DEFAULT.transforms
    with pytest.raises(WeightsNotFoundError) as info:
        get_model("m3m")
    assert str(info.value) == NO_WEIGHTS_MESSAGE
    assert "memscore finetune --model m3m" in str(info.value)
    assert "--weights CHECKPOINT" in str(info.value)


def test_segmentation_branch_is_frozen_in_train_mode(model, pixels):
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BatchNorm statistics
    try:
        model.train()
        assert model.training and model.features.training and model.seg_reducer.training
        assert not any(m.training for m in model.segmentation.modules())
        out = model(PRE.to_tensor(pixels))
        ((out - 0.5) ** 2).mean().backward()
        for name, p in model.named_parameters():
            if name.startswith("segmentation."):
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.requires_grad and p.grad is not None, name
        # the reducer trains: the loss reaches it through fc6's segmentation columns
        assert model.seg_reducer[0].weight.grad.abs().sum() > 0
        for key, value in model.segmentation.named_buffers(prefix="segmentation"):
            assert torch.equal(value, buffers[key]), key
        # while the trainable ResNet's statistics move, as they should in train mode
        moved = model.features.bn1.running_mean
        assert not torch.equal(moved, buffers["features.bn1.running_mean"])
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for key, value in model.named_buffers():
                value.copy_(buffers[key])


def test_fcn_weights_are_found_in_the_order_path_env_hub(torch_home, monkeypatch, tmp_path):
    home, path, _ = torch_home
    monkeypatch.delenv(FCN_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert locate_fcn_weights() == str(path)  # the hub cache
    other = tmp_path / "elsewhere.pth"
    other.write_bytes(b"")
    monkeypatch.setenv(FCN_ENV, str(other))
    assert locate_fcn_weights() == str(other)  # the environment before the hub cache
    assert locate_fcn_weights(path) == str(path)  # an explicit path before both
    monkeypatch.setenv(FCN_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsNotFoundError, match="MEMSCORE_FCN_WEIGHTS .*gone.pth"):
        locate_fcn_weights()  # asked for and missing: no fallback to the hub cache
    with pytest.raises(WeightsNotFoundError, match="nope.pth is not a file"):
        locate_fcn_weights(tmp_path / "nope.pth")


def test_missing_fcn_file_is_a_clear_error(no_fcn_anywhere, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        m3m_for_training()
    message = str(info.value)
    assert FCN_FILENAME in message and FCN_URL in message
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints" / FCN_FILENAME) in message
    assert FCN_ENV in message
    with pytest.raises(WeightsNotFoundError, match=FCN_FILENAME):
        get_model("m3m", weights=None, init_from_resmem=True)


def test_explicit_fcn_file_loads_into_a_model_trained_from_scratch(torch_home, no_fcn_anywhere):
    _, path, state = torch_home
    built = get_model("m3m", weights=None, segmentation_weights=path)
    loaded = built.segmentation.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("aux_classifier.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    assert not any(p.requires_grad for p in built.segmentation.parameters())
    assert built.seg_reducer[0].weight.requires_grad


def test_fcn_file_with_odd_keys_is_refused_naming_them(tmp_path):
    path = tmp_path / FCN_FILENAME
    torch.save({"aux_classifier.0.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(
        CheckpointKeyError, match=r"missing keys: backbone\..*unexpected keys: extra\.weight$"
    ):
        fcn_state_dict(path)


def test_training_init_copies_resmem_and_scores_as_resmem(from_resmem, torch_home, pixels):
    """Found in the hub cache (TORCH_HOME, see the fixture); every ResMem tensor bit-exact from
    the package file, fc6's new columns zero, so the new model scores as ResMem does."""
    from memscore.models.resmem import ResMem_Weights

    state = from_resmem.state_dict()
    resmem = ResMem_Weights.DEFAULT.load_state_dict()
    for key, value in resmem.items():
        if key == "fc6.weight":
            assert torch.equal(state[key][:, :RESMEM_FEATURES], value)
            assert not state[key][:, RESMEM_FEATURES:].any()
        else:
            assert torch.equal(state[key], value), key
    fcn = torch_home[2]
    for key, value in from_resmem.segmentation.state_dict().items():
        assert torch.equal(value, fcn[key]), key
    assert set(state) - {f"segmentation.{k}" for k in fcn} - set(resmem) == {
        "seg_reducer.0.weight",
        "seg_reducer.0.bias",
        "seg_reducer.2.weight",
        "seg_reducer.2.bias",
    }
    assert not any(t.is_meta for t in (*from_resmem.parameters(), *from_resmem.buffers()))
    assert not any(p.requires_grad for p in from_resmem.segmentation.parameters())
    assert all(
        p.requires_grad
        for n, p in from_resmem.named_parameters()
        if not n.startswith("segmentation.")
    )
    x = PRE.to_tensor(pixels)
    with torch.inference_mode():
        ours = from_resmem(x)
        theirs = get_model("resmem")(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_checkpoint_round_trip(fmt, model, checkpoint, expected, pixels, tmp_path):
    path = checkpoint
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "m3m.safetensors"
        save_file(model.state_dict(), path)
    loaded = get_model("m3m", weights=None, checkpoint=str(path))
    assert not any(p.requires_grad for p in loaded.segmentation.parameters())
    assert loaded.train().segmentation.training is False
    with torch.inference_mode():
        torch.testing.assert_close(loaded.eval()(PRE.to_tensor(pixels)), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not combine"):
        m3m(checkpoint=path, init_from_resmem=True)


def test_checkpoint_with_a_missing_and_an_extra_key_is_refused(model, tmp_path):
    # only the key set is checked before any tensor is used, so small stand-in tensors suffice
    keys = [k for k in model.state_dict() if k != "seg_reducer.2.bias"]
    state = {k: torch.zeros(1) for k in keys}
    state["seg_reducer.9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(
        CheckpointKeyError,
        match=r"missing keys: seg_reducer\.2\.bias; "
        r"unexpected keys: seg_reducer\.9\.weight",
    ):
        get_model("m3m", weights=None, checkpoint=tmp_path / "odd.pt")


def test_score_images_with_a_checkpoint(checkpoint, expected, pixels):
    from ray.data.extensions import ArrowTensorArray

    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "memscore_error": pa.array([None, "missing file: x", None], pa.string()),
            "memscore_width": pa.array([10, None, 10], pa.int32()),
            "memscore_height": pa.array([10, None, 10], pa.int32()),
        }
    ).append_column(pixels_column("m3m"), ArrowTensorArray.from_numpy(pixels[[0, 1, 1]]))
    out = ScoreImages(("m3m",), weights=str(checkpoint))(table)
    assert out.column_names == [
        "id",
        "memorability_m3m",
        "memscore_error",
        "memscore_model",
        "memscore_width",
        "memscore_height",
    ]
    scores = out.column("memorability_m3m").to_pylist()
    assert scores[1] is None
    np.testing.assert_allclose([scores[0], scores[2]], expected.numpy(), atol=1e-6)
