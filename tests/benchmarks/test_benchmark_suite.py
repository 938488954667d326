"""The suite's end-to-end benchmark, roofline arithmetic and goal checks (``python -m benchmarks``).

Timings are never asserted: these tests check what the numbers are computed from (the iteration, the byte and
FLOP counts, the peaks, the goal logic), so that a report cannot be wrong while looking right.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import __main__ as suite  # noqa: E402
from benchmarks import e2e, roofline, shapes  # noqa: E402

import dgm_kernels as dk  # noqa: E402


def _small(case_name: str, task: int, variant: str):
    return e2e.measure(e2e.CASES[case_name], task, variant, "cpu", iters=2, warmup=1, budget=0.0, per_class=8,
                       reserve=0.3)


# --- end to end ---------------------------------------------------------------------------------------


def test_simulated_tasks_grow_the_generator_and_reserve_the_asked_share():
    from dgm.checkpoint import new_generator

    cfg = e2e.CASES["mnist-dgmw"].config("reference", "cpu")
    G = new_generator(cfg, 10, torch.device("cpu"))
    widths0 = G.widths()
    sizes0 = {name: layer.scores.numel() for name, layer in G.masked_layers()}
    e2e.simulate_finished_tasks(G, 1, 0.25, torch.device("cpu"), seed=1)
    for name, n in sizes0.items():  # the first task reserves about a quarter of the entries it had
        assert abs(int(G.ledger.reserved_mask(name).sum()) / n - 0.25) < 0.05, name
    e2e.simulate_finished_tasks(G, 2, 0.25, torch.device("cpu"), seed=2)
    assert G.ledger.num_tasks == 3
    assert all(a >= b for a, b in zip(G.widths(), widths0)) and sum(G.widths()) > sum(widths0), G.widths()


@pytest.mark.parametrize("case", ["mnist-dgmw", "mnist-dgma", "mnist-dgmw-quick"])
def test_e2e_iteration_runs_and_reports(case):
    r = _small(case, 1, "reference")
    assert r["iterations"] >= 2 and r["median_s"] > 0 and math.isclose(r["it_per_s"], 1 / r["median_s"])
    assert r["peak_memory_bytes"] > 0 and r["memory_kind"].startswith("peak RSS")
    assert len(r["losses"]) == min(e2e.CHECKED_ITERS, r["iterations"] + r["warmup"])
    assert all(math.isfinite(v) for its in r["losses"] for v in its.values())
    cfg = e2e.CASES[case].config("reference", "cpu")
    assert r["classifier_steps"] == (2 if cfg.classifier_schedule == "interleaved" else 0)
    assert r["replayed_images"] == 8  # one past class, per_class images
    if cfg.classifier_schedule == "interleaved":
        assert r["losses"][0]["c"] > 0  # the classifier steps ran
    else:
        assert r["losses"][0]["c"] == 0


@pytest.mark.skipif(dk.backends.unavailable_reason("cpu", "cpu") is not None, reason="the cpu backend is not built")
def test_e2e_backends_give_the_reference_losses_on_the_first_iteration():
    results = [_small("mnist-dgmw", 1, v) for v in ("reference", "cpu")]
    e2e.compare_losses(results)
    cpu = results[1]
    assert cpu["loss_first_rel_diff"] < 1e-3, cpu["losses"][0]
    assert results[0]["loss_max_rel_diff"] == 0.0
    assert cpu["speedup_vs_reference"] == pytest.approx(results[0]["median_s"] / cpu["median_s"])


def test_compare_losses_flags_a_different_iteration():
    base = dict(case="c", task=0, device="cpu", median_s=1.0, cpu_median_s=1.0, it_per_s=1.0, iqr_s=0.0,
                peak_memory_bytes=2**30)
    ref = dict(base, variant="reference", losses=[{k: 1.0 for k in e2e.LOSS_KEYS}])
    other = dict(base, variant="cpu", median_s=0.5, cpu_median_s=0.8, it_per_s=2.0,
                 losses=[{**{k: 1.0 for k in e2e.LOSS_KEYS}, "g": 1.5}])
    peer = dict(base, variant="compile", median_s=2.0, losses=ref["losses"])
    e2e.compare_losses([ref, other, peer])
    assert other["loss_first_rel_diff"] == pytest.approx(0.5)
    assert other["speedup_vs_reference"] == 2.0 and other["cpu_time_speedup_vs_reference"] == pytest.approx(1.25)
    assert other["speedup_vs_compile"] == 4.0
    assert any("| c | 0 | cpu | 2.00 |" in line for line in e2e.format_table({"results": [ref, other, peer]}))


def test_e2e_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        e2e.main(["--cases", "mnist-dgmw,nope"])
    assert "unknown case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        e2e.main(["--reserve", "1.5"])
    assert "--reserve must lie in (0, 1)" in capsys.readouterr().err


def test_variants_on_cpu_name_why_the_others_are_missing():
    names = e2e.variants_for("cpu")
    assert names[0] == "reference" and names[-2:] == [e2e.COMPILE, "compile-cpu"] and "triton" not in names
    assert [e2e.variant_backend(v) for v in names[-2:]] == ["reference", "cpu"]
    assert e2e.variant_label("compile-cpu") == "cpu + dgm train --compile"
    missing = e2e.unavailable("cpu")
    assert "triton" in missing and "cuda" in missing and all(missing.values())


# --- roofline ---------------------------------------------------------------------------------------


def _case(op, name):
    return next(c for c in shapes.CASES if c.op == op and c.name == name)


def test_minimal_bytes_of_the_elementwise_ops():
    n = 512 * 512 * 16
    mask = _case("mask", "large-4M")
    assert roofline.op_bytes(mask, "fwd", "float32") == 2 * n * 4
    assert roofline.op_bytes(mask, "fwd+bwd", "float32") == 5 * n * 4
    mw = _case("masked_weight", "large-4M")  # frozen bits: n / 8 bytes
    assert roofline.op_bytes(mw, "fwd", "bfloat16") == 3 * n * 2 + n // 8
    gate = _case("channel_gate", "large")
    y = 64 * 128 * 32 * 32
    assert roofline.op_bytes(gate, "fwd", "float32") == 2 * y * 4 + 128 * 4
    assert roofline.op_bytes(_case("masked_conv2d", "disc-l2"), "fwd", "float32") is None


def test_flops_of_the_convolutions_match_a_direct_count():
    conv = _case("masked_conv2d", "disc-l2")  # 32 -> 64, 5x5, out 8x8, batch 64
    macs = 64 * 64 * 8 * 8 * 32 * 25
    assert roofline.op_flops(conv, "fwd") == 2 * macs
    assert roofline.op_flops(conv, "fwd+bwd") == 6 * macs  # input needs a gradient
    first = _case("masked_conv_transpose2d", "dgmw-l1")  # 128 -> 24 on a 1x1 noise input, 4x4 kernel
    macs = 64 * 128 * 24 * 16
    assert roofline.op_flops(first, "fwd") == 2 * macs
    assert roofline.op_flops(first, "fwd+bwd") == 4 * macs  # the noise needs no gradient
    lin = _case("masked_linear", "imagenet-fc")
    assert roofline.op_flops(lin, "fwd") == 2 * 64 * 1024 * 128
    assert roofline.op_flops(_case("mask", "large-4M"), "fwd") is None


def test_measured_peaks_are_plausible_and_rows_use_them():
    peaks = roofline.measure_peaks("cpu")
    bw, mm = peaks["copy_bytes_per_s"]["float32"], peaks["matmul_flops"]["float32"]
    assert 1e8 < bw < 1e13 and 1e8 < mm < 1e14
    rows = [dict(op="mask", case="large-4M", shape="", device="cpu", dtype="float32", phase="fwd",
                 backend="cpu", median=0.01),
            dict(op="masked_conv2d", case="disc-l2", shape="", device="cpu", dtype="float32", phase="fwd",
                 backend="cpu", median=0.01),
            dict(op="mask", case="large-4M", shape="", device="cuda", dtype="float32", phase="fwd",
                 backend="cuda", median=0.01)]  # no cuda peaks: left out
    out = roofline.roofline_rows(rows, {"cpu": peaks})
    assert [r["kind"] for r in out] == ["bandwidth", "compute"]
    assert out[0]["fraction"] == pytest.approx(2 * 512 * 512 * 16 * 4 / 0.01 / bw)
    assert out[1]["rate"] == pytest.approx(2 * 64 * 64 * 64 * 32 * 25 / 0.01)
    text = "\n".join(roofline.format_rows(out, phase="fwd"))
    assert "| cpu | float32 | mask | large-4M | cpu |" in text


# --- the suite: goals and plot ---------------------------------------------------------------------


def test_goals_judge_the_measured_values():
    e2e_rows = [dict(case="mnist-dgmw", task=5, device="cpu", variant="cpu", speedup_vs_reference=1.4),
                dict(case="mnist-dgma", task=5, device="cpu", variant="cpu", speedup_vs_reference=1.1),
                dict(case="mnist-dgmw", task=5, device="cuda", variant="cuda", speedup_vs_reference=2.5)]
    ops = [dict(op="masked_conv2d", case="imagenet-8", device="cuda", dtype="float32", phase="fwd+bwd",
                backend="triton", vs_reference=1.5, vs_compile=0.9)]
    roof = [dict(op="mask", case="large-4M", device="cuda", dtype="float32", phase="fwd+bwd", backend="cuda",
                 kind="bandwidth", fraction=0.85)]
    goals = {g["goal"].split(":")[0] + g["goal"][-8:]: g for g in suite.goals(ops, e2e_rows, roof)}
    by_text = {g["goal"]: g["met"] for g in suite.goals(ops, e2e_rows, roof)}
    assert by_text[suite.GOALS["cpu_e2e"]] is False  # DGMa misses 1.3x
    assert by_text[suite.GOALS["gpu_e2e"]] is True
    assert by_text[suite.GOALS["gpu_conv"] + " [triton]"] is False  # slower than torch.compile
    assert by_text[suite.GOALS["gpu_bandwidth"] + " [cuda]"] is True
    assert goals  # every goal was judged
    assert suite.goals([], [], []) == []


def test_plot_writes_a_png(tmp_path):
    ops = [dict(op="mask", case="large-4M", device="cpu", dtype="float32", phase="fwd+bwd", backend=b,
                vs_reference=v) for b, v in (("reference", 1.0), ("cpu", 5.0), ("compile", 2.0))]
    e2e_rows = [dict(case="mnist-dgmw", task=0, device="cpu", variant=v, speedup_vs_reference=x)
                for v, x in (("reference", 1.0), ("cpu", 1.2), ("compile", 0.9))]
    path = tmp_path / "plot.png"
    pytest.importorskip("matplotlib")
    assert suite.plot(ops, e2e_rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_breakdown_times_every_part_of_the_iteration():
    from benchmarks import breakdown

    parts = breakdown.breakdown("mnist-dgmw", 1, "reference", repeats=1, per_class=8)
    assert "one classifier step (x t+1 per iteration)" in parts and "whole iteration" in parts
    assert len(parts) == 8 and all(v["wall_s"] > 0 and v["cpu_s"] >= 0 for v in parts.values())


def test_missing_benchmark_extra_names_the_install_command(monkeypatch, tmp_path):
    # after the README's core install (no test extra), the suite must say what to install, not just fail on import
    import importlib.util

    from benchmarks import report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark" else real(name, *a))
    with pytest.raises(SystemExit, match=r"need pytest_benchmark, which the 'test' extra installs: .*\.\[test\]"):
        report.run_suite(quick=True, devices="cpu", out_dir=tmp_path, pytest_args=[])


def test_breakdown_roofline_counts_every_part_and_formats_its_share():
    from benchmarks import breakdown

    flops = breakdown.part_flops("mnist-dgmw-quick", 1, per_class=8)
    assert flops["masked Adam step (generator)"] == 0 and flops["sparsity regulariser forward + backward"] == 0
    # the critic step holds three critic forwards, their backward and the penalty's double backward
    assert flops["critic step with gradient penalty"] > 3 * flops["critic forward + backward to its input"] / 2
    parts = {p: {"wall_s": 0.01, "cpu_s": 0.02} for p in flops}
    text = "\n".join(breakdown.format_tables({"device": "cpu", "case": "mnist-dgmw-quick", "task": 1,
                                              "parts": {"reference": parts}, "flops": flops,
                                              "matmul_flops_per_s": 1e12}))
    whole = flops["whole iteration"]
    assert f"| whole iteration | {whole / 1e9:.3f} | {whole / 1e7:.1f} ({whole / 1e8:.0f} %) |" in text
    assert "| masked Adam step (generator) | 0 | — |" in text and "| whole iteration | 20.00 |" in text


def test_critic_convs_times_both_backends_on_every_shape():
    pytest.importorskip("dgm_kernels._C", reason="the cpu backend needs the built extension")
    from benchmarks import critic_convs

    rows = critic_convs.measure(repeats=1)
    assert len(rows) == len(critic_convs.SHAPES) * len(critic_convs.PHASES)
    assert all(r["reference"] > 0 and r["cpu"] > 0 for r in rows)
    table = critic_convs.format_table(rows)
    assert len(table) == 2 + len(rows) and table[2].startswith("| critic conv1, MNIST quick (1->16) | fwd+bwd |")
