"""Every Triton kernel of the triton backend compiles, ahead of time, for the GPUs CI does not have.

``scripts/triton_aot.py`` (run here as a subprocess: this process defined its kernels for the interpreter)
records the launches of the backend's ops (every specialisation their launchers produce over inputs that
reach each branch) and compiles each with Triton and ptxas for sm_80 and sm_90, plus a representative subset
for sm_100; see its docstring for how the specialisations are derived. Nothing is cached across runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "triton_aot.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"scripts/triton_aot.py wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(out.read_text())
    data["_output"] = proc.stdout + proc.stderr
    return data


def test_every_specialisation_compiles(report):
    by_error: dict[str, list] = {}
    for f in report["failures"]:
        by_error.setdefault(f["error"].strip().splitlines()[-1], []).append(f)
    lines = []
    for last, fs in by_error.items():
        lines.append(f"{len(fs)} x {last}\n  first: {fs[0]['error']}\n  specialisations:")
        for f in fs:
            spec = report["specialisations"][f["spec"]]
            names = list(spec["signature"])
            cx = {names[k[0]]: v for k, v in spec["constexprs"]}
            lines.append(f"  - {f['kernel']} sm_{f['target']} constexprs {cx} (case {spec['case']})")
    assert not lines, f"{len(report['failures'])} specialisations do not compile:\n" + "\n".join(lines)


def test_compiled_for_sm80_and_sm90_and_sm100_when_supported(report):
    assert {80, 90} <= set(report["targets"]), report["targets_skipped"]
    assert 100 in report["targets"] or "100" in report["targets_skipped"]
    compiled = {(r["kernel"], r["target"]) for r in report["results"] if r["ok"]}
    for target in report["targets"]:
        for kernel in report["kernels"]:
            assert (kernel, target) in compiled, f"{kernel} has no specialisation compiled for sm_{target}"
    for target in report["full_targets"]:  # sm_80 and sm_90: every specialisation
        full = [r for r in report["results"] if r["target"] == target]
        assert len(full) == len(report["specialisations"]), f"every specialisation is compiled for sm_{target}"


def test_every_jit_function_is_launched_or_called(report):
    """Kernels are covered by a recorded launch, device functions by a compiled kernel that inlines them."""
    assert not report["uncovered"], (
        f"@triton.jit functions covered by no compiled specialisation: {report['uncovered']} (a kernel no "
        "launcher reaches from the recorded cases, or a device function no compiled kernel calls)")
    for name in report["exempt"]:
        assert name in report["jit_functions"], f"exempt {name} no longer exists: drop it from EXEMPT"
        assert name not in report["device_functions"], f"exempt {name} is called by a kernel: cover it instead"
    assert len(report["kernels"]) >= 14 and len(report["device_functions"]) >= 6


def test_every_conv_tile_compiles_in_every_dtype(report):
    """Every (BM, BN, BK, num_warps) that conv._blocks returns on a GPU, gather and scatter kind, for float32
    (TF32 and IEEE), float16 and bfloat16 operands: the tensor-core lowering differs with each."""
    image = {tuple(t) for t in report["block_image"]}
    assert (128, 16, 32, 4) in image  # the 128-row tiles of large outputs
    seen: dict[tuple, set] = {}
    for spec in report["specialisations"]:
        if spec["kernel"] != "conv._conv_kernel":
            continue
        names = list(spec["signature"])
        cx = {names[k[0]]: v for k, v in spec["constexprs"]}
        seen.setdefault((cx["SCATTER"], spec["signature"]["x_ptr"], cx["INPUT_PRECISION"]), set()).add(
            (cx["BM"], cx["BN"], cx["BK"], spec["num_warps"]))
    for scatter in (False, True):  # a convolution / a transposed convolution (and the data gradients)
        for operands in [("*fp32", "tf32"), ("*fp32", "ieee"), ("*fp16", None), ("*bf16", None)]:
            missing = image - seen.get((scatter, *operands), set())
            assert not missing, f"SCATTER={scatter} {operands}: tiles of conv._blocks never launched: {sorted(missing)}"


def test_every_dtype_reaches_every_elementwise_kernel(report):
    """float32, float64, float16 and bfloat16 launches for every kernel that takes float tensors (the
    fused convolution has no float64 path: float64 runs unfused)."""
    dtypes: dict[str, set] = {}
    for spec in report["specialisations"]:
        dtypes.setdefault(spec["kernel"], set()).update(
            t for t in spec["signature"].values() if t in ("*fp32", "*fp64", "*fp16", "*bf16"))
    for kernel, got in dtypes.items():
        if kernel.startswith("bits.") or not got:
            continue
        want = {"*fp32", "*fp16", "*bf16"} | (set() if kernel == "conv._conv_kernel" else {"*fp64"})
        assert want <= got, f"{kernel}: no launch with {want - got}"


def test_gate_backward_every_slice_count(report):
    """The gate's reduction over more than one slice per channel: every BLOCK_S of the finish kernel (16 ... 1024
    partial sums per channel, up to 2M positions per channel) in float32 and float64 accumulation."""
    seen: dict[str, set] = {}
    for spec in report["specialisations"]:
        if spec["kernel"] == "gate._gate_finish_kernel":
            names = list(spec["signature"])
            cx = {names[k[0]]: v for k, v in spec["constexprs"]}
            seen.setdefault(cx["ACC"]["dtype"], set()).add(cx["BLOCK_S"])
    for acc in ("fp32", "fp64"):
        assert {16 << i for i in range(7)} <= seen.get(acc, set()), (acc, sorted(seen.get(acc, set())))
