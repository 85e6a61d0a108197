"""The examples in memscore's docstrings, run by pytest's doctest collection (pyproject.toml:
``--doctest-modules``, testpaths ``tests`` and ``memscore``).

Each example runs in a scratch folder of its own that links ``examples`` to the repository's, so
``examples/images`` resolves as it does from the repository root and whatever an example writes
(``scores/``, ``runs/``, ``labels.csv``) is thrown away. Examples that start Ray or build a
published model are marked slow, as the tests that do (tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

ROOT = Path(__file__).resolve().parent

# Doctest names (module.object) whose example starts Ray, Ray Train, or builds ResNet-152.
SLOW_DOCTESTS = frozenset(
    {
        "memscore.score",
        "memscore.scoring.job.score",  # a scoring run on a local Ray
        "memscore.finetune",
        "memscore.finetuning.job.finetune",  # Ray Train
        "memscore.scoring.verify.verify",  # scores the examples first
        "memscore.get_model",
        "memscore.models.registry.get_model",  # ResMem's ResNet-152
        "memscore.stages.predict.ScoreImages",  # ResMem's ResNet-152
    }
)


# Slow examples CI does not run (tests/conftest.py's EXTENDED says why a tier is left out):
# each runs a job that a kept test runs too.
EXTENDED_DOCTESTS = frozenset(
    {
        "memscore.scoring.job.score",  # memscore.score's example is the same run
        "memscore.finetune",  # test_finetune.py's tint run fine-tunes end to end
        "memscore.finetuning.job.finetune",
        "memscore.feature_analysis.job.features",  # test_features.py runs the job
        "memscore.maps.job.maps",  # test_maps.py scores with --maps and draws
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, DoctestItem) and item.name in SLOW_DOCTESTS | EXTENDED_DOCTESTS:
            item.add_marker(pytest.mark.slow)
        if isinstance(item, DoctestItem) and item.name in EXTENDED_DOCTESTS:
            item.add_marker(pytest.mark.extended)


@pytest.fixture(autouse=True)
def _doctests_run_in_a_scratch_folder(request):
    if not isinstance(request.node, DoctestItem):
        return  # a test of tests/: its own fixtures decide
    scratch = request.getfixturevalue("tmp_path")
    monkeypatch = request.getfixturevalue("monkeypatch")
    (scratch / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    monkeypatch.chdir(scratch)
    # Ray's embedded instance: token auth prints a warning per start and nothing needs it.
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
