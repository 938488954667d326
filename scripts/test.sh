#!/usr/bin/env bash
# Install dgm (torch first, then the extension built against it) and run the test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]   (env DGM_TEST_WORKERS: pytest-xdist workers, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
python -m pip install --quiet "torch==2.14.1" "triton==3.8.0" ninja
log=$(mktemp)
if ! python -m pip install --no-build-isolation -v -e ".[test,avalanche]" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "scripts/test.sh: building dgm failed (full log: $log)" >&2
    exit 1
fi
grep -E '\[dgm_kernels._C\]' "$log" || true
python -c "import dgm_kernels as dk; print('dgm_kernels backends:', dk.backend_status())"
# two pytest-xdist workers (DGM_TEST_WORKERS=N for N, 0 for none): 13 instead of 16 minutes on 2 cores
python -m pytest -q -p no:cacheprovider -n "${DGM_TEST_WORKERS:-2}" "$@"
