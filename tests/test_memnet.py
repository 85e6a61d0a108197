"""MemNet: the ten-crop geometry, the output mapping, both pipelines, strict checkpoint loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from pickle_payload import TouchesMarker
from PIL import Image

from memscore.models import CheckpointKeyError, WeightsNotFoundError, get_model, get_model_weights
from memscore.models.memnet import (
    CAFFE_MEAN_BGR,
    NO_WEIGHTS_MESSAGE,
    OUTPUT_BIAS,
    OUTPUT_MEAN,
    OUTPUT_SCALE,
    PRETORCHED_KEYS,
    MemNet,
    MemNet_Weights,
    from_pretorched_state_dict,
    memnet,
    output_mapping,
    ten_crop,
)
from memscore.models.transforms import ImagePreprocess, TenCropPreprocess


@pytest.fixture(scope="module")
def legacy() -> MemNet:
    torch.manual_seed(0)
    return MemNet("legacy").eval()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)


def test_ten_crop_cuts_the_caffe_oversample_crops_in_order():
    # every pixel distinct: value = ((c * 256) + row) * 256 + col over 2 images
    base = np.arange(2 * 3 * 256 * 256, dtype=np.float64).reshape(2, 3, 256, 256)
    crops = ten_crop(torch.from_numpy(base)).numpy()
    assert crops.shape == (20, 3, 227, 227)
    offsets = [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]  # TL, TR, BL, BR, centre
    for n in range(2):
        for k, (top, left) in enumerate(offsets):
            by_hand = base[n, :, top : top + 227, left : left + 227]
            np.testing.assert_array_equal(crops[10 * n + k], by_hand)
            np.testing.assert_array_equal(crops[10 * n + 5 + k], by_hand[:, :, ::-1])
            np.testing.assert_array_equal(crops[10 * n + 5 + k][..., ::-1], crops[10 * n + k])
    # the centre is torchvision's CenterCrop
    from torchvision.transforms.functional import center_crop

    np.testing.assert_array_equal(
        crops[4], center_crop(torch.from_numpy(base[0]), [227, 227]).numpy()
    )


def test_output_mapping_clips_and_is_linear_in_between():
    y = torch.tensor([-100.0, 0.0, 0.3, 0.7626, 1.0, 100.0])
    out = output_mapping(y)
    assert out[0] == 0.0 and out[-1] == 1.0 and out[1] == 0.0  # (0 - .7626) * 2 + .65 < 0
    inside = torch.tensor([0.5, 0.7626, 0.9])
    torch.testing.assert_close(output_mapping(inside), (inside - 0.7626) * 2 + 0.65)
    assert output_mapping(torch.tensor([0.7626])).item() == pytest.approx(0.65)


def test_batched_ten_crops_equal_crops_run_one_by_one(legacy):
    pixels = _images(2)
    x = TenCropPreprocess().to_tensor(pixels)
    with torch.inference_mode():
        batched = legacy(x)
        crops = ten_crop(legacy.subtract_mean(x))
        one_by_one = torch.stack([legacy.logits(crops[i : i + 1])[0] for i in range(20)])
        expected = output_mapping(one_by_one.view(2, 10).mean(1))
        # and the raw averages, before the clip can hide a difference
        raw = legacy.logits(crops).view(2, 10).mean(1)
    assert batched.shape == (2,)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, one_by_one.view(2, 10).mean(1), atol=1e-5, rtol=0)
    assert torch.all((batched >= 0) & (batched <= 1))


def test_legacy_rejects_a_cropped_input(legacy):
    with pytest.raises(ValueError, match="3, 256, 256"):
        legacy(torch.zeros(1, 3, 227, 227))


def test_modern_mode_is_a_sigmoid_on_one_centre_crop():
    torch.manual_seed(1)
    model = MemNet("modern").eval()
    assert "mean" not in model.state_dict()
    pre = MemNet_Weights.MODERN.transforms
    assert isinstance(pre, ImagePreprocess) and (pre.resize, pre.crop) == ((256, 256), 227)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 227, 227, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = model(pre.to_tensor(pixels))
        expected = torch.sigmoid(model.logits(pre.to_tensor(pixels)))
    assert out.shape == (3,)
    assert torch.all((out > 0) & (out < 1))
    torch.testing.assert_close(out, expected)


def test_bgr_order_and_mean_subtraction(legacy):
    pre = MemNet_Weights.LEGACY.transforms
    assert isinstance(pre, TenCropPreprocess) and pre.array_shape == (256, 256, 3)
    red = Image.new("RGB", (300, 200), (255, 0, 0))
    array = pre.to_array(red)
    assert array.shape == (256, 256, 3) and array.dtype == np.uint8
    x = pre.to_tensor(array[None])
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert torch.all(x[0, 2] == 255) and torch.all(x[0, :2] == 0)  # BGR, 0..255, no /255
    mean_b, mean_g, mean_r = CAFFE_MEAN_BGR
    fed = legacy.subtract_mean(x)
    assert torch.all(fed[0, 2] == 255 - mean_r)
    assert torch.all(fed[0, 1] == -mean_g)
    assert torch.all(fed[0, 0] == -mean_b)
    assert legacy.mean.shape == (3, 256, 256)
    torch.testing.assert_close(pre(red), x[0])


def test_a_saved_state_dict_loads_strictly_through_the_builder(tmp_path, legacy):
    path = tmp_path / "memnet.pt"
    state = legacy.state_dict()
    state["mean"] = state["mean"] + torch.linspace(0, 1, 256)  # a mean image, not per-channel
    torch.save(state, path)
    loaded = memnet(weights="LEGACY", checkpoint=str(path)).eval()
    assert loaded.mode == "legacy"
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = TenCropPreprocess().to_tensor(_images(1, seed=3))
    with torch.inference_mode():
        torch.testing.assert_close(
            loaded(x),
            output_mapping(legacy.logits(ten_crop(x - state["mean"])).view(1, 10).mean(1)),
        )
    # through the registry too, and the modern pipeline from a modern state_dict
    assert get_model("memnet", checkpoint=path).mode == "legacy"
    modern_path = tmp_path / "modern.pt"
    torch.save(MemNet("modern").state_dict(), modern_path)
    assert get_model("memnet", weights="MODERN", checkpoint=modern_path).mode == "modern"
    with pytest.raises(CheckpointKeyError, match="missing keys: mean"):
        memnet(weights="LEGACY", checkpoint=modern_path)
    with pytest.raises(ValueError, match="contradicts"):
        memnet(weights="LEGACY", mode="modern", checkpoint=path)


def test_checkpoints_with_a_missing_or_an_extra_key_are_refused(tmp_path, legacy):
    state = legacy.state_dict()
    missing = {k: v for k, v in state.items() if k != "fc8.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointKeyError, match=r"missing keys: fc8\.bias"):
        memnet(checkpoint=tmp_path / "missing.pt")
    torch.save({**state, "fc9.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys: fc9\.weight"):
        memnet(checkpoint=tmp_path / "extra.pt")


def test_a_pickled_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"fc8.bias": torch.zeros(1), "x": TouchesMarker(marker)}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="weights_only"):
        memnet(checkpoint=path)
    assert not marker.exists(), "memnet(checkpoint=...) ran the checkpoint's code"
    # the control: an unguarded torch.load of the same file does run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_default_weights_do_not_pretend_to_exist():
    assert get_model_weights("memnet") is MemNet_Weights
    assert MemNet_Weights.DEFAULT is MemNet_Weights.LEGACY
    with pytest.raises(WeightsNotFoundError) as info:
        get_model("memnet")
    assert str(info.value) == NO_WEIGHTS_MESSAGE
    with pytest.raises(WeightsNotFoundError, match="--weights PATH"):
        get_model("memnet", weights="MODERN")


def test_the_legacy_meta_states_the_mean_and_mapping_the_code_uses():
    """`memscore models` shows these texts: they must name the constants the model applies."""
    meta = MemNet_Weights.LEGACY.meta
    assert str(CAFFE_MEAN_BGR) in meta["mean"]
    assert f"clip((y - {OUTPUT_MEAN}) * {OUTPUT_SCALE:g} + {OUTPUT_BIAS}, 0, 1)" in meta["variant"]


def test_random_init_through_the_registry():
    assert get_model("memnet", weights=None).mode == "legacy"
    assert get_model("memnet", weights=None, mode="modern").mode == "modern"
    with pytest.raises(ValueError, match="mode"):
        memnet(mode="caffe")


def test_pretorched_layout_maps_strictly(legacy):
    state = {k: v for k, v in legacy.state_dict().items() if k != "mean"}
    assert tuple(sorted(state)) == tuple(sorted(PRETORCHED_KEYS))
    converted = from_pretorched_state_dict(state)
    assert converted["mean"].shape == (3, 256, 256)
    assert torch.equal(converted["mean"][:, 5, 7], torch.tensor(CAFFE_MEAN_BGR))
    MemNet("legacy").load_state_dict(converted, strict=True)
    MemNet("modern").load_state_dict(from_pretorched_state_dict(state, mode="modern"), strict=True)
    with pytest.raises(
        CheckpointKeyError, match=r"missing keys: fc8\.weight.*unexpected keys: fc8\.w"
    ):
        from_pretorched_state_dict(
            {**{k: v for k, v in state.items() if k != "fc8.weight"}, "fc8.w": torch.zeros(1)}
        )
