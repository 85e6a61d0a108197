"""Memorability maps (issue 29): the methods, the deletion test, ``--maps`` in the batch job and
``memscore maps``' overlays (the serve side is in test_serve.py).

- Each method finds where a toy model's score comes from (a bright patch the model reacts to);
  the deletion test tells a map that ranks the right cells from one that ranks them last.
- On real photos and the published ResMem: the default method (Grad-CAM) passes the deletion
  test (its top 20% of cells lower the score more than random 20%), and its scores are
  bit for bit those without maps.
- ``memscore score --maps`` end to end: one S*S map per row, the method in ``_memscore.json``,
  a resume with other map settings refused; ``memscore maps`` draws each photo at its own size
  (a 12 MP phone JPEG turned by its EXIF tag among them) and a sheet.
- Bad options are one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from memscore import cli
from memscore.saliency.deletion import deletion_test
from memscore.saliency.methods import gradcam, integrated_gradients, occlusion, rise

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "images"


# ----------------------------------------------------------------------- the methods, on a toy
class Toy(torch.nn.Module):
    """Scores how much red there is, anywhere: a 1x1 conv that sees red, then the sum over
    positions. An image red only in its top-left corner has its score from there."""

    def __init__(self):
        super().__init__()
        self.feat = torch.nn.Conv2d(3, 2, kernel_size=1)
        with torch.no_grad():
            self.feat.weight.copy_(
                torch.tensor([[1.0, -1.0, -1.0], [0.5, -0.5, -0.5]])[..., None, None]
            )
            self.feat.bias.zero_()

    def forward(self, x):
        return torch.sigmoid(torch.relu(self.feat(x)).mean(dim=(1, 2, 3)) * 20 - 1)


def _red_corner(n: int = 2, side: int = 64) -> torch.Tensor:
    x = torch.full((n, 3, side, side), 0.5)
    x[:, 0, : side // 4, : side // 4] = 1.0  # red top-left, grey elsewhere
    x[:, 1:, : side // 4, : side // 4] = 0.0
    return x


@pytest.mark.parametrize("method", ["gradcam", "occlusion", "rise", "integrated-gradients"])
def test_each_method_finds_where_a_toy_models_score_comes_from(method):
    model = Toy().eval()
    x = _red_corner()
    with torch.inference_mode():
        plain = model(x)
        if method == "gradcam":
            scores, maps = gradcam(model, x, 8, ("feat",))
        elif method == "occlusion":
            scores, maps = occlusion(model, x, 8)
        elif method == "rise":
            scores, maps = rise(model, x, 8, masks=1024)
        else:
            scores, maps = integrated_gradients(model, x, 8, steps=8)
    assert torch.equal(scores, plain)  # the score is the model's own
    assert maps.shape == (2, 8, 8) and torch.isfinite(maps).all()
    assert maps.max() == 1 and maps.min() >= 0
    for m in maps:
        top = np.unravel_index(int(m.argmax()), (8, 8))
        # the red 2x2 cells of the 8x8 (RISE's masks are coarser: 7x7 cells, shifted)
        near = 3 if method == "rise" else 2
        assert top[0] < near and top[1] < near, (method, m)
        # RISE's map is an expected score, with a floor where the mask kept nothing red
        assert m[:2, :2].mean() > (1.5 if method == "rise" else 3) * m[4:, 4:].mean()
    assert all(p.requires_grad for p in model.parameters())  # frozen for the call only


def test_the_deletion_test_tells_a_faithful_map_from_an_inverted_one():
    model = Toy().eval()
    x = _red_corner()
    with torch.inference_mode():
        _, maps = occlusion(model, x, 8)
    good = deletion_test(model, x, maps.numpy())
    bad = deletion_test(model, x, (1 - maps).numpy())
    for g, b in zip(good, bad):
        assert g.top_fall > g.random_fall > b.top_fall
        assert g.auc < b.auc and len(g.curve) == 11
        assert g.curve[0] == pytest.approx(g.score)  # nothing grey yet


# ------------------------------------------------------------------------ the command line
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--maps", "--map-size", "1"], "--map-size must be 2..64"),
        (["--map-method", "occlusion"], "--map-method and --map-size shape --maps"),
        (["--maps", "--model", "memnet"], "memnet declares no layers for Grad-CAM"),
        (["--maps", "--model", "clip-traces"], "clip-traces writes 6 columns, not one score"),
    ],
)
def test_bad_map_options_are_one_line(argv, message, capsys, tmp_path):
    code = cli.main(["score", "examples/images", "--output", str(tmp_path / "s"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------ real photos, published ResMem
def _photos() -> list[Path]:
    return sorted((ROOT / "examples" / "images").glob("*.[pj][np]g")) + [
        DATA / "coins.png",
        DATA / "hubble_deep_field.jpg",
        DATA / "logo.png",
    ]


@pytest.fixture(scope="module")
def resmem_maps():
    """The repository's 8 photos through ScoreImages with and without maps (the batch job's
    model stage, the published ResMem)."""
    from memscore.columns import pixels_column
    from memscore.models import get_model_weights
    from memscore.saliency.runner import MapSettings
    from memscore.stages.decode import DecodeImages
    from memscore.stages.predict import ScoreImages

    paths = _photos()
    pre = get_model_weights("resmem").DEFAULT.transforms
    decoded = DecodeImages("path", {"resmem": pre})(pa.table({"path": [str(p) for p in paths]}))
    plain = ScoreImages(("resmem",), batch_size=4)
    mapped = plain.with_maps(MapSettings())
    pixels = decoded.column(pixels_column("resmem")).combine_chunks().to_numpy()
    return {
        "plain": plain(decoded),
        "mapped": mapped(decoded),
        "x": pre.to_tensor(pixels),
        "model": plain._runners[0][3],
    }


@pytest.mark.slow
def test_maps_leave_the_scores_bit_for_bit_and_are_finite_and_not_constant(resmem_maps):
    plain, mapped = resmem_maps["plain"], resmem_maps["mapped"]
    assert mapped.column("memorability").equals(plain.column("memorability"))
    added = ["memscore_error", "memscore_model", "memscore_width", "memscore_height"]
    assert plain.column_names[-5:] == ["memorability", *added]
    assert mapped.column_names[-6:] == ["memorability", "memorability_map", *added]
    maps = np.array(mapped.column("memorability_map").to_pylist(), np.float32)
    assert maps.shape == (len(plain), 256)
    assert np.isfinite(maps).all()
    assert (maps.max(axis=1) == 1).all() and (maps.min(axis=1) == 0).all()
    assert (maps.std(axis=1) > 0.05).all()  # not constant, on every photo


@pytest.mark.slow
def test_the_default_maps_pass_the_deletion_test_on_real_photos(resmem_maps):
    """Greying the 20% of cells a Grad-CAM map ranks highest lowers ResMem's score more than
    greying random 20% (5 draws), on average over the repository's 8 photos, and on most of
    them (benchmarks/maps.py measures it on these and their mirror images)."""
    model = resmem_maps["model"]
    maps = np.array(resmem_maps["mapped"].column("memorability_map").to_pylist(), np.float32)

    def score(batch):
        with torch.inference_mode():
            return model(batch)

    tests = deletion_test(score, resmem_maps["x"], maps.reshape(-1, 16, 16))
    top = np.array([t.top_fall for t in tests])
    random = np.array([t.random_fall for t in tests])
    print(
        f"top 20% fall {top.mean():+.4f}, random {random.mean():+.4f}, wins {(top > random).sum()}"
    )
    assert top.mean() > random.mean()
    assert (top > random).sum() > len(tests) / 2


# --------------------------------------------------------------------- end to end, drawn
def _phone_photo(folder: Path) -> Path:
    """A 12 MP JPEG as a phone writes it: stored 4032x3024, EXIF orientation 6 (shown turned
    to 3024x4032), made from a real photo."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = folder / "phone.jpg"
    photo = Image.open(ROOT / "examples" / "images" / "astronaut.png").convert("RGB")
    photo.resize((4032, 3024), Image.BICUBIC).save(path, quality=90, exif=exif.tobytes())
    return path


@pytest.mark.slow
def test_score_with_maps_then_draw_them(tmp_path, ray_local):
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((ROOT / "examples" / "images").glob("*.[pj][np]g")):
        shutil.copy(path, photos / path.name)
    _phone_photo(photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "scores"
    argv = ["score", str(photos), "--output", str(out), "--maps", "--exif-transpose"]
    assert cli.main(argv) == 0
    table = pq.read_table(out).to_pandas().set_index("path")
    assert table.memorability_map.notna().sum() == 6
    good = table[table.memscore_error.isna()]
    for cells in good.memorability_map:
        assert len(cells) == 256 and np.isfinite(cells).all()
        assert max(cells) == 1 and min(cells) == 0 and np.std(cells) > 0.05
    assert table.loc[str(photos / "broken.jpg"), "memorability_map"] is None
    summary = json.loads((out / "_memscore.json").read_text())
    assert summary["maps"] == {"method": "gradcam", "size": 16}
    assert summary["run"]["maps"] == summary["maps"]
    # the scores are those of a run without maps: the batch job's model stage, as in parity
    from memscore.models import get_model_weights
    from memscore.stages.decode import DecodeImages
    from memscore.stages.predict import ScoreImages

    decode = DecodeImages(
        "path", {"resmem": get_model_weights("resmem").DEFAULT.transforms}, exif_transpose=True
    )
    reference = ScoreImages(("resmem",))(decode(pa.table({"path": list(good.index)})))
    assert np.array_equal(
        good.memorability.to_numpy(np.float32), reference.column("memorability").to_numpy()
    )
    # a resume with other map settings is another run
    refused = cli.main([*argv, "--resume", "--map-size", "8"])
    assert refused == 2

    render = tmp_path / "drawn"
    assert cli.main(["maps", str(out), "--render", str(render), "--sheet", "3"]) == 0
    drawn = json.loads((render / "maps.json").read_text())
    assert len(drawn["overlays"]) == 6 and drawn["photos_not_read_again"] == []
    for item in drawn["overlays"]:
        overlay = Image.open(item["file"])
        overlay.load()
        source = Image.open(item["path"])
        expected = (
            (source.height, source.width) if Path(item["path"]).name == "phone.jpg" else source.size
        )
        assert overlay.size == expected, item
    assert Image.open(render / "sheet.png").size == (3 * 192, 2 * 192 + 4 * 20)
    most = drawn["sheet_rows"]["most"]
    by_row = good.reset_index().set_index("memscore_row").memorability
    assert list(by_row.loc[most]) == sorted(by_row, reverse=True)[:3]
    # a used --render folder is refused; --overwrite writes over its own files only
    (render / "mine.txt").write_text("kept")
    assert cli.main(["maps", str(out), "--render", str(render)]) == 2
    assert cli.main(["maps", str(out), "--render", str(render), "--overwrite"]) == 0
    assert (render / "mine.txt").read_text() == "kept"
