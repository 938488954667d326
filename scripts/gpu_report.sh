#!/usr/bin/env bash
# Everything a GPU machine runs for the performance report, with no other step:
#   1. a venv (or the active one) with torch 2.14.1 + triton 3.8.0, dgm built with its CUDA kernels (required);
#   2. the whole test suite on the GPU (the cuda / triton parity rows, tests/kernels/test_cuda_ops.py, the GPU test
#      plan tests/kernels/test_gpu_plan.py and tests/dgm/test_gpu_pipeline.py: devices, streams, CUDA graphs,
#      2^31-element tensors, half precision, TF32, training), then a summary of the skipped tests by reason (a GPU
#      test that skips on a GPU machine is flagged);
#   3. the benchmark suite: python -m benchmarks (microbenchmarks fp32 + bf16, roofline, end to end);
#   4. with N >= 2 GPUs: data-parallel scaling, one process per GPU (python -m benchmarks.scaling --device cuda
#      --nproc 1,2,4,..,N), written as benchmarks/results/<gpu>-<date>-scaling.json;
#   5. everything written under benchmarks/results/ (and the test log beside it), named after the GPU.
#
# Usage: bash scripts/gpu_report.sh [--dry-run] [--quick] [extra arguments for python -m benchmarks]
#        bash scripts/gpu_report.sh --skip-summary LOG    (the skip summary of a pytest -rs log, then exit)
#   --dry-run: print what would run (the build, pytest and benchmark commands) and exit 0; needs no GPU, builds
#              nothing, creates no venv.
# Env:   VENV=path (default .venv-gpu; VENV=none uses the current python), CUDA_HOME (default /usr/local/cuda),
#        MAX_JOBS (parallel nvcc jobs, default: the CPU count), SKIP_TESTS=1 (benchmarks only).
# Exit status: non-zero if the build, a test or a benchmark failed; the results written so far stay.
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
VENV="${VENV:-.venv-gpu}"

# The skipped tests of a pytest -rs log ("SKIPPED [n] path:line: reason"), counted by reason.
skip_summary() {
    local log=$1 lines total gpu
    lines=$(grep -E '^SKIPPED \[[0-9]+\] ' "$log" | sed -E 's/^SKIPPED \[([0-9]+)\] [^ ]*: /\1\t/' || true)
    total=$(printf '%s\n' "$lines" | awk -F'\t' 'NF > 1 {s += $1} END {print s + 0}')
    echo "== skipped tests: $total"
    if [ "$total" -gt 0 ]; then
        printf '%s\n' "$lines" | awk -F'\t' 'NF > 1 {n[$2] += $1} END {for (r in n) printf "%6d  %s\n", n[r], r}' \
            | sort -rn
    fi
    gpu=$(printf '%s\n' "$lines" | grep -E 'needs a CUDA GPU|needs two CUDA GPUs|of free GPU memory' \
        | awk -F'\t' 'NF > 1 {s += $1} END {print s + 0}')
    if [ "$gpu" -gt 0 ]; then
        echo "WARNING: $gpu skipped tests need a GPU (or two, or more free memory): on a GPU machine, read the" \
             "reasons above: these checks did not run"
    fi
}

dry_run=0
bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --skip-summary)
            [ $# -ge 2 ] && [ -f "$2" ] || { echo "scripts/gpu_report.sh: --skip-summary needs a log file" >&2; exit 2; }
            skip_summary "$2"
            exit 0 ;;
        *) bench_args+=("$1") ;;
    esac
    shift
done

build_cmd=(python -m pip install --no-build-isolation -v -e ".[test,avalanche]")
test_cmd=(python -m pytest -q -p no:cacheprovider -rs)
bench_cmd=(python -m benchmarks "${bench_args[@]}")

# 1,2,4,...,N for N GPUs (N itself included): the process counts of the scaling benchmark
nproc_list() {
    local n=$1 k=1 out=""
    while [ "$k" -lt "$n" ]; do out="$out$k,"; k=$((k * 2)); done
    echo "$out$n"
}

if [ "$dry_run" = 1 ]; then
    echo "scripts/gpu_report.sh --dry-run: nothing is built or run; on a GPU machine this script would run:"
    if [ "$VENV" = "none" ]; then
        echo "python:     the current one ($(command -v python || echo 'python not found'))"
    else
        echo "python:     the venv $VENV (created with python3 -m venv when missing)"
    fi
    echo "install:    python -m pip install torch==2.14.1 triton==3.8.0 (when missing); ninja pytest pytest-benchmark matplotlib tqdm"
    echo "build:      DGM_KERNELS_CUDA=1 ${build_cmd[*]}"
    if [ "${SKIP_TESTS:-0}" = "1" ]; then
        echo "tests:      skipped (SKIP_TESTS=1)"
    else
        echo "tests:      ${test_cmd[*]}   (log: benchmarks/results/<gpu>-<date>-tests.log, then the skip summary)"
        echo "gpu plan:   $(find tests -name 'test_gpu_*.py' 2>/dev/null | sort | tr '\n' ' ')(collected by the suite)"
    fi
    echo "benchmarks: ${bench_cmd[*]}"
    echo "scaling:    with N >= 2 GPUs: python -m benchmarks.scaling --device cuda --nproc $(nproc_list 8) (shown for N = 8)"
    exit 0
fi

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
if ! DGM_KERNELS_CUDA=1 "${build_cmd[@]}" >"$log.build" 2>&1; then
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
    "${test_cmd[@]}" 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    skip_summary "$log" | tee -a "$log"
fi

echo "== benchmark suite"
"${bench_cmd[@]}" || status=1

ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
    echo "== data-parallel scaling on $ngpu GPUs"
    python -m benchmarks.scaling --device cuda --nproc "$(nproc_list "$ngpu")" \
        --out "benchmarks/results/${gpu}-${stamp}-scaling.json" | tee "benchmarks/results/${gpu}-${stamp}-scaling.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "== data-parallel scaling: skipped ($ngpu GPU; it needs 2 or more)"
fi
echo "results: $(ls -1t benchmarks/results/ | head -n 6 | tr '\n' ' ')"
exit $status
