"""Data-parallel scaling: GAN iterations per second of one global batch shared by 1, 2, ... processes (torchrun).

    python -m benchmarks.scaling                         # CPU: 1 and 2 processes, 1 thread each, mnist-dgmw-quick
    python -m benchmarks.scaling --device cuda --nproc 1,2,4,8   # one GPU per process (scripts/gpu_report.sh)

Each process count is one ``torchrun --standalone`` job running :func:`measure` on every rank: the case's training
state (``benchmarks.e2e.build_step``, with the ranks' :class:`dgm.distributed.World`), warm-up iterations, then timed
iterations of ``TaskStep.iteration`` on the same global batch (the preset's), each rank computing its share. Reported
per process count: median seconds per iteration, iterations per second, speedup over one process and scaling
efficiency (speedup / processes), and the bytes the iteration all-reduces (gradients of every optimizer step).

On the CPU, ``--threads`` (default 1) is per process: with 1 thread each, N processes use N cores where one process
uses one, so efficiency 1 would mean the batch's work divides perfectly; a row with one process on all the
processes' threads is added for the same-hardware comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import e2e

DEFAULT_CASE = "mnist-dgmw-quick"


def _parse_nproc(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nproc must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--nproc must be integers >= 1, got {text!r}")
    return sorted(set(values))


def process_counts(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself (``scripts/gpu_report.sh`` makes the same list)."""
    if n < 1:
        raise ValueError(f"need at least one process, got {n}")
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def measure(case_name: str, task: int, device: str, *, iters: int, warmup: int, per_class: int) -> dict | None:
    """One rank's timing (call on every rank of the job); returns the result on rank 0, None elsewhere."""
    import torch

    import dgm_kernels as dk
    from dgm.data import to_model_range
    from dgm.distributed import current_world
    from dgm.plasticity import scale_at

    world = current_world()
    case = e2e.CASES[case_name]
    dev = torch.device(device, world.local_rank) if device == "cuda" else torch.device(device)
    backend = dk.backends.auto_backend_for(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with dk.use_backend(backend):
        cfg, step, tasks = e2e.build_step(case, task, backend, dev, per_class=per_class, world=world)
        real = tasks[task].train
        N, B = len(real), cfg.batch_size
        batches = max(1, N // B)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
        times = []
        for i in range(warmup + iters):
            b = i % batches
            idx = order[b * B:(b + 1) * B]
            x, pos = to_model_range(real.images[idx.to(dev)]), real.positions[idx.to(dev)]
            s, s_max = scale_at(cfg.s_schedule, cfg.s_max, 1, max(cfg.epochs, 2), b, batches)
            world.barrier()  # every rank starts the iteration together (its collectives keep them together after)
            sync()
            t0 = time.perf_counter()
            step.iteration(x, pos, idx, s, s_max)
            sync()
            dt = time.perf_counter() - t0
            dt = world.sum_values([dt])[0] / world.size  # the mean over the ranks
            if i >= warmup:
                times.append(dt)
    if not world.is_main:
        return None
    params = {"generator": step.opt_g, "critic": step.opt_d}
    if step.opt_c is not step.opt_d:
        params["classifier"] = step.opt_c
    numel = {k: sum(p.numel() for g in opt.param_groups for p in g["params"]) for k, opt in params.items()}
    classifier_steps = task + 1 if cfg.classifier_schedule == "interleaved" else 0
    # one all-reduce of float32 gradients per optimizer step: critic, generator, and each classifier step
    reduced = 4 * (numel["generator"] + numel["critic"] + classifier_steps * numel.get("classifier", numel["critic"]))
    med = statistics.median(times)
    return dict(case=case_name, task=task, device=device, processes=world.size, threads=torch.get_num_threads(),
                backend=backend, global_batch=B, iterations=len(times), warmup=warmup, median_s=med,
                it_per_s=1.0 / med, parameters=numel, allreduced_bytes_per_iteration=reduced,
                device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")


def _worker(args) -> int:
    import torch

    from dgm.distributed import start

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    world = start(args.device, timeout_s=600)
    res = measure(args.case, args.task, args.device, iters=args.iters, warmup=args.warmup, per_class=args.per_class)
    if res is not None:
        print("SCALING-RESULT " + json.dumps(res), flush=True)
    if world.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def run_one(nproc: int, *, case: str, task: int, device: str, threads: int, iters: int, warmup: int,
            per_class: int, timeout: float = 1800) -> dict:
    """One ``torchrun`` job of ``nproc`` processes; its rank 0's result (or ``{"error": ...}``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "benchmarks.scaling", "--worker", "--case", case, "--task", str(task), "--device", device,
           "--threads", str(threads), "--iters", str(iters), "--warmup", str(warmup), "--per-class", str(per_class)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"processes": nproc, "threads": threads, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("SCALING-RESULT "):
            return json.loads(line[len("SCALING-RESULT "):])
    return {"processes": nproc, "threads": threads,
            "error": f"torchrun exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-1500:]}"}


def run_all(*, nprocs, case: str = DEFAULT_CASE, task: int = 0, device: str = "cpu", threads: int = 1,
            iters: int = 20, warmup: int = 3, per_class: int = 256) -> dict:
    """Every process count (and, on the CPU, one process on all their threads); speedups and efficiencies."""
    rows = []
    for n in nprocs:
        print(f"scaling: {n} process(es) on {device} ...", flush=True)
        rows.append(run_one(n, case=case, task=task, device=device, threads=threads, iters=iters, warmup=warmup,
                            per_class=per_class))
    most = max(nprocs)
    if device == "cpu" and most > 1:
        print(f"scaling: 1 process with {threads * most} threads ...", flush=True)
        row = run_one(1, case=case, task=task, device=device, threads=threads * most, iters=iters, warmup=warmup,
                      per_class=per_class)
        row["same_cores_as"] = most
        rows.append(row)
    base = next((r for r in rows if r.get("processes") == 1 and "error" not in r and "same_cores_as" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["speedup"] = base["median_s"] / r["median_s"]
            r["efficiency"] = r["speedup"] / r["processes"]
    return {"case": case, "task": task, "device": device, "rows": rows,
            "settings": {"iters": iters, "warmup": warmup, "per_class": per_class, "threads_per_process": threads}}


def format_table(data: dict) -> list[str]:
    lines = [f"Case `{data['case']}`, task {data['task']}, {data['device']}: one global batch shared by the processes "
             f"({data['settings']['iters']} timed iterations after {data['settings']['warmup']}; speedup and "
             "efficiency against one process with the same threads per process).", "",
             "| processes | threads each | global batch | s / iteration | it/s | speedup | efficiency | "
             "all-reduced MB / iteration |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['processes']} | {r['threads']} | | failed: {r['error'][:200]} | | | | |")
            continue
        note = f" (same cores as {r['same_cores_as']})" if "same_cores_as" in r else ""
        lines.append(f"| {r['processes']}{note} | {r['threads']} | {r['global_batch']} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['it_per_s']:.2f} | {r.get('speedup', float('nan')):.2f}x | "
                     f"{r.get('efficiency', float('nan')):.2f} | "
                     f"{r['allreduced_bytes_per_iteration'] / 1e6 if r['processes'] > 1 else 0:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=_parse_nproc, default=[1, 2], help="process counts, comma-separated (default 1,2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--case", choices=sorted(e2e.CASES), default=DEFAULT_CASE)
    p.add_argument("--task", type=int, default=0, help="the task trained (earlier ones simulated as finished)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--per-class", type=int, default=256, help="synthetic training images per class")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.task not in range(e2e.CASES[args.case].num_classes // e2e.CASES[args.case].classes_per_task):
        p.error(f"--task must be a task of {args.case}, got {args.task}")
    if args.threads < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--threads and --iters must be >= 1 and --warmup >= 0")
    if args.worker:
        return _worker(args)
    if args.device == "cuda":
        import torch

        have = torch.cuda.device_count()
        if max(args.nproc) > have:
            p.error(f"--nproc asks for {max(args.nproc)} processes with one GPU each, but {have} GPU(s) are visible")
    data = run_all(nprocs=args.nproc, case=args.case, task=args.task, device=args.device, threads=args.threads,
                   iters=args.iters, warmup=args.warmup, per_class=args.per_class)
    print("\n".join(format_table(data)))
    if args.out:
        args.out.write_text(json.dumps(data, indent=1) + "\n")
    return 1 if any("error" in r for r in data["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
