"""What a run prints (issue 25, "the second hour of a real user"): memscore's own lines, Ray
Data's progress bars on a terminal, and nothing of Ray's unless ``--verbose``; ``--quiet`` leaves
the final line. Ray's lines go to ``memscore-PID.log`` in Ray's session log folder.

Each run is a real ``memscore`` process, on a pipe as a script sees it or on a pseudo-terminal
as a person does (what the terminal shows is rendered from the bytes written, carriage returns
and cursor movements included). Before this, the README's first command printed 42 lines on a
pipe (41 of Ray's: INFO lines, a token-authentication WARNING, a C++ ``core_worker.cc`` line)
and 18 on a terminal; a fine-tune of 5 images wrote 66 KB, with a ``UserWarning`` of
``train_loop.py`` among them.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pytest
from synthetic import write_tint_dataset

import memscore
from memscore import cli
from memscore.errors import counted
from memscore.training.run_folder import STATE_FILE

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    # RAY_AUTH_MODE left as a user has it: Ray's token-authentication WARNING is one of the
    # lines that must stay off the terminal
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    return env


def _memscore(*argv: str) -> list[str]:
    return [sys.executable, "-m", "memscore.cli", *argv]


def _on_a_pipe(argv: list[str], cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=600
    )


def _on_a_terminal(argv: list[str], cwd: Path, timeout_s: float = 600) -> tuple[int, str]:
    """``argv`` with stdin, stdout and stderr on a pseudo-terminal 160 columns wide: its exit
    code and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        argv, cwd=cwd, env=_env(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    written, deadline = bytearray(), time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                written += data
            elif process.poll() is not None:
                break  # (a process the run left behind may hold the terminal open)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
    return code, written.decode("utf-8", "replace")


def shown(written: str) -> list[str]:
    """The non-blank lines a terminal shows after ``written``: a carriage return goes back to
    the line's start, ``ESC[nA`` up n lines, ``ESC[K`` clears to the line's end, colours are
    dropped; nothing scrolls away."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|.", written, re.S):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            lines += [[] for _ in range(row + 1 - len(lines))]
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token.endswith("K"):
                del lines[row][col:]
        else:
            line = lines[row]
            line += [" "] * (col - len(line))
            if col < len(line):
                line[col] = token
            else:
                line.append(token)
            col += 1
    return [text for text in ("".join(line).rstrip() for line in lines) if text.strip()]


def _rays_lines(text: str) -> list[str]:
    """Lines of Ray's log format (its Python loggers', its C++ core worker's)."""
    return [
        line
        for line in text.splitlines()
        if re.search(r"\t(INFO|WARNING|ERROR) \S+\.py:\d+ -- ", line)
        or re.search(r"^\[[\d\- :,]+ [IWE] \d+ \d+\] \S+\.cc:\d+", line)
        or "Token authentication" in line
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory, example_images) -> Path:
    folder = tmp_path_factory.mktemp("quiet") / "images"
    shutil.copytree(example_images[0].parent, folder)
    return folder


# ----------------------------------------------------------------------------- fast
def test_counts_in_memscores_lines_are_singular_for_one():
    assert counted(1, "error") == "1 error" and counted(0, "error") == "0 errors"
    line = cli.format_summary_line(
        {
            "rows_out": 1,
            "rows_scored": 0,
            "rows_with_errors": 1,
            "images_per_s": 0.5,
            "non_image_files_skipped": 1,
            "output": "scores/",
        }
    )
    assert line == (
        "memscore: 1 row, 0 scored, 1 error, 0.5 images/s (1 non-image file skipped) -> scores/"
    )
    from memscore.train_sae.job import summary_line

    sae = summary_line(
        {
            "encoder": {"name": "clip"},
            "rows_trained": 1,
            "rows_with_image_errors": 0,
            "epochs_run": 1,
            "initial_reconstruction_loss": 2.0,
            "final_reconstruction_loss": 1.0,
            "best_checkpoint": "runs/a/best",
        }
    )
    assert " 1 image (0 failed), 1 epoch: " in sae


def test_a_finetune_line_says_an_undefined_spearman_in_words_never_none():
    summary = {
        "epochs_run": 1,
        "best": {"epoch": 0, "val_spearman": None, "val_rows": 2},
        "rows_per_split": {"train": 2, "validation": 2, "test": 1},
        "test": {"metrics": {"overall": {"spearman": None, "n": 1}}},
        "best_checkpoint": "runs/a/best",
    }
    line = cli.format_finetune_line(summary)
    assert line == (
        "memscore: 1 epoch, best epoch 0 (validation Spearman undefined on 2 rows), "
        "test Spearman undefined on 1 row -> runs/a/best"
    )
    summary["best"] = {"epoch": 2, "val_spearman": 0.61234, "val_rows": 30}
    summary["test"] = {"metrics": {"overall": {"spearman": float("nan"), "n": 3}}}
    summary["epochs_run"] = 3
    assert cli.format_finetune_line(summary) == (
        "memscore: 3 epochs, best epoch 2 (validation Spearman 0.612), test Spearman undefined "
        "on 3 rows -> runs/a/best"
    )
    summary.update(test=None, rows_per_split={"test": 0}, work_done=False)
    assert cli.format_finetune_line(summary) == (
        "memscore: already complete: nothing to do: 3 epochs, best epoch 2 (validation "
        "Spearman 0.612), no test rows -> runs/a/best"
    )


def test_every_weights_name_that_weights_takes_is_one_memscore_models_lists(capsys):
    # --weights memnet.safetensors (no such file) is refused listing DEFAULT, LEGACY, MODERN:
    # `memscore models` shows DEFAULT too, as the default member's other name
    from memscore.models import get_model_weights, list_models

    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for name in list_models():
        listed = {
            alias
            for row in rows
            if row["model"] == name
            for alias in [row["weights"], *row["aliases"]]
        }
        assert listed == set(get_model_weights(name).names()), name
    assert cli.main(["models"]) == 0
    memnet = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memnet ")]
    assert memnet[0].startswith("memnet  weights=LEGACY (default, also --weights DEFAULT)")
    assert memnet[1].startswith("memnet  weights=MODERN  ")


def test_a_finetune_refused_before_training_leaves_no_run_folder(tmp_path):
    manifest = write_tint_dataset(tmp_path, 6)
    rows = pyarrow.csv.read_csv(manifest)
    rows = rows.append_column("fold", pa.array(["train"] * rows.num_rows))
    pyarrow.csv.write_csv(rows, manifest)
    config = memscore.FinetuneConfig(
        str(manifest), output=str(tmp_path / "runs"), name="a", model="memnet", split_column="fold"
    )
    with pytest.raises(memscore.MemscoreError, match="no validation rows"):
        memscore.finetune(config)
    assert not (tmp_path / "runs").exists()


def test_options_choose_how_much_of_ray_reaches_the_terminal():
    from memscore.runtime import failures

    parser = cli.build_parser()
    argv = ["score", "images", "--output", "scores"]
    assert parser.parse_args(argv).verbosity == failures.NORMAL
    assert parser.parse_args([*argv, "--verbose"]).verbosity == failures.VERBOSE
    assert parser.parse_args([*argv, "--quiet"]).verbosity == failures.QUIET
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--quiet", "--verbose"])
    # the jobs take them too; evaluate starts no Ray and has none
    parse_args, _ = cli.job_entrypoint(memscore.FinetuneConfig, "Fine-tune.")
    assert parse_args(["l.csv", "--output", "r", "--quiet"]).verbosity == failures.QUIET
    parse_args, _ = cli.job_entrypoint(memscore.EvaluateConfig, "Evaluate.")
    assert not hasattr(
        parse_args(["p", "--truth", "t.csv", "--truth-column", "m", "--report", "r"]), "verbosity"
    )


# ----------------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_a_plain_run_prints_its_final_line_alone_and_verbose_brings_rays_lines_back(
    images, tmp_path
):
    command = _memscore("score", str(images), "--output", "scores/", "--overwrite")
    run = subprocess.Popen(
        command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert err == "", err[-3000:]  # no INFO, no token WARNING, no core_worker.cc line
    assert (
        out.splitlines()
        == [
            line
            for line in out.splitlines()
            if line.startswith("memscore: 5 rows, 5 scored, 0 errors, ")
        ]
        and len(out.splitlines()) == 1
    ), out
    # ... which went to the run's log file in Ray's session log folder
    # (session_latest is a link to the newest session: the same file, seen twice)
    logs = sorted(
        {
            os.path.realpath(p)
            for p in glob.glob(
                os.path.join(
                    tempfile.gettempdir(), "ray", "session_*", "logs", f"memscore-{run.pid}.log"
                )
            )
        }
    )
    assert len(logs) == 1, logs
    logged = Path(logs[0]).read_text()
    assert "Started a local Ray instance" in logged and _rays_lines(logged)

    # A finished output: said so, and nothing done (no Ray started)
    again = _on_a_pipe(_memscore("score", str(images), "--output", "scores/", "--resume"), tmp_path)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert again.stdout.splitlines() == [
        (
            f"memscore: already complete: nothing to do: 5 rows, 5 scored, 0 errors -> "
            f"{tmp_path / 'scores'}"
        )
    ]
    summary = memscore.score(
        memscore.ScoreConfig(str(images), output=str(tmp_path / "scores"), resume=True)
    )
    assert summary["work_done"] is False and summary["rows_out"] == 5
    assert "work_done" not in json.loads((tmp_path / "scores" / "_memscore.json").read_text())

    verbose = _on_a_pipe([*command, "--verbose"], tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Started a local Ray instance" in verbose.stderr and _rays_lines(verbose.stderr)
    assert verbose.stdout.strip().splitlines()[-1].startswith("memscore: 5 rows, 5 scored")


@pytest.mark.slow
def test_on_a_terminal_the_progress_bars_show_and_quiet_leaves_the_final_line(images, tmp_path):
    command = _memscore("score", str(images), "--output", "scores/", "--overwrite")
    code, written = _on_a_terminal([*command, "--quiet"], tmp_path)
    assert code == 0, written[-3000:]
    assert len(shown(written)) == 1 and shown(written)[0].startswith(
        "memscore: 5 rows, 5 scored, 0 errors, "
    ), written[-3000:]

    code, written = _on_a_terminal(command, tmp_path)
    assert code == 0, written[-3000:]
    lines = shown(written)
    assert not _rays_lines("\n".join(lines)), lines
    assert lines[0].startswith("memscore: Ray's log lines go to ") and re.search(
        r"/logs/memscore-\d+\.log, its workers' to the same folder \(--verbose prints them "
        r"here\)$",
        lines[0],
    ), lines[0]
    assert any("MapBatches(ScoreImages)" in line for line in lines), lines  # a progress bar
    assert lines[-1].startswith("memscore: 5 rows, 5 scored, 0 errors, "), lines
    # measured on 2 cores: 9 (the log line, the sampling bar, 6 of the executor's, the summary)
    assert len(lines) <= 12, lines


@pytest.mark.slow
def test_a_refused_finetune_leaves_nothing_so_the_corrected_command_runs_and_then_is_done(tmp_path):
    # 8 images: 4 train, 3 validation, 1 test in `split`; `fold` has no validation rows
    manifest = write_tint_dataset(tmp_path, 8, seed=3)
    rows = pyarrow.csv.read_csv(manifest)
    rows = rows.append_column("split", pa.array(["train"] * 4 + ["validation"] * 3 + ["test"]))
    rows = rows.append_column("fold", pa.array(["train"] * 7 + ["test"]))
    pyarrow.csv.write_csv(rows, manifest)
    base = _memscore(
        "finetune",
        str(manifest),
        "--output",
        "runs",
        "--name",
        "a",
        "--model",
        "memnet",
        "--epochs",
        "1",
        "--rows-per-block",
        "8",
    )

    refused = _on_a_pipe([*base, "--split-column", "fold"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "no validation rows" in refused.stderr
    assert not (tmp_path / "runs" / "a").exists()  # no state.json, no splits/

    # --verbose forwards the training workers' output: a warning of theirs would be there
    corrected = _on_a_pipe([*base, "--split-column", "split", "--verbose"], tmp_path)
    assert corrected.returncode == 0, corrected.stderr[-5000:]
    assert "UserWarning" not in corrected.stderr and "requires_grad" not in corrected.stderr, [
        line for line in corrected.stderr.splitlines() if "Warning" in line
    ]
    assert (tmp_path / "runs" / "a" / STATE_FILE).exists()
    last = corrected.stdout.strip().splitlines()[-1]
    assert last.startswith("memscore: 1 epoch, best epoch 0 (validation Spearman "), last
    assert last.endswith(f", test Spearman undefined on 1 row -> {tmp_path}/runs/a/best"), last
    ours = [
        line
        for line in (corrected.stdout + corrected.stderr).splitlines()
        if line.startswith("memscore:")
    ]
    assert not [line for line in ours if "None" in line or "1 epochs" in line], ours

    done = _on_a_pipe([*base, "--split-column", "split"], tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        last.replace("memscore: ", "memscore: already complete: nothing to do: ", 1)
    ]
