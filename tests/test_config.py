"""Config validation, the CLI's one-to-one mapping onto it, storage options, actor planning."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest

from memscore import storage
from memscore.cli import build_parser
from memscore.config import MemscoreError, ScoreConfig, add_arguments, from_args
from memscore.stages.pipeline import plan_model_actors
from memscore.stages.predict import pick_device


def test_every_config_field_is_an_option_and_back():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "m.csv",
            "--output",
            "out",
            "--model",
            "resmem",
            "--batch-size",
            "7",
            "--limit",
            "3",
            "--num-gpus",
            "2",
            "--gpus-per-actor",
            "0.5",
            "--overwrite",
            "--storage-option",
            "endpoint_url=http://127.0.0.1:9",
            "--storage-option",
            "client_kwargs.region_name=eu-west-1",
            "--storage-option",
            "anon=false",
        ]
    )
    config = from_args(args)
    assert config == ScoreConfig(
        manifest="m.csv",
        output="out",
        models=("resmem",),
        batch_size=7,
        limit=3,
        num_gpus=2.0,
        gpus_per_actor=0.5,
        overwrite=True,
        storage_options={
            "endpoint_url": "http://127.0.0.1:9",
            "anon": False,
            "client_kwargs": {"region_name": "eu-west-1"},
        },
    )
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(ScoreConfig)}


def test_defaults_survive_the_parser():
    args = build_parser().parse_args(["score", "m.csv", "--output", "o"])
    assert from_args(args) == ScoreConfig(manifest="m.csv", output="o")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"limit": 0}, "--limit must be at least 1"),
        ({"models": ("resmem", "resmem")}, "named twice"),
        ({"models": ("nope",)}, "unknown model 'nope'"),
        ({"gpus_per_actor": 0}, "--gpus-per-actor must be positive"),
        ({"num_gpus": -1}, "--num-gpus must not be negative"),
    ],
)
def test_validation_names_the_problem(change, message):
    with pytest.raises(MemscoreError, match=message):
        dataclasses.replace(ScoreConfig("m.csv", output="o"), **change).validated()


def test_bad_storage_option_is_a_one_line_error():
    args = build_parser().parse_args(["score", "m", "--output", "o", "--storage-option", "novalue"])
    with pytest.raises(MemscoreError, match="not KEY=VALUE"):
        from_args(args)


def test_redact_hides_secrets_at_any_depth():
    options = {
        "key": "AKIA",
        "secret": "s3cr3t",
        "endpoint_url": "http://h",
        "client_kwargs": {"aws_session_token": "tok", "region_name": "r"},
    }
    assert storage.redact(options) == {
        "key": "***",
        "secret": "***",
        "endpoint_url": "http://h",
        "client_kwargs": {"aws_session_token": "***", "region_name": "r"},
    }


def test_storage_join_and_parent_keep_url_schemes(tmp_path):
    assert storage.join("s3://b/dir", "a/x.jpg") == "s3://b/dir/a/x.jpg"
    assert storage.parent("s3://b/dir/m.csv") == "s3://b/dir"
    assert storage.parent(str(tmp_path / "m.csv")) == str(tmp_path)
    assert storage.pyarrow_filesystem(str(tmp_path)) is None


@pytest.mark.parametrize(
    "cluster_gpus, change, expected",
    [
        (0, {}, {"actors": 1, "num_gpus": 0, "use_gpu": False}),
        (0, {"actors": 3}, {"actors": 3, "num_gpus": 0, "use_gpu": False}),
        (4, {}, {"actors": 4, "num_gpus": 1.0, "use_gpu": True}),
        (4, {"num_gpus": 2}, {"actors": 2, "num_gpus": 1.0, "use_gpu": True}),
        (4, {"gpus_per_actor": 0.5}, {"actors": 8, "num_gpus": 0.5, "use_gpu": True}),
        (4, {"num_gpus": 0}, {"actors": 1, "num_gpus": 0, "use_gpu": False}),
    ],
)
def test_one_model_actor_per_gpu(cluster_gpus, change, expected):
    config = dataclasses.replace(ScoreConfig("m", output="o"), **change)
    plan = plan_model_actors(config, cluster_gpus)
    assert {k: plan[k] for k in expected} == expected


def test_asking_for_more_gpus_than_the_cluster_has_is_an_error():
    with pytest.raises(MemscoreError, match="cluster has 1 GPUs"):
        plan_model_actors(ScoreConfig("m", output="o", num_gpus=2), 1)


def test_a_gpu_torch_cannot_see_falls_back_to_cpu_with_a_warning(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="memscore.stages.predict"):
        assert pick_device(True).type == "cpu"
    assert "torch sees none" in caplog.text
    caplog.clear()
    assert pick_device(False).type == "cpu"
    assert caplog.text == ""


def test_the_job_entrypoint_takes_the_cli_options_and_fails_the_same_way(tmp_path):
    import subprocess
    import sys

    from memscore.config import from_args

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
    import score as job

    argv = ["m.csv", "--output", "o", "--batch-size", "4", "--resume", "--id-column", "key"]
    assert from_args(job.parse_args(argv)) == from_args(build_parser().parse_args(["score", *argv]))
    bad = tmp_path / "m.csv"
    bad.write_text("file\nx.jpg\n")
    result = subprocess.run(
        [sys.executable, "jobs/score.py", str(bad), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].endswith("name the image column with --path-column")
    )


def test_the_finetune_job_entrypoint_takes_the_cli_options_and_fails_the_same_way(tmp_path):
    import subprocess
    import sys

    from memscore.config import FinetuneConfig, from_args

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
    import finetune as job

    argv = [
        "l.csv",
        "--output",
        "runs",
        "--name",
        "lab-a",
        "--model",
        "memnet",
        "--mode",
        "full",
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--augment",
        "none",
        "--workers",
        "2",
    ]
    from_job = from_args(job.parse_args(argv), FinetuneConfig)
    assert from_job == from_args(build_parser().parse_args(["finetune", *argv]), FinetuneConfig)
    assert (from_job.mode, from_job.epochs, from_job.augmentations, from_job.workers) == (
        "full",
        3,
        (),
        2,
    )
    labels = tmp_path / "l.csv"
    labels.write_text("path,score\nx.jpg,0.5\n")
    result = subprocess.run(
        [
            sys.executable,
            "jobs/finetune.py",
            str(labels),
            "--output",
            str(tmp_path / "runs"),
            "--model",
            "memnet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("memscore: error:")
    assert "no --label-column 'memorability'" in result.stderr


JOB_CONFIGS = {  # command -> (its config's module, the class)
    "score": ("memscore.scoring.config", "ScoreConfig"),
    "finetune": ("memscore.finetuning.config", "FinetuneConfig"),
    "train-sae": ("memscore.train_sae.config", "TrainSAEConfig"),
    "evaluate": ("memscore.evaluation.config", "EvaluateConfig"),
    "serve": ("memscore.serve.config", "ServeConfig"),
}


def _config_class(command: str):
    import importlib

    module, name = JOB_CONFIGS[command]
    return getattr(importlib.import_module(module), name)


def test_memscore_config_is_the_public_name_of_each_jobs_config():
    import memscore
    import memscore.config as public

    for command in ("score", "finetune", "train-sae", "evaluate"):
        cls = _config_class(command)
        assert getattr(public, cls.__name__) is cls
    assert memscore.ScoreConfig is public.ScoreConfig
    assert set(public.__all__) <= set(dir(public))


@pytest.mark.parametrize("command", sorted(JOB_CONFIGS))
def test_each_command_lists_its_configs_fields_in_order_and_help_shows_them(command):
    """``memscore COMMAND --help`` lists one option per field: the config's own fields in their
    order, then those it shares (``TrainingRunOptions``); ``help(Config)`` shows each one."""
    from memscore.options import fields_in_help_order, option_flag

    cls = _config_class(command)
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    listed = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in subparsers.choices[command]._actions
        if action.dest in {f.name for f in dataclasses.fields(cls)}
    ]
    fields = fields_in_help_order(cls)
    assert listed == [option_flag(f) if not f.metadata["positional"] else f.name for f in fields]
    own = [f.name for f in fields if not f.kw_only]
    assert [f.name for f in fields][: len(own)] == own
    for f in fields:
        assert f"        {f.name}: " in cls.__doc__, f.name


def test_the_configs_know_no_other_job():
    """A job's config imports the options module and the shared training options, never another
    job's package; the options module and the stages know no job at all."""
    import ast

    import memscore

    root = Path(memscore.__file__).parent
    jobs = {"scoring", "finetuning", "train_sae", "evaluation", "serve"}

    def packages_imported(path: Path) -> set[str]:
        """``memscore.X`` for each ``memscore.X...`` that ``path`` imports."""
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return {".".join(name.split(".")[:2]) for name in names if name.startswith("memscore.")}

    for job in jobs:
        others = {f"memscore.{other}" for other in jobs - {job}} | {"memscore.config"}
        assert not packages_imported(root / job / "config.py") & others, job
    every_job = {f"memscore.{job}" for job in jobs} | {"memscore.config"}
    for lower in ("options.py", "training/options.py", "stages/pipeline.py"):
        assert not packages_imported(root / lower) & every_job, lower
