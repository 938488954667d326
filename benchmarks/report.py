"""Run the microbenchmarks and turn pytest-benchmark's JSON into a Markdown report.

    python -m benchmarks.report --run [--quick] [--devices cpu,cuda] [-- PYTEST ARGS...]
        runs benchmarks/bench_ops.py, writes benchmarks/results/<device>-<date>.json and .md, prints the table
    python -m benchmarks.report RESULTS.json [-o OUT.md]
        rebuilds the Markdown of an earlier run (printed, and written to OUT.md or beside the JSON)

The report holds the machine (CPU model, cores, torch/triton versions, GPU), the date, one table per
device and dtype (op, shape, phase, backend, median time, speedup over ``reference`` and over
``torch.compile(reference)``), geometric-mean speedups per backend and phase, the headline check (the
``cpu`` backend at least 2x faster than ``reference`` on the fused mask / masked-weight / gate ops,
forward+backward), and every backend or baseline that was not measured, with the reason.

Speedup of a row over a baseline = baseline's median / the row's median (> 1: the row is faster), between
rows of the same op, case, device, dtype and phase.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import shapes

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCH_FILE = "benchmarks/bench_ops.py"

REFERENCE = "reference"
COMPILE = "compile"
PHASES = ("fwd", "bwd", "fwd+bwd")
BACKEND_ORDER = ("reference", "cpu", "cuda", "triton", "compile")
BACKEND_LABELS = {COMPILE: "torch.compile(reference)"}


# --- machine ----------------------------------------------------------------------------------------


def _cpuinfo() -> tuple[str, int | None]:
    """(CPU model, physical cores) from /proc/cpuinfo; the platform's answer where that file is absent."""
    model, cores = None, set()
    physical = None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for block in text.split("\n\n"):
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()) if k.strip()
        )
        model = model or fields.get("model name") or fields.get("Model") or fields.get("cpu model")
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    if cores:
        physical = len(cores)
    return model or platform.processor() or platform.machine() or "unknown", physical


def machine_info() -> dict:
    """What the timings depend on: CPU, cores, threads, library versions, GPUs, backends, date."""
    from importlib import metadata

    import torch

    import dgm_kernels

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    model, physical = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "pytest_benchmark": version("pytest-benchmark"),
        "cuda_runtime": torch.version.cuda,
        "gpus": gpus,
        "dgm_kernels": dgm_kernels.__version__,
        "backend_status": dgm_kernels.backend_status(),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(info: dict, devices) -> str:
    """The results' file-name prefix: the GPU's name when CUDA is benchmarked, else ``cpu-<model>``."""
    if "cuda" in devices and info.get("gpus"):
        return _slug(info["gpus"][0].split(" (")[0])[:48]
    words = _slug(re.sub(r"\(.*?\)|processor|cpu|@.*", "", info.get("cpu_model") or "", flags=re.I))
    return ("cpu-" + "-".join(words.split("-")[:4])).strip("-")


# --- rows and speedups ------------------------------------------------------------------------------


def _case_order():
    return {(c.op, c.name): i for i, c in enumerate(shapes.CASES)}


def build_rows(data: dict) -> list[dict]:
    """One row per benchmark, with its speedups over the reference and the compile baseline.

    A row is a dict: op, case, shape, device, dtype, phase, backend, median (s), rounds, iqr (s),
    vs_reference and vs_compile (float, or None where the baseline was not measured).
    """
    rows = []
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench["stats"]
        missing = [k for k in ("op", "case", "device", "dtype", "backend", "phase") if k not in info]
        if missing:
            raise ValueError(
                f"benchmark {bench.get('fullname', bench.get('name'))!r} lacks extra_info {', '.join(missing)}: "
                "not a result of benchmarks/bench_ops.py"
            )
        rows.append({
            "op": info["op"], "case": info["case"], "shape": info.get("shape", ""), "device": info["device"],
            "dtype": info["dtype"], "phase": info["phase"], "backend": info["backend"],
            "median": float(stats["median"]), "iqr": float(stats.get("iqr", 0.0)), "rounds": int(stats["rounds"]),
        })
    medians = {(r["op"], r["case"], r["device"], r["dtype"], r["phase"], r["backend"]): r["median"] for r in rows}
    for r in rows:
        key = (r["op"], r["case"], r["device"], r["dtype"], r["phase"])
        for column, baseline in (("vs_reference", REFERENCE), ("vs_compile", COMPILE)):
            base = medians.get(key + (baseline,))
            r[column] = base / r["median"] if base is not None and r["median"] > 0 else None
    order, ops = _case_order(), {op: i for i, op in enumerate(shapes.OPS)}

    def sort_key(r):
        return (
            r["device"], r["dtype"], ops.get(r["op"], len(ops)), order.get((r["op"], r["case"]), len(order)),
            r["case"], PHASES.index(r["phase"]) if r["phase"] in PHASES else len(PHASES),
            BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else len(BACKEND_ORDER), r["backend"],
        )

    return sorted(rows, key=sort_key)


#: a timing whose interquartile range exceeds this fraction of its median is flagged as noisy
NOISY_IQR = 0.25


def is_noisy(row: dict) -> bool:
    return row["iqr"] > NOISY_IQR * row["median"]


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(rows: list[dict]) -> list[dict]:
    """Geometric-mean speedups per (device, dtype, backend, phase) over the cases measured."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["dtype"], r["backend"], r["phase"])].append(r)
    out = []
    for (device, dtype, backend, phase), rs in groups.items():
        vs_ref = [r["vs_reference"] for r in rs if r["vs_reference"] is not None]
        out.append({
            "device": device, "dtype": dtype, "backend": backend, "phase": phase, "cases": len(rs),
            "vs_reference": geomean(vs_ref), "vs_compile": geomean(r["vs_compile"] for r in rs),
            "min_vs_reference": min(vs_ref) if vs_ref else None, "max_vs_reference": max(vs_ref) if vs_ref else None,
        })
    return sorted(out, key=lambda s: (
        s["device"], s["dtype"], BACKEND_ORDER.index(s["backend"]) if s["backend"] in BACKEND_ORDER else 99,
        PHASES.index(s["phase"]) if s["phase"] in PHASES else 99,
    ))


def headline(rows: list[dict]) -> list[dict]:
    """The issue's goal: ``cpu`` >= 2x ``reference`` on the fused elementwise ops, forward+backward, CPU."""
    return [
        {**r, "meets": r["vs_reference"] is not None and r["vs_reference"] >= shapes.HEADLINE_SPEEDUP}
        for r in rows
        if r["device"] == "cpu" and r["backend"] == "cpu" and r["phase"] == "fwd+bwd" and r["op"] in shapes.HEADLINE_OPS
    ]


# --- Markdown ---------------------------------------------------------------------------------------


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_speedup(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def backend_label(backend: str) -> str:
    """The name a table or plot shows for ``backend`` (its own name where it has no label)."""
    return BACKEND_LABELS.get(backend, backend)


def render_markdown(data: dict, *, source: str | None = None) -> str:
    rows = build_rows(data)
    dgm = data.get("dgm", {})
    info = data.get("machine_info", {}).get("dgm", {})
    out = ["# dgm_kernels microbenchmarks", ""]
    run = "quick (smoke subset of shapes)" if dgm.get("quick") else "full (every shape)"
    if dgm.get("timing"):
        t = dgm["timing"]
        run += f", {t['budget_s']:g} s of timed calls per benchmark ({t['min_rounds']}..{t['max_rounds']} rounds)"
    meta = [
        ("date (end of run)", info.get("date") or data.get("datetime", "?")),
        ("run", f"{run}; {len(rows)} benchmarks" + (f" in {dgm['duration_s']:.0f} s" if "duration_s" in dgm else "")),
        ("CPU", f"{info.get('cpu_model', '?')}; {info.get('physical_cores') or '?'} physical cores, "
                f"{info.get('logical_cpus', '?')} logical, {info.get('usable_cpus', '?')} usable; "
                f"torch threads {info.get('torch_threads', '?')}"),
        ("GPU", ", ".join(info.get("gpus") or []) or "none"),
        ("versions", f"torch {info.get('torch', '?')}, triton {info.get('triton') or 'not installed'}, "
                     f"CUDA runtime {info.get('cuda_runtime') or 'none'}, dgm_kernels {info.get('dgm_kernels', '?')}, "
                     f"pytest-benchmark {info.get('pytest_benchmark', '?')}, Python {info.get('python', '?')}"),
        ("platform", info.get("platform", "?")),
    ]
    if dgm.get("loadavg_start") is not None:
        meta.insert(3, ("load average (1 min)", f"{dgm['loadavg_start']} at start, {dgm.get('loadavg_end')} at end "
                                                f"(on {info.get('usable_cpus', '?')} usable CPUs)"))
    commit = data.get("commit_info") or {}
    if commit.get("id"):
        meta.append(("commit", f"{commit['id'][:12]}{' (dirty tree)' if commit.get('dirty') else ''}"))
    if source:
        meta.append(("raw data", source))
    out += [f"- **{k}**: {v}" for k, v in meta]
    noisy = sum(is_noisy(r) for r in rows)
    if noisy:
        out += ["", f"**{noisy} of {len(rows)} timings are noisy** (marked ~: IQR above "
                    f"{NOISY_IQR:.0%} of the median): was the machine busy? Rerun on a quiet machine before "
                    "drawing conclusions from them."]
    out += ["", "Median of the timed rounds; speedup = baseline median / row median (> 1: faster than the "
                "baseline). `fwd` is the training forward (graph for backward built), `bwd` the backward alone "
                "(forward run untimed before each round), `fwd+bwd` both. Shapes: benchmarks/shapes.py.", ""]

    heads = headline(rows)
    out += [f"## Headline: `cpu` backend vs `reference`, fused elementwise ops, fwd+bwd (goal >= "
            f"{shapes.HEADLINE_SPEEDUP:g}x)", ""]
    if heads:
        out += _table(
            ["op", "case", "shape", "reference", "cpu", "speedup", "goal"],
            [[h["op"], h["case"], h["shape"],
              format_time(h["median"] * h["vs_reference"]) if h["vs_reference"] else "—",
              format_time(h["median"]), format_speedup(h["vs_reference"]), "meets" if h["meets"] else "**below**"]
             for h in heads],
        )
        met = sum(h["meets"] for h in heads)
        out += ["", f"{met} of {len(heads)} headline cases meet the goal."]
    else:
        out += ["The `cpu` backend was not measured on the CPU (see *Not measured* below)."]
    out.append("")

    summary = summarize(rows)
    if summary:
        out += ["## Geometric-mean speedups", ""]
        out += _table(
            ["device", "dtype", "backend", "phase", "cases", "vs reference", "vs torch.compile(reference)",
             "min / max vs reference"],
            [[s["device"], s["dtype"], backend_label(s["backend"]), s["phase"], s["cases"],
              format_speedup(s["vs_reference"]), format_speedup(s["vs_compile"]),
              f"{format_speedup(s['min_vs_reference'])} / {format_speedup(s['max_vs_reference'])}"]
             for s in summary],
        )
        out.append("")

    by_target = defaultdict(list)
    for r in rows:
        by_target[(r["device"], r["dtype"])].append(r)
    for (device, dtype), rs in by_target.items():
        out += [f"## {device}, {dtype}", ""]
        out += _table(
            ["op", "case", "shape", "phase", "backend", "median", "IQR", "rounds", "vs reference",
             "vs torch.compile(reference)"],
            [[r["op"], r["case"], r["shape"], r["phase"], backend_label(r["backend"]),
              ("~" if is_noisy(r) else "") + format_time(r["median"]),
              format_time(r["iqr"]), r["rounds"], format_speedup(r["vs_reference"]), format_speedup(r["vs_compile"])]
             for r in rs],
        )
        out.append("")

    compiles = dgm.get("compile") or {}
    times = [v["compile_s"] for v in compiles.values() if "compile_s" in v]
    if times:
        out += [f"torch.compile(reference): {len(times)} shapes compiled (dynamic=False, one at a time), "
                f"{sum(times):.0f} s in all (median {sorted(times)[len(times) // 2]:.1f} s per shape, "
                "warm-up included; not part of any timing).", ""]

    skipped = dgm.get("skipped") or []
    notes = ["`triton` on CPU tensors is not benchmarked: it runs in Triton's interpreter, which is not a benchmark."]
    if skipped:
        grouped = defaultdict(int)
        for s in skipped:
            grouped[(s.get("device", "?"), s.get("dtype", "?"), s.get("backend", "?"), s["reason"])] += 1
        notes += [f"`{backend_label(b)}` on {d}/{t}: {n} benchmarks skipped: {reason}"
                  for (d, t, b, reason), n in sorted(grouped.items())]
    out += ["## Not measured", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# --- running ----------------------------------------------------------------------------------------


def run_suite(*, quick: bool, devices: str | None, out_dir: Path, pytest_args: list[str]) -> tuple[int, Path]:
    """Run bench_ops.py under pytest with --benchmark-json; returns (pytest's exit code, the JSON path)."""
    import importlib.util

    import torch

    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:  # say what to install, before any time is spent (the core install has no test extra)
        raise SystemExit(f"the microbenchmarks need {' and '.join(missing)}, which the 'test' extra installs: "
                         f"pip install --no-build-isolation -e \".[test]\" (or run the rest with --skip-ops)")

    chosen = shapes.parse_devices(devices, torch.cuda.is_available(), option="--devices")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    name = f"{device_slug(machine_info(), chosen)}-{stamp}{'-quick' if quick else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    cmd = [
        sys.executable, "-m", "pytest", BENCH_FILE,
        "-p", "no:cacheprovider",
        "-o", "addopts=",  # the project's own pytest options (e.g. for tests/) must not change the run
        "-q", "--benchmark-quiet",  # this report replaces pytest-benchmark's (very wide) console table
        f"--benchmark-json={json_path}",
        f"--dgm-devices={','.join(chosen)}",
    ] + (["--dgm-quick"] if quick else []) + pytest_args
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    return code, json_path


def write_report(json_path: Path, md_path: Path | None = None) -> tuple[str, Path]:
    data = json.loads(Path(json_path).read_text())
    md_path = md_path or Path(json_path).with_suffix(".md")
    try:
        source = str(Path(json_path).resolve().relative_to(ROOT))
    except ValueError:
        source = str(json_path)
    text = render_markdown(data, source=source)
    Path(md_path).write_text(text)
    return text, Path(md_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Run the dgm_kernels microbenchmarks and/or write their Markdown report.",
        epilog="Arguments after `--` go to pytest (e.g. `-- -k masked_weight`).",
    )
    parser.add_argument("json", nargs="?", help="an existing pytest-benchmark JSON to report on (without --run)")
    parser.add_argument("--run", action="store_true", help="run benchmarks/bench_ops.py first")
    parser.add_argument("--quick", action="store_true", help="smoke subset of shapes and short timing")
    parser.add_argument("--devices", default=None, help="comma-separated: cpu, cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--budget", type=float, default=None,
                        help="target seconds of timed calls per benchmark (default 1.0; 0.15 with --quick)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=f"where --run writes (default {RESULTS_DIR})")
    parser.add_argument("-o", "--output", type=Path, default=None, help="Markdown file to write (default: beside the JSON)")
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.run == (args.json is not None):
        parser.error("give either --run or the path of a results JSON, not both or neither")
    if not args.run and (args.quick or args.devices or args.budget is not None or pytest_args):
        parser.error("--quick, --devices, --budget and pytest arguments apply only with --run")
    if args.budget is not None:
        pytest_args = [f"--dgm-budget={args.budget}"] + pytest_args

    code = 0
    if args.run:
        try:
            code, json_path = run_suite(quick=args.quick, devices=args.devices, out_dir=args.out_dir,
                                        pytest_args=pytest_args)
        except ValueError as exc:
            parser.error(str(exc))
        if not json_path.exists():
            print(f"pytest exited with {code} and wrote no results ({json_path} is missing): no benchmark ran; "
                  "add `-- -rs` to see why each was skipped", file=sys.stderr)
            return code or 1
    else:
        json_path = Path(args.json)
        if not json_path.is_file():
            parser.error(f"results JSON {json_path} does not exist")
    text, md_path = write_report(json_path, args.output)
    print(text)
    print(f"\nwrote {md_path}" + (f" (raw data: {json_path})" if args.run else ""), file=sys.stderr)
    if code:
        print(f"warning: pytest exited with code {code}: some benchmarks failed (see above)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
