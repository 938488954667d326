#!/usr/bin/env bash
# Everything a GPU machine runs for the performance report, with no other step:
#   1. a venv (or the active one) with torch 2.14.1 + triton 3.8.0, dgm built with its CUDA kernels (required);
#   2. the whole test suite on the GPU (the cuda / triton parity rows, tests/kernels/test_cuda_ops.py, ...);
#   3. the benchmark suite: python -m benchmarks (microbenchmarks fp32 + bf16, roofline, end to end);
#   4. everything written under benchmarks/results/ (and the test log beside it), named after the GPU.
#
# Usage: bash scripts/gpu_report.sh [--quick] [extra arguments for python -m benchmarks]
# Env:   VENV=path (default .venv-gpu; VENV=none uses the current python), CUDA_HOME (default /usr/local/cuda),
#        MAX_JOBS (parallel nvcc jobs, default: the CPU count), SKIP_TESTS=1 (benchmarks only).
# Exit status: non-zero if the build, a test or a benchmark failed; the results written so far stay.
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
VENV="${VENV:-.venv-gpu}"

if [ "$VENV" != "none" ]; then
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || exit 1
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
if ! python -c "import torch, triton" 2>/dev/null; then
    python -m pip install --quiet "torch==2.14.1" "triton==3.8.0" || exit 1
fi
python -m pip install --quiet ninja pytest pytest-benchmark matplotlib tqdm || exit 1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "scripts/gpu_report.sh: torch sees no CUDA GPU; this script is for a GPU machine" >&2
    exit 2
fi
nvidia-smi -L || true

stamp=$(date +%Y-%m-%d-%H%M)
gpu=$(python -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-')[:48])")
mkdir -p benchmarks/results
log="benchmarks/results/${gpu}-${stamp}-tests.log"

echo "== build (DGM_KERNELS_CUDA=1: the CUDA kernels are required)"
if ! DGM_KERNELS_CUDA=1 python -m pip install --no-build-isolation -v -e ".[test]" >"$log.build" 2>&1; then
    tail -n 60 "$log.build"
    echo "scripts/gpu_report.sh: the build failed (log: $log.build)" >&2
    exit 1
fi
grep -E '\[dgm_kernels._C\]' "$log.build" || true
rm -f "$log.build"
python -c "import dgm_kernels as dk; print('backends:', dk.backend_status())"

status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    echo "== tests on the GPU (log: $log)"
    python -m pytest -q -p no:cacheprovider -rs 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== benchmark suite"
python -m benchmarks "$@" || status=1
echo "results: $(ls -1t benchmarks/results/ | head -n 6 | tr '\n' ' ')"
exit $status
