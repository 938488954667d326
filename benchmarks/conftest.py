"""pytest configuration of the microbenchmarks: command-line options, timing budget, compile cache, and the
extra fields written into pytest-benchmark's JSON (machine details, skipped combinations and why).

Options (all optional):

``--dgm-quick``        the smoke subset of shapes and a small timing budget per benchmark
``--dgm-devices LIST`` comma-separated devices (``cpu``, ``cuda``); default: cpu, plus cuda when present
``--dgm-budget SEC``   target seconds of timed calls per benchmark (default 1.0; 0.15 with --dgm-quick)
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

# Run from anywhere: the suite imports dgm_kernels and benchmarks from the repository it lives in.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks import report, shapes  # noqa: E402

_SKIPS = pytest.StashKey[list]()
_COMPILES = pytest.StashKey[dict]()
_STARTED = pytest.StashKey[float]()
_LOAD_AT_START = pytest.StashKey[object]()


def _loadavg():
    """The 1-minute load average (None where the OS has none): a busy machine makes timings noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def pytest_addoption(parser):
    group = parser.getgroup("dgm-benchmarks", "dgm_kernels microbenchmarks")
    group.addoption("--dgm-quick", action="store_true", default=False,
                    help="run the smoke subset of shapes with a small timing budget")
    group.addoption("--dgm-devices", default=None,
                    help="comma-separated devices to benchmark (cpu, cuda); default: cpu, plus cuda when present")
    group.addoption("--dgm-budget", type=float, default=None,
                    help="target seconds of timed calls per benchmark (default 1.0, or 0.15 with --dgm-quick)")


def requested_devices(config) -> list[str]:
    try:
        return shapes.parse_devices(config.getoption("--dgm-devices"), torch.cuda.is_available())
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@dataclass(frozen=True)
class TimingConfig:
    """How long to time one benchmark.

    ``budget_s``: target total of timed calls; ``min_rounds``/``max_rounds``: bounds on the rounds whose
    median is reported; ``min_round_s``: calls shorter than this are repeated within a round (where no
    per-call setup is needed), so timer resolution and Python overhead of the loop do not dominate;
    ``warmup``: untimed calls first (lazy initialisation, allocator caches, autotuning).
    """

    budget_s: float
    min_rounds: int
    max_rounds: int
    min_round_s: float
    warmup: int


def timing_config(config) -> TimingConfig:
    quick = config.getoption("--dgm-quick")
    budget = config.getoption("--dgm-budget")
    if budget is not None and not budget > 0:
        raise pytest.UsageError(f"--dgm-budget must be a number of seconds > 0, got {budget}")
    if quick:
        return TimingConfig(budget_s=budget or 0.15, min_rounds=3, max_rounds=200, min_round_s=1e-4, warmup=2)
    return TimingConfig(budget_s=budget or 1.0, min_rounds=7, max_rounds=5000, min_round_s=2e-4, warmup=3)


@pytest.fixture(scope="session")
def timing(pytestconfig) -> TimingConfig:
    return timing_config(pytestconfig)


@pytest.fixture
def record_skip(request):
    """Skip the current benchmark and keep the reason for the report (pytest-benchmark's JSON lists only
    the benchmarks that ran)."""

    def skip(reason: str, **fields):
        request.config.stash[_SKIPS].append({"nodeid": request.node.nodeid, "reason": reason, **fields})
        pytest.skip(reason)

    return skip


class CompileCache:
    """torch.compile of the reference function, once per (case, device, dtype).

    Only the latest shape is kept: before compiling the next one, dynamo's caches are reset, so the
    compiled code of every shape is specialised to it (``dynamic=False``) and no shape is pushed past
    dynamo's recompile limit into silent eager fallback. The benchmarks are ordered shape by shape, so
    each shape compiles once. A failure is remembered with its reason and skips that shape's benchmarks.
    """

    def __init__(self, stash: dict):
        self._key = None
        self._fn = None
        self._stash = stash  # key -> {"compile_s": float} or {"error": str}, written into the JSON

    def get(self, key, build, warm_up):
        """The compiled function for ``key``: ``build()`` gives the eager one; ``warm_up(fn)`` runs it."""
        entry = self._stash.get(key)
        if entry is not None and "error" in entry:
            return None, entry["error"]
        if key != self._key:
            import torch._dynamo

            torch._dynamo.reset()
            self._key, self._fn = None, None
            start = time.perf_counter()
            try:
                fn = torch.compile(build(), dynamic=False)
                warm_up(fn)  # compiles forward and backward; later calls only run them
            except Exception as exc:  # record and skip: the baseline is missing, not the suite broken
                reason = f"torch.compile failed on this machine: {type(exc).__name__}: {str(exc).strip()[:300]}"
                self._stash[key] = {"error": reason}
                return None, reason
            self._stash[key] = {"compile_s": round(time.perf_counter() - start, 3)}
            self._key, self._fn = key, fn
        return self._fn, None


@pytest.fixture(scope="session")
def compile_cache(pytestconfig) -> CompileCache:
    return CompileCache(pytestconfig.stash[_COMPILES])


def pytest_configure(config):
    config.stash[_SKIPS] = []
    config.stash[_COMPILES] = {}
    config.stash[_STARTED] = time.time()
    config.stash[_LOAD_AT_START] = _loadavg()
    if os.environ.get("TRITON_INTERPRET") == "1":
        # the tests set it to run Triton kernels on the CPU; timings of the interpreter mean nothing
        config.issue_config_time_warning(
            pytest.PytestConfigWarning("TRITON_INTERPRET=1 is set: the triton backend is skipped"), stacklevel=2
        )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dgm"] = report.machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    compiles = config.stash[_COMPILES]
    output_json["dgm"] = {
        "quick": bool(config.getoption("--dgm-quick")),
        "devices": requested_devices(config),
        "timing": asdict(timing_config(config)),
        "duration_s": round(time.time() - config.stash[_STARTED], 1),
        "loadavg_start": config.stash[_LOAD_AT_START],
        "loadavg_end": _loadavg(),
        "skipped": config.stash[_SKIPS],
        "compile": {"/".join(map(str, k)): v for k, v in compiles.items()},
    }
