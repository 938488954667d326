"""Smoke tests of the benchmark suite's pieces that can break silently: the shapes, the workloads it builds,
and the report's arithmetic (a wrong speedup would mislead every later decision about the kernels)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# benchmarks/ is a directory of the repository, not part of the installed package
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import report, shapes  # noqa: E402


# --- shapes -----------------------------------------------------------------------------------------


def _expected_out_shape(case: shapes.Case) -> tuple:
    """The output shape computed by the op on meta tensors (no data, no time)."""
    t = {k: v for k, v in case.tensors.items() if k != "masks"}
    meta = {k: torch.empty(v, device="meta") for k, v in t.items()}
    if case.op in ("mask", "masked_weight", "channel_gate"):
        return tuple(next(iter(t.values())))
    if case.op.endswith("conv_transpose2d"):
        return tuple(F.conv_transpose2d(meta["input"], meta["weight"], **case.geometry).shape)
    if case.op.endswith("conv2d"):
        return tuple(F.conv2d(meta["input"], meta["weight"], **case.geometry).shape)
    if case.op == "masked_linear":
        return tuple(F.linear(meta["input"], meta["weight"]).shape)
    if case.op == "sparsity_regularizer":
        return ()
    raise AssertionError(f"no expected shape for op {case.op}")


@pytest.mark.parametrize("case", shapes.CASES, ids=lambda c: c.key)
def test_case_geometry_gives_the_documented_output(case):
    assert case.op in shapes.OPS
    assert set(case.devices) <= set(shapes.DEVICES) and case.devices
    assert case.out_shape == _expected_out_shape(case)


def test_cases_cover_every_op_in_full_and_quick_runs_with_unique_keys():
    keys = [c.key for c in shapes.CASES]
    assert len(keys) == len(set(keys))
    for quick in (False, True):
        for device in shapes.DEVICES:
            assert {c.op for c in shapes.select(quick=quick, device=device)} == set(shapes.OPS), (quick, device)
    assert len(shapes.select(quick=True)) < len(shapes.select())


def test_dgm_generator_chains_are_consistent():
    # each layer's input is the previous layer's output: 1x1 -> 4x4 -> 8x8 -> 16x16 at batch 64
    for op, prefix in (("masked_conv_transpose2d", "dgmw-l"), ("masked_conv_transpose2d", "dgmw-grown-l"),
                       ("gated_conv_transpose2d", "dgma-l")):
        chain = [c for c in shapes.CASES if c.op == op and c.name.startswith(prefix)]
        assert [c.out_shape[-1] for c in chain] == [4, 8, 16]
        for prev, nxt in zip(chain, chain[1:]):
            assert nxt.tensors["input"] == prev.out_shape
    grown = [c for c in shapes.CASES if c.name.startswith("dgmw-grown-l") and c.op == "masked_conv_transpose2d"]
    assert [c.out_shape[1] for c in grown] == [125, 22, 36]


def test_select_and_parse_devices_reject_bad_values():
    with pytest.raises(ValueError, match="device must be one of"):
        shapes.select(device="tpu")
    with pytest.raises(ValueError, match="unknown conv3d"):
        shapes.select(ops=["conv3d"])
    assert shapes.parse_devices(None, False) == ["cpu"]
    assert shapes.parse_devices(None, True) == ["cpu", "cuda"]
    assert shapes.parse_devices("cuda, cpu,cuda", False) == ["cuda", "cpu"]
    with pytest.raises(ValueError, match="--dgm-devices must list"):
        shapes.parse_devices("gpu", True)


def test_every_workload_runs_forward_and_backward_with_the_reference():
    """What the suite times must run: one fwd+bwd of each op's workload, with and without frozen entries.

    The workload code depends on the op and on whether anything is frozen, not on the sizes: the smallest
    case of each such kind keeps this test fast.
    """
    from benchmarks import bench_ops as bench

    smallest = {}
    for case in shapes.select(device="cpu"):
        kind = (case.op, case.frozen is None and case.frozen_units is None)
        size = sum(math.prod(s) for s in _flat_shapes(case))
        if kind not in smallest or size < smallest[kind][0]:
            smallest[kind] = (size, case)
    assert {op for op, _ in smallest} == set(shapes.OPS)
    for _, case in smallest.values():
        args, diff, grad_out = bench.make_inputs(case, "cpu", torch.float32)
        out = bench.make_function(case, "reference", "cpu")(*args)
        assert tuple(out.shape) == case.out_shape, case.key
        grads = torch.autograd.grad(out, diff, grad_out)
        assert all(g is not None and torch.isfinite(g).all() for g in grads), case.key
        assert any(g.abs().sum() > 0 for g in grads), case.key


def _flat_shapes(case):
    for role, shape in case.tensors.items():
        yield from (shape if role == "masks" else (shape,))


# --- report -----------------------------------------------------------------------------------------


def _bench(op, case, backend, phase, median, device="cpu", dtype="float32"):
    return {
        "group": f"{op}/{case} {device}/{dtype} {phase}", "name": f"test_op[{op}-{case}-{backend}-{phase}]",
        "fullname": f"benchmarks/bench_ops.py::test_op[{op}-{case}-{backend}-{phase}]",
        "extra_info": {"op": op, "case": case, "shape": "w[4,4]", "device": device, "dtype": dtype,
                       "backend": backend, "phase": phase},
        "stats": {"median": median, "iqr": median / 10, "rounds": 7, "mean": median, "min": median},
    }


def _fake_results():
    return {
        "machine_info": {"node": "box", "dgm": {"cpu_model": "Test CPU 9000", "logical_cpus": 8, "usable_cpus": 8,
                                                "physical_cores": 4, "torch_threads": 4, "torch": "2.x",
                                                "triton": None, "gpus": [], "date": "2025-01-01T00:00:00"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "datetime": "2025-01-01T00:00:00",
        "benchmarks": [
            # masked_weight: cpu 4x reference, 2x compile
            _bench("masked_weight", "big", "reference", "fwd+bwd", 2.0e-3),
            _bench("masked_weight", "big", "cpu", "fwd+bwd", 0.5e-3),
            _bench("masked_weight", "big", "compile", "fwd+bwd", 1.0e-3),
            # mask: cpu only 1.5x reference (below the 2x goal); no compile baseline measured
            _bench("mask", "big", "reference", "fwd+bwd", 3.0e-3),
            _bench("mask", "big", "cpu", "fwd+bwd", 2.0e-3),
            # a conv case without its reference: no speedup can be computed
            _bench("masked_conv2d", "odd", "cpu", "fwd", 5.0e-3),
        ],
        "dgm": {"quick": True, "duration_s": 12.0,
                "skipped": [{"nodeid": "x", "reason": "the 'cuda' backend needs a GPU", "device": "cpu",
                             "dtype": "float32", "backend": "triton", "op": "mask", "case": "big",
                             "phase": "fwd"}],
                "compile": {"masked_weight/big/cpu/float32": {"compile_s": 3.5}}},
    }


def _row(rows, op, backend):
    (row,) = [r for r in rows if r["op"] == op and r["backend"] == backend]
    return row


def test_report_speedups_are_baseline_over_row():
    rows = report.build_rows(_fake_results())
    assert math.isclose(_row(rows, "masked_weight", "cpu")["vs_reference"], 4.0)
    assert math.isclose(_row(rows, "masked_weight", "cpu")["vs_compile"], 2.0)
    assert math.isclose(_row(rows, "masked_weight", "compile")["vs_reference"], 2.0)
    assert math.isclose(_row(rows, "masked_weight", "reference")["vs_compile"], 0.5)
    assert math.isclose(_row(rows, "masked_weight", "reference")["vs_reference"], 1.0)
    assert math.isclose(_row(rows, "mask", "cpu")["vs_reference"], 1.5)
    assert _row(rows, "mask", "cpu")["vs_compile"] is None
    assert _row(rows, "masked_conv2d", "cpu")["vs_reference"] is None
    # report order: ops in shapes.OPS order, reference before cpu before compile
    assert [(r["op"], r["backend"]) for r in rows][:3] == [("mask", "reference"), ("mask", "cpu"),
                                                          ("masked_weight", "reference")]


def test_report_summary_and_headline():
    rows = report.build_rows(_fake_results())
    (cpu_summary,) = [s for s in report.summarize(rows) if s["backend"] == "cpu" and s["phase"] == "fwd+bwd"]
    assert cpu_summary["cases"] == 2
    assert math.isclose(cpu_summary["vs_reference"], math.sqrt(4.0 * 1.5))
    assert math.isclose(cpu_summary["vs_compile"], 2.0)  # only masked_weight has a compile baseline
    assert (cpu_summary["min_vs_reference"], cpu_summary["max_vs_reference"]) == (1.5, 4.0)
    heads = {h["op"]: h["meets"] for h in report.headline(rows)}
    assert heads == {"mask": False, "masked_weight": True}


def test_report_markdown_table():
    text = report.render_markdown(_fake_results(), source="results/x.json")
    line = next(l for l in text.splitlines() if l.startswith("| masked_weight | big |") and "| cpu |" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    # op, case, shape, phase, backend, median, IQR, rounds, vs reference, vs compile
    assert cells == ["masked_weight", "big", "w[4,4]", "fwd+bwd", "cpu", "500.0 µs", "50.0 µs", "7", "4.00x", "2.00x"]
    assert "| masked_conv2d | odd | w[4,4] | fwd | cpu | 5 ms | 500.0 µs | 7 | — | — |" in text
    assert "1 of 2 headline cases meet the goal." in text
    assert "**below**" in text
    assert "Test CPU 9000" in text and "4 physical cores" in text
    assert "the 'cuda' backend needs a GPU" in text
    assert "torch.compile(reference)" in text


def test_report_flags_noisy_timings():
    data = _fake_results()
    assert "noisy" not in report.render_markdown(data)
    data["benchmarks"][-1]["stats"]["iqr"] = 0.5 * data["benchmarks"][-1]["stats"]["median"]
    text = report.render_markdown(data)
    assert "**1 of 6 timings are noisy**" in text
    assert "| masked_conv2d | odd | w[4,4] | fwd | cpu | ~5 ms |" in text


def test_report_cli_writes_markdown_from_json(tmp_path, capsys):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_fake_results()))
    out = tmp_path / "r.md"
    assert report.main([str(src), "-o", str(out)]) == 0
    assert "4.00x" in out.read_text()
    assert "4.00x" in capsys.readouterr().out


def test_report_rejects_results_of_another_suite():
    data = _fake_results()
    del data["benchmarks"][0]["extra_info"]["phase"]
    with pytest.raises(ValueError, match="lacks extra_info phase"):
        report.build_rows(data)


def test_format_time_units():
    assert report.format_time(12.34e-6) == "12.3 µs"
    assert report.format_time(1.5e-3) == "1.5 ms"
    assert report.format_time(2.5) == "2.5 s"
    assert report.format_speedup(None) == "—"
