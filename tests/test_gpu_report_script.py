"""scripts/gpu_report.sh on a machine without a GPU: it parses, its --dry-run prints the commands a GPU machine
would run (and builds, installs and creates nothing), and its skip summary counts skips by reason.

Guards: a syntax error or a changed command in the script that only a (rare) GPU run would reveal.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_report.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args, env=None, timeout=60):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_the_commands_and_does_nothing(tmp_path):
    venv = tmp_path / "venv-that-must-not-exist"
    for env in ({"VENV": "none"}, {"VENV": str(venv)}):
        proc = _run("--dry-run", "--quick", env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                 if ":" in line}
        assert lines["build"] == 'DGM_KERNELS_CUDA=1 python -m pip install --no-build-isolation -v -e .[test,avalanche]'
        assert lines["tests"].startswith("python -m pytest -q -p no:cacheprovider -rs")
        assert lines["benchmarks"] == "python -m benchmarks --quick"
        assert "python -m benchmarks.scaling --device cuda --nproc 1,2,4,8" in lines["scaling"]
        # the GPU test plan is part of the suite the script runs (wherever under tests/ its files live)
        assert "test_gpu_plan.py" in lines["gpu plan"] and "test_gpu_pipeline.py" in lines["gpu plan"]
    assert not venv.exists(), "--dry-run created the venv"
    assert "current one" in _run("--dry-run", env={"VENV": "none"}).stdout


def test_dry_run_passes_benchmark_arguments_and_honours_skip_tests():
    proc = _run("--dry-run", "--quick", "--cases", "mnist-dgmw", env={"VENV": "none", "SKIP_TESTS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "benchmarks: python -m benchmarks --quick --cases mnist-dgmw" in proc.stdout
    assert "tests:      skipped (SKIP_TESTS=1)" in proc.stdout
    assert "--dry-run" not in proc.stdout.split("benchmarks:")[1]


def test_skip_summary_counts_by_reason_and_flags_gpu_skips(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text(
        "........s\n"
        "=========================== short test summary info ============================\n"
        "SKIPPED [24] tests/kernels/test_gpu_plan.py:289: needs a CUDA GPU (none is visible on this machine)\n"
        "SKIPPED [2] tests/kernels/test_gpu_plan.py:273: needs two CUDA GPUs (1 visible on this machine)\n"
        "SKIPPED [1] tests/kernels/test_gpu_plan.py:400: needs 24 GiB of free GPU memory, cuda:0 has 3.0 GiB free\n"
        "SKIPPED [3] tests/test_x.py:12: the interpreter: slow\n"
        "SKIPPED [1] tests/test_y.py:5: needs a CUDA GPU (none is visible on this machine)\n"
        "100 passed, 31 skipped in 3.00s\n"
    )
    proc = _run("--skip-summary", str(log))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "== skipped tests: 31" in out
    assert "    25  needs a CUDA GPU (none is visible on this machine)" in out
    assert "     3  the interpreter: slow" in out
    assert "WARNING: 28 skipped tests need a GPU" in out
    clean = tmp_path / "clean.log"
    clean.write_text("100 passed in 1.00s\n")
    out = _run("--skip-summary", str(clean)).stdout
    assert "== skipped tests: 0" in out and "WARNING" not in out
    assert _run("--skip-summary", str(tmp_path / "missing.log")).returncode == 2
