"""Microbenchmarks of dgm_kernels (pytest-benchmark); see benchmarks/README.md.

Not part of the installed library: run from the repository root, e.g. ``python -m benchmarks.report --run``.
"""
