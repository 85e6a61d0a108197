"""memscore's top level: the three jobs are functions of the package, whatever is imported."""

from __future__ import annotations

import subprocess
import sys


def test_score_finetune_and_evaluate_are_the_packages_functions_after_every_module_loads():
    # In a fresh interpreter: every job module imported first, as the CLI and Ray workers do,
    # so a submodule named like a job would have replaced the function by now.
    code = (
        "import inspect, memscore, memscore.scoring.job, memscore.finetuning.job, memscore.evaluation.job, memscore.cli\n"
        "for name in ('score', 'finetune', 'evaluate'):\n"
        "    job = getattr(memscore, name)\n"
        "    assert inspect.isfunction(job), (name, job)\n"
        "    assert job.__module__ == 'memscore', (name, job.__module__)\n"
        "    assert name in memscore.__all__, name\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_evaluate_from_the_top_level_is_the_evaluation_job(tmp_path):
    import pytest

    import memscore

    config = memscore.EvaluateConfig(
        str(tmp_path / "no-such-scores"),
        truth=str(tmp_path / "no.csv"),
        truth_column="m",
        report=str(tmp_path / "report"),
    )
    # A missing truth file: the job's own one-line error, naming it.
    with pytest.raises(memscore.MemscoreError, match=r"--truth .*no\.csv: no such file or folder"):
        memscore.evaluate(config)
