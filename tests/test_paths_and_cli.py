"""What a new user types: the README's own first command, relative paths and ``~`` for every
path option of every command and job, and errors as one line (``--debug`` for the traceback)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import memscore
from memscore import cli

ROOT = Path(__file__).resolve().parent.parent


def readme_quick_start() -> str:
    """The `memscore score` part of the README's first set-up command, exactly as written."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    line = next(
        line
        for block in blocks
        for line in block.splitlines()
        if "memscore score examples/images" in line
    )
    return line[line.index("memscore score") :]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_the_readmes_first_command_runs_as_written_from_a_copy_of_the_project(tmp_path):
    command = readme_quick_start()
    assert "--output scores/" in command  # a relative output, as a newcomer types it
    project = tmp_path / "memscore"
    shutil.copytree(
        ROOT,
        project,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "scores", "__pycache__", "*.egg-info", ".pytest_cache"
        ),
    )
    for _attempt in (1, 2):  # the second run replaces the first's output (--overwrite)
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # Ray's INFO lines, its token WARNING and its core_worker.cc line went to its log
        assert result.stderr == "", result.stderr[-3000:]
        assert len(result.stdout.strip().splitlines()) == 1, result.stdout
        last = result.stdout.strip().splitlines()[-1]
        assert last.startswith("memscore: 5 rows, 5 scored, 0 errors"), last
        assert "(1 non-image file skipped)" in last  # examples/images/README.md
    summary = json.loads((project / "scores" / "_memscore.json").read_text())
    assert summary["status"] == "complete" and summary["rows_out"] == 5
    assert summary["output"] == str(project / "scores")
    parts = list((project / "scores").glob("*.parquet"))
    assert parts and sum(pq.read_metadata(p).num_rows for p in parts) == 5


def test_relative_paths_and_home_are_resolved_where_the_config_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "best").mkdir()  # a checkpoint folder in the working directory
    score = memscore.ScoreConfig("photos/", output="scores/", weights="best")
    assert (score.manifest, score.output, score.weights) == (
        str(tmp_path / "photos"),
        str(tmp_path / "scores"),
        str(tmp_path / "best"),
    )
    member = memscore.ScoreConfig("~/m.csv", output="~/out", weights="RETRAIN")
    assert (member.manifest, member.output, member.weights) == (
        str(tmp_path / "home" / "m.csv"),
        str(tmp_path / "home" / "out"),
        "RETRAIN",
    )
    remote = memscore.ScoreConfig("s3://b/m.csv", output="s3://b/out/")
    assert (remote.manifest, remote.output) == ("s3://b/m.csv", "s3://b/out/")
    (tmp_path / "runs" / "old" / "best").mkdir(parents=True)
    tune = memscore.FinetuneConfig("labels.csv", output="runs", weights="runs/old/best")
    assert (tune.manifest, tune.output, tune.weights) == (
        str(tmp_path / "labels.csv"),
        str(tmp_path / "runs"),
        str(tmp_path / "runs/old/best"),
    )
    assert memscore.FinetuneConfig("l.csv", output="r", weights="scratch").weights == "scratch"
    report = memscore.EvaluateConfig("scores", truth="~/t.csv", truth_column="m", report="report/")
    assert (report.predictions, report.truth, report.report) == (
        str(tmp_path / "scores"),
        str(tmp_path / "home" / "t.csv"),
        str(tmp_path / "report"),
    )


def _memnet_checkpoint(folder: Path):
    """What `memscore finetune` leaves in best/ (``save_checkpoint``), for a seeded MemNet
    trained with its MODERN pipeline; -> the model."""
    import torch

    from memscore.models import get_model
    from memscore.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = get_model("memnet", weights=None, mode="modern")
    save_checkpoint(str(folder), model.state_dict(), {"model": "memnet", "weights": "MODERN"})
    return model


def test_weights_are_a_member_name_exactly_else_a_checkpoint(tmp_path, monkeypatch):
    import torch

    from memscore.models import get_model, get_model_weights
    from memscore.models.registry import is_checkpoint, weights_for

    monkeypatch.chdir(tmp_path)
    trained = _memnet_checkpoint(tmp_path / "best")
    (tmp_path / "DEFAULT").mkdir()  # a folder named like a member
    memnet = get_model_weights("memnet")

    # exactly a member's name (case-sensitive) is that member, whatever folders are here
    assert weights_for("memnet", "DEFAULT") is memnet.LEGACY
    assert weights_for("memnet", "MODERN") is memnet.MODERN
    assert not is_checkpoint("memnet", "MODERN") and not is_checkpoint("memnet", memnet.MODERN)
    # anything else is a checkpoint: a lower-case name, a pathlib.Path, the relative best/
    assert is_checkpoint("memnet", "modern") and is_checkpoint("memnet", Path("MODERN"))
    assert weights_for("memnet", "best") is memnet.MODERN  # the member its memscore.json names
    model = get_model("memnet", weights="best")
    assert model.mode == "modern"
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    def weights(value, models="memnet"):
        return memscore.ScoreConfig("m.csv", output="o", models=models, weights=value).weights

    assert weights("best") == str(tmp_path / "best")  # made whole where the config is made
    assert weights("DEFAULT") == "DEFAULT"  # the member, not the folder
    assert weights("./DEFAULT") == str(tmp_path / "DEFAULT")  # the folder
    assert weights(Path("DEFAULT")) == str(tmp_path / "DEFAULT")
    assert (
        weights("memnet=best,resmem=RETRAIN", "memnet,resmem")
        == f"memnet={tmp_path / 'best'},resmem=RETRAIN"
    )
    assert memscore.FinetuneConfig(
        "l.csv", output="r", model="memnet", weights="best"
    ).weights == str(tmp_path / "best")


def test_weights_that_are_neither_a_member_nor_a_path_are_one_line_naming_both(
    tmp_path, monkeypatch, capsys, example_images
):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(example_images[0].parent, tmp_path / "images")
    commands = {
        "score": ["score", "images", "--output", "scores", "--weights", "best"],
        "finetune": [
            "finetune",
            "labels.csv",
            "--output",
            "runs",
            "--name",
            "a",
            "--model",
            "memnet",
            "--weights",
            "best",
        ],
        "serve": ["serve", "--weights", "best"],
    }
    names = {
        "score": "resmem (DEFAULT, RETRAIN)",
        "finetune": "memnet (DEFAULT, LEGACY, MODERN)",
        "serve": "resmem (DEFAULT, RETRAIN)",
    }
    for command, argv in commands.items():
        assert cli.main(argv) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("memscore: error: "), (command, err)
        assert err[0].endswith(
            f"--weights 'best': no such checkpoint file or folder, and not a "
            f"weights name of {names[command]}"
        ), (command, err)
    assert not (tmp_path / "scores").exists() and not (tmp_path / "runs").exists()


def test_a_finetune_checkpoint_folder_scores_from_the_cli_by_its_relative_name(
    ray_local, tmp_path, monkeypatch, capsys, example_images
):
    import torch
    from PIL import Image

    from memscore.models import get_model_weights

    monkeypatch.chdir(tmp_path)
    trained = _memnet_checkpoint(tmp_path / "best").eval()
    assert (
        cli.main(
            [
                "score",
                str(example_images[0].parent),
                "--output",
                "scores",
                "--model",
                "memnet",
                "--weights",
                "best",
            ]
        )
        == 0
    ), capsys.readouterr().err
    summary = json.loads((tmp_path / "scores" / "_memscore.json").read_text())
    assert summary["models"][0]["weights"] == "checkpoint"
    assert summary["models"][0]["preprocessing"] == "MODERN"  # the checkpoint's own pipeline
    assert summary["models"][0]["weights_file"] == str(tmp_path / "best" / "model.safetensors")
    scored = pq.read_table(tmp_path / "scores")
    assert scored.num_rows == len(example_images)
    preprocess = get_model_weights("memnet").MODERN.transforms
    with torch.inference_mode():
        expected = [
            trained(preprocess(Image.open(p).convert("RGB"))[None]).item()
            for p in scored.column("path").to_pylist()
        ]
    np.testing.assert_allclose(scored.column("memorability_memnet").to_numpy(), expected, atol=1e-5)


def test_a_list_field_given_one_name_is_one_name():
    assert memscore.ScoreConfig("m.csv", output="o", models="resmem").models == ("resmem",)
    assert memscore.ScoreConfig("m.csv", output="o", models="resmem, falseresmem").models == (
        "resmem",
        "falseresmem",
    )
    assert memscore.EvaluateConfig(
        "p", truth="t", truth_column="m", report="r", group_by="category"
    ).group_by == ("category",)


def _evaluation_inputs(folder: Path) -> None:
    (folder / "scores").mkdir(parents=True)
    paths = [f"img{i}.jpg" for i in range(20)]
    pq.write_table(
        pa.table(
            {
                "path": paths,
                "memorability": [0.5 + i / 100 for i in range(20)],
                "memscore_error": pa.array([None] * 20, pa.string()),
            }
        ),
        folder / "scores" / "part.parquet",
    )
    (folder / "truth.csv").write_text(
        "path,hit_rate\n"
        + "".join(f"img{i}.jpg,{0.4 + i / 50 + (0.05 if i % 3 == 0 else 0)}\n" for i in range(20))
    )


def test_evaluate_command_and_job_take_relative_paths(tmp_path, monkeypatch, capsys):
    _evaluation_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["scores/", "--truth", "truth.csv", "--truth-column", "hit_rate", "--bootstrap", "50"]
    assert cli.main(["evaluate", *args, "--report", "report/"]) == 0
    assert (tmp_path / "report" / "metrics.json").is_file()
    capsys.readouterr()
    job = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args, "--report", "job-report"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert (tmp_path / "job-report" / "report.md").is_file()


def test_verify_takes_relative_paths(tmp_path, monkeypatch, capsys):
    import json

    from memscore.sources.manifest import manifest_fingerprint, open_manifest

    (tmp_path / "out" / "_memscore").mkdir(parents=True)
    (tmp_path / "m.csv").write_text("path\na.jpg\nb.jpg\n")
    pq.write_table(
        pa.table({"path": ["a.jpg", "b.jpg"], "memscore_row": [0, 1]}),
        tmp_path / "out" / "part.parquet",
    )
    # the run recorded its manifest as memscore records it: an absolute path
    manifest = str(tmp_path / "m.csv")
    (tmp_path / "out" / "_memscore" / "state.json").write_text(
        json.dumps(
            {
                "manifest": manifest,
                "manifest_fingerprint": manifest_fingerprint(open_manifest(manifest)),
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["verify", "out/", "--manifest", "m.csv"]) == 0
    assert "OK: every manifest row" in capsys.readouterr().out


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    tmp_path, monkeypatch, capsys
):
    import memscore.scoring.job

    def broken(config):
        raise RuntimeError("something memscore did not foresee\nand a second line")

    monkeypatch.setattr(memscore.scoring.job, "score", broken)
    argv = ["score", str(tmp_path), "--output", str(tmp_path / "o")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "memscore: error: RuntimeError: something memscore did not foresee "
        "(run again with --debug for the traceback)"
    ]
    with pytest.raises(RuntimeError, match="did not foresee"):
        cli.main([*argv, "--debug"])


def test_version_and_models_json(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"memscore {memscore.__version__}"
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    resmem = next(row for row in rows if row["model"] == "resmem" and row["default"])
    assert resmem["output_column"] == "memorability" and "non-commercial" in resmem["licence"]
    assert resmem["weights"] == "RETRAIN" and resmem["aliases"] == ["DEFAULT"]
