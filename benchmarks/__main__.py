"""The whole benchmark suite in one command: microbenchmarks, roofline figures, end-to-end training iterations.

    python -m benchmarks                 # everything that applies to this machine (CPU; plus CUDA when visible)
    python -m benchmarks --quick         # smoke version: --quick microbenchmarks, short end-to-end timing
    python -m benchmarks --skip-ops      # end-to-end and roofline only
    python -m benchmarks --skip-scaling  # without the data-parallel scaling (torchrun jobs of 1 and 2 processes)

Writes ``benchmarks/results/<device>-<date>.json`` (everything: machine, per-op rows with speedups and roofline
fractions, end-to-end results, the goals and whether they are met), ``.md`` (the report) and ``.png`` (speedup over
``reference`` of each backend, per op and end to end), plus ``<device>-<date>-ops.json`` / ``-ops.md``: the
microbenchmarks' pytest-benchmark data (raw samples removed) and their detailed report.

On a CPU: ``reference``, ``cpu`` and ``torch.compile(reference)``; on a GPU additionally ``cuda`` and ``triton``, the
microbenchmarks in float32 and bfloat16 (the end-to-end iteration in float32, as the pipeline trains).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import breakdown, critic_convs, e2e, report, roofline, scaling, shapes

GOALS = {
    "cpu_e2e": "CPU: a training iteration with the auto backend (cpu) at least 1.3x faster than reference",
    "gpu_conv": "GPU: masked/gated conv fwd+bwd at least 1.3x faster than reference and not slower than "
                "torch.compile(reference), on the DGM layer shapes",
    "gpu_bandwidth": "GPU: elementwise and bookkeeping kernels at 80% or more of the measured copy bandwidth on "
                     "large tensors (fwd+bwd)",
    "gpu_e2e": "GPU: a training iteration at least 2x faster than reference",
}
AUTO = {"cpu": "cpu", "cuda": "cuda"}  # what --backend auto resolves to (dgm_kernels.backends.auto_backend_for)


def _strip_samples(data: dict) -> dict:
    for bench in data.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    return data


def goals(ops_rows, e2e_results, roof_rows) -> list[dict]:
    """Each goal of the performance issue that this run can judge: measured values and whether it is met."""
    out = []
    cpu = [r for r in e2e_results if r.get("device") == "cpu" and r.get("variant") == AUTO["cpu"] and "error" not in r]
    if cpu:
        vals = {f"{r['case']} task {r['task']}": r["speedup_vs_reference"] for r in cpu}
        out.append({"goal": GOALS["cpu_e2e"], "values": vals, "met": all(v >= 1.3 for v in vals.values())})
    gpu = [r for r in e2e_results if r.get("device") == "cuda" and r.get("variant") == AUTO["cuda"] and "error" not in r]
    if gpu:
        vals = {f"{r['case']} task {r['task']}": r["speedup_vs_reference"] for r in gpu}
        out.append({"goal": GOALS["gpu_e2e"], "values": vals, "met": all(v >= 2.0 for v in vals.values())})
    conv = [r for r in ops_rows if r["device"] == "cuda" and r["phase"] == "fwd+bwd" and r["backend"] in ("cuda", "triton")
            and r["op"] in ("masked_conv2d", "masked_conv_transpose2d", "gated_conv2d", "gated_conv_transpose2d")
            and not r["case"].startswith("large")]
    if conv:
        for backend in sorted({r["backend"] for r in conv}):
            rs = [r for r in conv if r["backend"] == backend]
            vals = {f"{r['op']}/{r['case']} {r['dtype']}": [r["vs_reference"], r["vs_compile"]] for r in rs}
            met = all(a is not None and a >= 1.3 and (b is None or b >= 1.0) for a, b in vals.values())
            out.append({"goal": GOALS["gpu_conv"] + f" [{backend}]", "values": vals, "met": met})
    bw = [r for r in roof_rows if r["device"] == "cuda" and r["kind"] == "bandwidth" and r["phase"] == "fwd+bwd"
          and r["backend"] in ("cuda", "triton") and r["case"].startswith("large")]
    if bw:
        for backend in sorted({r["backend"] for r in bw}):
            vals = {f"{r['op']}/{r['case']} {r['dtype']}": r["fraction"] for r in bw if r["backend"] == backend}
            out.append({"goal": GOALS["gpu_bandwidth"] + f" [{backend}]", "values": vals,
                        "met": all(v >= 0.8 for v in vals.values())})
    return out


def plot(ops_rows, e2e_results, path: Path) -> bool:
    """Two panels: geometric-mean speedup over reference per op and backend (fwd+bwd), and end to end."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    per_op = defaultdict(list)
    for r in ops_rows:
        if r["phase"] == "fwd+bwd" and r["backend"] != "reference" and r["vs_reference"]:
            per_op[(r["device"], r["dtype"], r["op"], r["backend"])].append(r["vs_reference"])
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    groups = sorted({k[:3] for k in per_op})
    backends = [b for b in report.BACKEND_ORDER if any(k[3] == b for k in per_op)]
    _grouped_bars(axes[0], groups, backends, lambda g, b: report.geomean(per_op[g + (b,)]) if g + (b,) in per_op else None,
                  [f"{op}\n{dev}/{dt}" for dev, dt, op in groups], "speedup over reference (geomean over shapes)",
                  "microbenchmarks, forward + backward", log=True)
    ok = [r for r in e2e_results if "error" not in r and r["variant"] != "reference"]
    labels = sorted({(r["device"], r["case"], r["task"]) for r in ok})
    speedup = {((r["device"], r["case"], r["task"]), r["variant"]): r["speedup_vs_reference"] for r in ok}
    _grouped_bars(axes[1], labels, list(dict.fromkeys(r["variant"] for r in ok)), lambda g, v: speedup.get((g, v)),
                  [f"{c}\ntask {t} ({d})" for d, c, t in labels], "speedup over reference",
                  "one DGM training iteration", log=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _grouped_bars(ax, groups, series, value, tick_labels, ylabel, title, *, log: bool) -> None:
    """One bar per (group, series) where ``value(group, series)`` is not None; a line at 1 (no speedup)."""
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs, ys = [], []
        for i, g in enumerate(groups):
            v = value(g, name)
            if v is not None:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=report.backend_label(name))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(tick_labels, rotation=60, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def render(result: dict, name: str) -> str:
    m = result["machine"]
    lines = [f"# Benchmark suite: {name}", "",
             f"- date: {result['date']}, duration {result['duration_s'] / 60:.1f} min, command `{result['command']}`",
             f"- CPU: {m.get('cpu_model')} ({m.get('physical_cores')} physical cores, {m.get('usable_cpus')} usable), "
             f"torch threads {m.get('torch_threads')}",
             f"- GPU: {', '.join(m.get('gpus') or []) or 'none'}",
             f"- torch {m.get('torch')}, triton {m.get('triton')}, CUDA runtime {m.get('cuda_runtime')}, commit {result.get('commit')}",
             f"- 1-minute load average at start / end: {result['load'][0]} / {result['load'][1]}", ""]
    lines += ["## Goals", ""]
    if result["goals"]:
        for g in result["goals"]:
            vals = ", ".join(f"{k}: " + (f"{v:.2f}" if isinstance(v, float) else
                                          "/".join("—" if x is None else f"{x:.2f}" for x in v))
                             for k, v in g["values"].items())
            lines.append(f"- **{'met' if g['met'] else 'NOT met'}**: {g['goal']} ({vals})")
    else:
        lines.append("- nothing measured that a goal applies to")
    lines.append("")
    if result.get("e2e"):
        lines += ["## One DGM training iteration", "",
                  "Iteration: t + 1 classifier steps, a WGAN-GP critic step, a generator step with the regulariser and "
                  "the masked Adam (`benchmarks/e2e.py`). Memory: CPU rows give the process's peak RSS (the increase "
                  "over its size after import in brackets); CUDA rows `max_memory_allocated`.", ""]
        lines += e2e.format_table(result["e2e"]) + [""]
        for k, v in result["e2e"].get("not_measured", {}).items():
            lines.append(f"- `{k}` not measured: {v}")
        lines.append("")
    for b in result.get("breakdown", []):
        lines += breakdown.format_tables(b)
    for data in result.get("scaling", []):
        lines += ["## Data-parallel scaling (`benchmarks/scaling.py`, docs/distributed.md)", ""]
        lines += scaling.format_table(data) + [""]
    if result.get("critic_convs"):
        lines += ["## The convolutions on the `cpu` backend's own kernels (`benchmarks/critic_convs.py`)", "",
                  "Goal: at least 1.3x faster than PyTorch's layers on their shapes, forward + backward + double "
                  "backward.", ""] + critic_convs.format_table(result["critic_convs"]) + [""]
    if result.get("ops_summary"):
        lines += ["## Microbenchmarks: geometric-mean speedups", "",
                  f"Details per shape: `{result['ops_report']}`.", "",
                  "| device | dtype | backend | phase | cases | vs reference | vs torch.compile(reference) | min | max |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in result["ops_summary"]:
            f = report.format_speedup
            lines.append(f"| {s['device']} | {s['dtype']} | {report.backend_label(s['backend'])} | {s['phase']} | "
                         f"{s['cases']} | "
                         f"{f(s['vs_reference'])} | {f(s['vs_compile'])} | {f(s['min_vs_reference'])} | "
                         f"{f(s['max_vs_reference'])} |")
        lines.append("")
    if result.get("roofline"):
        peaks = result["peaks"]
        lines += ["## Roofline", "", "Measured peaks (see `benchmarks/roofline.py`):", ""]
        for dev, p in peaks.items():
            for dt, v in p["copy_bytes_per_s"].items():
                lines.append(f"- {dev} {dt}: copy {v / 1e9:.1f} GB/s, matmul {p['matmul_flops'][dt] / 1e9:.1f} GFLOP/s "
                             f"(n = {p['settings']['matmul_size']})")
        lines.append("")
        lines += roofline.format_rows(result["roofline"])
    if result.get("plot"):
        lines += [f"![speedups]({Path(result['plot']).name})", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version (a few minutes)")
    p.add_argument("--devices", default=None, help="cpu and/or cuda, comma-separated (default: cpu, plus cuda if visible)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per microbenchmark (default 1; 0.15 quick)")
    p.add_argument("--e2e-budget", type=float, default=None, help="seconds of timing per end-to-end run (default 8; 2 quick)")
    p.add_argument("--skip-ops", action="store_true", help="no microbenchmarks (and so no roofline rows)")
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end benchmarks")
    p.add_argument("--skip-scaling", action="store_true", help="no data-parallel scaling (torchrun, 1 and 2 processes)")
    p.add_argument("--cases", default=",".join(e2e.CASES), help="end-to-end cases (comma-separated)")
    p.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    args, pytest_args = p.parse_known_args(argv)
    import torch

    try:
        devices = shapes.parse_devices(args.devices, torch.cuda.is_available(), option="--devices")
    except ValueError as exc:
        p.error(str(exc))
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices asks for cuda but no CUDA GPU is visible")
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in e2e.CASES for c in cases):
        p.error(f"--cases must be among {', '.join(e2e.CASES)}, got {args.cases!r}")

    t_start = time.perf_counter()
    load0 = report_load()
    info = report.machine_info()
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    name = f"{report.device_slug(info, devices)}-{stamp}{'-quick' if args.quick else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"format": "dgm-benchmark-suite/1", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": info, "devices": devices, "commit": _commit()}

    ops_rows = []
    if not args.skip_ops:
        extra = list(pytest_args)
        if args.budget is not None:
            extra = [f"--dgm-budget={args.budget}"] + extra
        code, raw = report.run_suite(quick=args.quick, devices=",".join(devices), out_dir=args.out_dir,
                                     pytest_args=extra)
        if raw.exists():
            ops_path = args.out_dir / f"{name}-ops.json"
            data = _strip_samples(json.loads(raw.read_text()))
            ops_path.write_text(json.dumps(data, indent=1) + "\n")
            if raw != ops_path:
                raw.unlink()
            _, md = report.write_report(ops_path)
            ops_rows = report.build_rows(data)
            result.update(ops_report=str(md.relative_to(report.ROOT)) if md.is_relative_to(report.ROOT) else str(md),
                          ops_rows=ops_rows, ops_summary=report.summarize(ops_rows), ops_exit_code=code)
        else:
            result["ops_error"] = f"pytest exited with {code} and wrote no results"
        dtypes = {d: [t for t in ("float32", "bfloat16") if any(r["dtype"] == t and r["device"] == d for r in ops_rows)]
                  for d in devices}
        print("measuring copy bandwidth and matmul rate ...", flush=True)
        result["peaks"] = {d: roofline.measure_peaks(d, dtypes[d] or ["float32"]) for d in devices}
        result["roofline"] = roofline.roofline_rows(ops_rows, result["peaks"])

    e2e_results = []
    if not args.skip_e2e:
        budget = args.e2e_budget if args.e2e_budget is not None else (2.0 if args.quick else 8.0)
        iters = 5 if args.quick else 20
        runs = []
        for d in devices:
            data = e2e.run_all(device=d, cases=cases, iters=iters, warmup=2 if args.quick else 3, budget=budget,
                               per_class=256, reserve=0.25)
            runs.append(data)
            e2e_results += data["results"]
        result["e2e"] = {"results": e2e_results, "not_measured": {f"{d}: {k}": v for run, d in zip(runs, devices)
                                                                   for k, v in run["not_measured"].items()},
                         "settings": runs[0]["settings"] if runs else {}}

    if not args.skip_e2e:
        print("breaking one iteration down into its parts ...", flush=True)
        result["breakdown"] = []
        for d in devices:
            backends = [v for v in e2e.variants_for(d) if not e2e.is_compiled(v)]
            for case in [c for c in ("mnist-dgmw", "mnist-dgmw-quick") if c in cases]:
                task = max(e2e.CASES[case].tasks)
                result["breakdown"].append(breakdown.measure(case, task, d, backends, repeats=3 if args.quick else 10))
        if "cpu" in devices and "cpu" in e2e.variants_for("cpu"):
            print("timing the critic convolutions ...", flush=True)
            result["critic_convs"] = critic_convs.measure(repeats=10 if args.quick else 30)
    if not args.skip_scaling:
        result["scaling"] = []
        for d in devices:
            n = 2 if d == "cpu" else torch.cuda.device_count()
            if n >= 2:
                result["scaling"].append(scaling.run_all(nprocs=scaling.process_counts(n), device=d,
                                                         iters=5 if args.quick else 20, warmup=2 if args.quick else 3))
    result["goals"] = goals(ops_rows, e2e_results, result.get("roofline", []))
    png = args.out_dir / f"{name}.png"
    if plot(ops_rows, e2e_results, png):
        result["plot"] = str(png)
    result["duration_s"] = time.perf_counter() - t_start
    result["load"] = [load0, report_load()]
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = render(result, name)
    (args.out_dir / f"{name}.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out_dir / name}.json, .md" + (", .png" if "plot" in result else ""), file=sys.stderr)
    failed = [r for r in e2e_results if "error" in r]
    return 1 if failed or result.get("ops_error") else 0


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=report.ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=report.ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def report_load() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
