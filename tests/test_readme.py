"""The README and the two-minute walk-through, run top to bottom as written (issue 25).

Every ```bash block of README.md runs in order in a fresh copy of the project (the files a clone of this working tree has: tracked, or untracked
and not ignored), from its root, as a newcomer types them; a ```python block runs with
``python -c``. Two things are not run again: the install at the start of the set-up commands
(this environment is that install; the README's first command is otherwise run whole), and
the test command (what CI runs, this test among it). ```sh blocks are forms for the reader's
own data and are not run (tests/test_cluster_config.py parses their commands).

Then the checkout the README left behind (fine-tuning checkpoints, score folders) is
submitted with ``ray job submit --working-dir .`` to a real Ray head, as the README's cluster
section does: Ray leaves out what .gitignore names, and the upload is measured.

docs/finetune-evaluate.md's walk-through runs the same way in a test of its own, in the
extended tier: its commands are the README's fine-tune, score and evaluate on a hand-written
labels.csv, which CI runs in the README test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The set-up commands' install, which this test's environment already is.
INSTALL = re.compile(
    r"python3 -m venv \.venv && \. \.venv/bin/activate && "
    r"pip install -e \S+ && "
)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, text) of each ```bash and ```python block of ``page``, in order."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def fresh_copy(into: Path) -> Path:
    """The project as a clone of this working tree would be: tracked files and untracked ones
    that are not ignored (never the .venv, nor outputs of earlier runs)."""
    project = into / "memscore"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
    )
    if listed.returncode != 0:  # not a git checkout: leave out what .gitignore names by hand
        shutil.copytree(
            ROOT,
            project,
            ignore=shutil.ignore_patterns(
                ".git",
                ".venv",
                "__pycache__",
                "*.egg-info",
                ".pytest_cache",
                "scores*",
                "runs",
                "report",
                "tried",
                "tried-report",
                "labels.csv",
            ),
        )
        return project
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    return project


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_page(page: Path, project: Path, log: list[str]) -> list[subprocess.CompletedProcess]:
    """Run ``page``'s blocks in ``project``, in order; each must succeed."""
    results = []
    for language, text in blocks(page):
        if "python -m pytest" in text:
            continue  # the test command: CI runs it, and this test is part of it
        text = INSTALL.sub("", text)
        command = ["bash", "-e", "-c", text] if language == "bash" else [sys.executable, "-c", text]
        started = time.monotonic()
        done = subprocess.run(
            command, cwd=project, env=_env(), capture_output=True, text=True, timeout=1200
        )
        log.append(f"{page.name}: {time.monotonic() - started:.0f} s: {text.strip()[:80]}")
        assert done.returncode == 0, f"{page.name} block failed:\n{text}\n{done.stderr[-4000:]}"
        results.append(done)
    return results


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom_and_the_checkout_it_leaves_still_submits(tmp_path):
    from rayhead import start_ray_head

    project = fresh_copy(tmp_path)
    log: list[str] = []
    readme = run_page(ROOT / "README.md", project, log)
    # The README's sample final line is a real one (numbers aside).
    sample = re.search(
        r"The last line of a run reads\s+`([^`]+)`", (ROOT / "README.md").read_text()
    ).group(1)
    first = readme[0].stdout.strip().splitlines()[-1]
    mask = re.compile(r"\d+(\.\d+)?|-> \S+")
    assert mask.sub("#", first) == mask.sub("#", sample), (first, sample)
    print("\n".join(log))
    for made in (
        "scores",
        "scores-folder",
        "scores-table",
        "scores-memnet",
        "runs/try/best",
        "overlays/sheet.png",
    ):
        assert (project / made).exists(), made
    assert (project / "report" / "report.md").exists()

    # What `ray job submit --working-dir .` sends: Ray's own packaging of the folder.
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "working_dir.zip"
    create_package(
        str(project), package, include_gitignore=True, excludes=get_runtime_env_default_excludes()
    )
    size = package.stat().st_size
    names = zipfile.ZipFile(package).namelist()
    left_in = sorted(
        {n.split("/")[0] for n in names}
        & {
            "scores",
            "scores-folder",
            "scores-memnet",
            "scores-maps",
            "runs",
            "report",
            "features-conv4",
            "overlays",
        }
    )
    print(
        f"working_dir package: {size / 2**20:.2f} MiB, {len(names)} files "
        f"(outputs left in: {left_in})"
    )
    assert not left_in and size < 10 * 2**20
    # And a real submission from that checkout, to a real head, runs; meanwhile a plain
    # `memscore score` on the same machine starts a Ray of its own instead of joining the head.
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with start_ray_head(tmp_path) as head:
        submitted = subprocess.run(
            [
                ray_cli,
                "job",
                "submit",
                "--address",
                head.url,
                "--working-dir",
                ".",
                "--",
                "python",
                "-c",
                "import os; print('listing:', sorted(os.listdir('.')))",
            ],
            cwd=project,
            env=head.client_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        beside = subprocess.run(
            ["bash", "-e", "-c", "memscore score examples/images --output scores-beside-a-head/"],
            cwd=project,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-3000:]
    listing = next(
        (line for line in submitted.stdout.splitlines() if line.startswith("listing:")),
        submitted.stdout[-3000:],
    )
    assert "'memscore'" in listing and "'runs'" not in listing and "'scores'" not in listing
    assert beside.returncode == 0, beside.stderr[-3000:]


@pytest.mark.slow
def test_the_finetune_walk_through_runs_top_to_bottom(tmp_path):
    project = fresh_copy(tmp_path)
    log: list[str] = []
    run_page(ROOT / "docs" / "finetune-evaluate.md", project, log)
    print("\n".join(log))
    for made in ("labels.csv", "runs/walk/best", "tried", "tried-report/report.md"):
        assert (project / made).exists(), made
