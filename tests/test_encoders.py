"""The encoder loader: folders, the Pillow image processors reproduced exactly, eager models,
the autoencoder's representation, and one clear line for each bad --weights. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_encoders import TOKENS, build_model, image_processor, make_encoder_folder, reference_pixels

from memscore.models._api import WeightsNotFoundError
from memscore.models.encoders import (
    ENCODERS,
    HFImagePreprocess,
    folder_digest,
    load_encoder,
    locate_folder,
    preprocess_of,
    representation,
)

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
ENCODER_NAMES = ("clip", "dinov2", "siglip2")


def real_photos() -> list[Path]:
    """Every image of examples/images and tests/data/images that Pillow opens as one picture."""
    found = sorted((ROOT / "examples" / "images").glob("*.*")) + sorted(
        (ROOT / "tests" / "data" / "images").glob("*.*")
    )
    return [p for p in found if p.suffix in (".png", ".jpg")]


def decoded(path: Path):
    """The RGB image memscore's decode stage makes of ``path`` (what to_array is given)."""
    from memscore.stages.decode import read_image

    return read_image(path.read_bytes())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {name: make_encoder_folder(name, root / name) for name in ENCODER_NAMES}


def test_every_encoder_is_offered_by_train_sae_the_registry_and_the_docs():
    """ENCODERS (each encoder's default Hugging Face id) is what train-sae's --encoder accepts
    (config.py keeps its own list so as not to import the models), each encoder has its traces
    and autoencoder models, and docs/traces.md names each id a user must have in the cache."""
    from memscore.config import SAE_ENCODERS
    from memscore.models import get_model_weights, list_models

    assert tuple(ENCODERS) == SAE_ENCODERS
    docs = (ROOT / "docs" / "traces.md").read_text()
    for encoder, hf_id in ENCODERS.items():
        for model in (f"{encoder}-traces", f"{encoder}-sae"):
            assert model in list_models()
            assert get_model_weights(model).DEFAULT.meta["encoder"] == encoder
        assert f"`{hf_id}`" in docs, f"docs/traces.md does not name {hf_id}"


@pytest.mark.parametrize("encoder", ENCODER_NAMES)
def test_pixels_equal_the_slow_processor_on_real_photos(encoder, folders):
    """to_tensor(to_array(image)) is the Pillow processor's float tensor, bit for bit."""
    preprocess = preprocess_of(encoder, str(folders[encoder]))
    photos = real_photos()
    assert len(photos) >= 7
    for path in photos:
        image = decoded(path)
        want = reference_pixels(encoder, folders[encoder], image)
        got = preprocess.to_tensor(preprocess.to_array(image)[None])
        assert got.dtype == want.dtype == torch.float32
        assert got.shape == want.shape == (1, 3, 224, 224)
        assert torch.equal(got, want), (path.name, (got - want).abs().max().item())


@pytest.mark.parametrize("resample", [0, 1, 2, 3, 4, 5])
def test_every_pillow_filter(resample, tmp_path):
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(resample=resample).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    preprocess = HFImagePreprocess.from_config(config)
    assert preprocess.resample == resample
    image = decoded(ROOT / "examples" / "images" / "rocket.jpg")
    want = reference_pixels("clip", tmp_path, image)
    assert torch.equal(preprocess(image)[None], want)


@pytest.mark.parametrize("size", [(500, 31), (31, 500), (225, 224), (10, 7), (224, 224)])
def test_odd_shapes_and_padding(size, tmp_path):
    """Thin, tiny and exact-size images; a shortest edge below the crop pads with zeros as
    transformers' centre crop does."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for shortest in (224, 100):
        folder = tmp_path / str(shortest)
        CLIPImageProcessorPil(size={"shortest_edge": shortest}).save_pretrained(folder)
        preprocess = HFImagePreprocess.from_config(
            json.loads((folder / "preprocessor_config.json").read_text())
        )
        want = reference_pixels("clip", folder, image)
        assert torch.equal(preprocess(image)[None], want), (size, shortest)


def test_legacy_int_sizes_of_the_openai_folder():
    """openai/clip-vit-base-patch32's preprocessor_config.json: a feature extractor with int
    sizes (size: the shortest edge, crop_size: a square)."""
    config = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    preprocess = HFImagePreprocess.from_config(config)
    assert (preprocess.shortest_edge, preprocess.crop, preprocess.resample) == (224, (224, 224), 3)
    assert preprocess.array_shape == (224, 224, 3)


def test_unreproduced_processors_are_one_line():
    with pytest.raises(ValueError, match="not one memscore reproduces") as caught:
        HFImagePreprocess.from_config({"image_processor_type": "ConvNextImageProcessor"})
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="fixed input size"):
        HFImagePreprocess.from_config(
            {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False}
        )


def test_decode_stage_gives_the_same_arrays(folders):
    """DecodeImages with the encoders' preprocessing: one pixel column each, equal to to_array."""
    import pyarrow as pa

    from memscore.columns import pixels_column
    from memscore.stages.decode import DecodeImages

    preprocess = {name: preprocess_of(name, str(folders[name])) for name in ENCODER_NAMES}
    photos = real_photos()
    table = DecodeImages("path", preprocess, io_threads=2)(
        pa.table({"path": [str(p) for p in photos]})
    )
    for name, pre in preprocess.items():
        arrays = table.column(pixels_column(name)).chunk(0).to_numpy()
        assert arrays.shape == (len(photos), 224, 224, 3)
        for i, path in enumerate(photos):
            assert np.array_equal(arrays[i], pre.to_array(decoded(path)))


def test_preprocessing_imports_neither_torch_nor_transformers(folders):
    """What the driver and the decode tasks run: no torch, no transformers."""
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from memscore.models.encoders import preprocess_of, check_folder\n"
        f"check_folder('dinov2', {str(folders['dinov2'])!r})\n"
        f"pre = preprocess_of('dinov2', {str(folders['dinov2'])!r})\n"
        "assert pre.to_array(Image.new('RGB', (300, 200))).shape == (224, 224, 3)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("encoder", ENCODER_NAMES)
def test_load_encoder_eager_eval_and_token_layout(encoder, folders):
    model, preprocess = load_encoder(encoder, str(folders[encoder]))
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert preprocess == preprocess_of(encoder, str(folders[encoder]))
    pixels = preprocess(decoded(ROOT / "examples" / "images" / "coffee.png"))[None]
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert out.hidden_states[0].shape[1] == TOKENS[encoder]
    assert all(a is not None and a.shape[-1] == TOKENS[encoder] for a in out.attentions)
    # the tensors are the saved ones, not a fresh initialisation
    saved = build_model(encoder).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("encoder", ["clip", "siglip2"])
def test_the_vision_tower_of_a_full_two_tower_folder(encoder, tmp_path):
    """The paper's hub folders hold whole CLIP / SigLIP models: the vision tower loads from them
    (text tower left out) and SigLIP's representation is get_image_features."""
    full = build_model(encoder, seed=3, full=True).eval()
    full.save_pretrained(tmp_path)
    image_processor(encoder).save_pretrained(tmp_path)
    model, preprocess = load_encoder(encoder, str(tmp_path))
    pixels = preprocess(decoded(ROOT / "examples" / "images" / "astronaut.png"))[None]
    with torch.inference_mode():
        vector = representation(encoder, model, pixels)
        if encoder == "siglip2":
            full.config._attn_implementation = "eager"
            full.vision_model.config._attn_implementation = "eager"
            want = full.get_image_features(pixel_values=pixels).pooler_output
        else:
            want = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[
                -1
            ][:, 0]
    torch.testing.assert_close(vector, want, rtol=1e-5, atol=1e-6)
    assert vector.shape == (1, 32)


@pytest.mark.parametrize("encoder", ["clip", "dinov2"])
def test_representation_is_token_0_before_the_post_layernorm(encoder, folders):
    model, preprocess = load_encoder(encoder, str(folders[encoder]))
    pixels = preprocess(decoded(ROOT / "examples" / "images" / "camera.png"))[None]
    with torch.inference_mode():
        vector = representation(encoder, model, pixels)
        out = model(pixel_values=pixels, output_hidden_states=True)
        norm = model.post_layernorm if encoder == "clip" else model.layernorm
        # the last hidden state really is before the post-layernorm, which the model applies
        post = norm(out.hidden_states[-1][:, 0])
    assert torch.equal(vector, out.hidden_states[-1][:, 0])
    assert not torch.allclose(post, vector)
    if encoder == "dinov2":
        torch.testing.assert_close(out.last_hidden_state[:, 0], post)
    else:
        torch.testing.assert_close(out.pooler_output, post)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def test_missing_hf_id_is_one_line_naming_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as caught:
        load_encoder("dinov2")
    message = _one_line(caught)
    assert "facebook/dinov2-base" in message and "save_pretrained" in message
    assert "--weights" in message


def test_an_id_in_the_local_hf_cache(tmp_path, monkeypatch, folders):
    """A model id resolves to its snapshot in the Hugging Face cache, without the network."""
    import shutil

    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-clip"
    shutil.copytree(folders["clip"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate_folder("clip", "someone/tiny-clip") == str(repo / "snapshots" / commit)
    model, _ = load_encoder("clip", "someone/tiny-clip")
    assert type(model).__name__ == "CLIPVisionModel"


def test_bad_folders_are_one_line(tmp_path, folders):
    import shutil

    with pytest.raises(WeightsNotFoundError) as caught:
        load_encoder("clip", str(tmp_path / "nowhere"))
    assert "no such folder" in _one_line(caught)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as caught:
        load_encoder("clip", str(empty))
    message = _one_line(caught)
    assert "not a Hugging Face model folder" in message and "config.json" in message

    no_processor = tmp_path / "no_processor"
    shutil.copytree(folders["clip"], no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError) as caught:
        load_encoder("clip", str(no_processor))
    assert "preprocessor_config.json" in _one_line(caught)

    with pytest.raises(ValueError) as caught:
        load_encoder("clip", str(folders["dinov2"]))
    assert "'dinov2' model, not clip" in _one_line(caught)

    # a checkpoint with fewer layers than its config says: tensors missing, never random
    short = tmp_path / "short"
    make_encoder_folder("siglip2", short, layers=1)
    config = json.loads((short / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (short / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as caught:
        load_encoder("siglip2", str(short))
    assert "not a complete SiglipVisionModel" in _one_line(caught)

    broken = tmp_path / "broken"
    shutil.copytree(folders["dinov2"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError) as caught:
        load_encoder("dinov2", str(broken))
    assert "could not load" in _one_line(caught)


def test_folder_digest_follows_the_tensors(tmp_path, folders):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["clip"], copy)
    assert folder_digest(str(copy)) == folder_digest(str(folders["clip"]))
    (copy / "README.md").write_text("not part of the model")
    assert folder_digest(str(copy)) == folder_digest(str(folders["clip"]))
    make_encoder_folder("clip", copy, seed=1)
    assert folder_digest(str(copy)) != folder_digest(str(folders["clip"]))
