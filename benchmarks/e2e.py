"""End-to-end benchmark: one DGM training iteration per backend (iterations per second, peak memory).

    python -m benchmarks.e2e                       # every case, task 0 and a grown network, every backend here
    python -m benchmarks.e2e --cases mnist-dgmw --tasks 5 --iters 30 --out e2e.json

The iteration is :meth:`dgm.steps.TaskStep.iteration`, the code the training loop runs (SPEC section 5, the
``paper`` schedule): the classifier steps on the real batch plus the replay at the same indices of every past
class (t + 1 steps of batch 64 at task t, D's auxiliary head), one WGAN-GP critic step (gradient penalty: a
double backward through the critic), one generator step with the sparsity regulariser, HAT compensation and the
blocking of frozen entries by the masked Adam.

At task 0 the generator is as built; at task ``t > 0`` it has finished ``t`` tasks first: each simulated task sets
the scores so that a fixed share of the entries (``--reserve``, 0.25) binarise to 1, commits them to the ledger
and grows the layers by the expansion rule, as the training loop does at the end of a task. The critic and the
replay set are those of the task (replay: ``per_class`` generated images of each past class). The data are
synthetic images of the data set's size (no download); their content does not change the cost.

Every (case, task, variant) runs in a fresh subprocess: peak memory is that process's alone (CPU: the peak
resident set size, which includes torch itself, about 300-400 MiB; the increase over the process's size after
import is reported too; CUDA: ``torch.cuda.max_memory_allocated``), and no compile cache or allocator state
carries over. Variants: every concrete ``dgm_kernels`` backend that runs on the device, and ``compile``: the
``reference`` backend with the generator's forward and the regulariser's masks under ``torch.compile`` (what a
user would pick instead of the kernels; the critic is eager in every variant, it has no masked layer). The
compile variant warms up for at least 10 iterations: the layers keep the annealing scale s as a Python float,
which dynamo specialises, so the first iterations recompile (each new s) until dynamo's recompile limit, after
which those frames run eagerly; the time of its first iteration is reported (``compile_first_iteration_s``).
``compile-<backend>`` (``compile-cpu`` on a CPU; ``compile-cuda``, ``compile-triton`` on a GPU): the same iteration
with the run's ``compile`` option on (``dgm train --compile``, :class:`dgm.steps.CompiledForwards`) and that backend:
the generator's, the critic's (Wasserstein terms), the regulariser's and the classifier's forwards under
torch.compile over the project's custom ops, CUDA graphs on a GPU, the autograd calls and optimizer steps eager.
Backends with tensor scales (``cpu``, ``cuda``) compile once per task; ``triton`` takes s as a float and recompiles
per value like ``compile``. The compile variants warm up for at least 3 iterations (10 for ``compile-triton``).

The same seed gives every variant the same networks, batches and noise, so the losses of the first iterations
must agree: each variant's losses are compared with ``reference``'s: ``loss_first_rel_diff`` on the first iteration
(identical parameters and inputs: only rounding differs) and ``loss_max_rel_diff`` over the first 5 iterations
(float32 rounding differences grow from one GAN step to the next; near-zero losses such as the Wasserstein
estimate make relative differences large there).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("c", "d", "gp", "w", "g", "reg")
COMPILE = "compile"
#: variants "compile-<backend>": the run's compile option (dgm.steps.CompiledForwards) with that backend
COMPILE_PREFIX = "compile-"
CHECKED_ITERS = 5
COMPILE_WARMUP = 10
#: the first iteration compiles every graph of the iteration, the second the few that depend on state of the first
#: (e.g. the critic's input needing a gradient in the generator step); no graph follows
COMPILED_STEPS_WARMUP = 3


def is_compiled(variant: str) -> bool:
    """True for the variants that run anything under torch.compile (``compile``, ``compile-<backend>``)."""
    return variant == COMPILE or variant.startswith(COMPILE_PREFIX)


def variant_backend(variant: str) -> str:
    """The dgm_kernels backend a variant runs."""
    if variant == COMPILE:
        return "reference"
    return variant[len(COMPILE_PREFIX):] if variant.startswith(COMPILE_PREFIX) else variant


def variant_label(variant: str) -> str:
    """The name a report gives a variant."""
    if variant == COMPILE:
        return "torch.compile(reference)"
    if variant.startswith(COMPILE_PREFIX):
        return f"{variant_backend(variant)} + dgm train --compile"
    return variant


@dataclass(frozen=True)
class E2ECase:
    name: str
    dataset: str  # decides the preset's hyperparameters and the architecture
    method: str
    classes_per_task: int
    num_classes: int
    channels: int
    tasks: tuple  # the tasks measured (a grown network at the last one)
    cpu_overrides: tuple = ()  # (field, value) pairs applied on the CPU only (keep a CPU run in minutes)
    what: str = ""
    preset: str = "paper"
    cpu_iters: int | None = None  # on the CPU: at most this many timed iterations (and 1 warm-up): a heavy case

    def config(self, backend: str, device: str, compile_: bool = False):
        from dgm.presets import make_config

        overrides = dict(self.cpu_overrides) if device == "cpu" else {}
        return make_config(self.dataset, self.method, self.preset, backend=backend, device=device, compile=compile_,
                           **overrides)


CASES = {
    c.name: c
    for c in (
        E2ECase("mnist-dgmw", "mnist", "dgmw", 1, 10, 1, (0, 5),
                what="MNIST DGMw: DCGAN generator (ngf 6, weight masks), conv critic 32/64/128 with the classifier head"),
        E2ECase("mnist-dgma", "mnist", "dgma", 1, 10, 1, (0, 5),
                what="MNIST DGMa: DCGAN generator (ngf 20, channel gates), conv critic 32/64/128 with the classifier head"),
        E2ECase("mnist-dgmw-quick", "mnist", "dgmw", 1, 10, 1, (0, 5), preset="quick",
                what="MNIST DGMw with the quick preset (what `dgm train` runs): critic 16/32/64, no classifier step "
                     "in the GAN iteration (its classifier trains after the task's GAN)"),
        E2ECase("imagenet-dgmw", "imagenet50", "dgmw", 10, 50, 3, (0, 4),
                cpu_overrides=(("critic_widths", [16, 32, 64, 128]), ("batch_size", 16)), cpu_iters=3,
                what="ImageNet-50 DGMw: residual generator (stream 64), ResNet-18 critic with the classifier head; "
                     "on the CPU: critic stage widths 16/32/64/128 (the quick preset's), batch 16 and 3 timed "
                     "iterations (the grown generator alone costs ~100 GFLOP per forward at batch 64); 5 tasks, so "
                     "the grown network is measured at task 4"),
    )
}


def unavailable(device: str) -> dict:
    """{backend: why it is not measured on ``device``} for the concrete backends that are not."""
    import dgm_kernels as dk

    out = {}
    for name in dk.backends.BACKEND_NAMES:
        if name == "auto":
            continue
        if name == "triton" and device == "cpu":
            out[name] = "not run on CPU tensors (that is Triton's interpreter, a debugging tool)"
            continue
        why = dk.backends.unavailable_reason(name, device)
        if why is not None:
            out[name] = why
    return out


def variants_for(device: str) -> list[str]:
    """The backends that run on ``device`` (reference first), the compile peer, and every project backend with the
    run's compile option (``compile-cpu``, ...)."""
    import dgm_kernels as dk

    missing = unavailable(device)
    backends = [n for n in dk.backends.BACKEND_NAMES if n != "auto" and n not in missing]
    return backends + [COMPILE] + [COMPILE_PREFIX + b for b in backends if b != "reference"]


def build_step(case: E2ECase, task: int, backend: str, device, *, per_class: int, reserve: float = 0.25,
               seed: int = 0, compile_: bool = False, world=None):
    """The state of training task ``task`` of ``case`` with ``backend``: (config, TaskStep, tasks on the device).

    Synthetic data of the data set's size; ``task`` finished tasks simulated first (``simulate_finished_tasks``);
    the critic, optimizers and replay set as ``dgm.steps.prepare_task`` makes them. Call inside
    ``dgm_kernels.use_backend(backend)``. ``world``: the processes sharing each batch (``benchmarks.scaling``).
    """
    import torch

    from dgm.checkpoint import new_generator
    from dgm.data import synthetic_tasks
    from dgm.steps import new_critic, prepare_task

    cfg = case.config(backend, str(device), compile_)
    dev = torch.device(device)
    tasks = [t.to(dev) for t in synthetic_tasks(seed, num_classes=case.num_classes, train_per_class=per_class,
                                                 test_per_class=1, channels=case.channels,
                                                 classes_per_task=case.classes_per_task)]
    torch.manual_seed(seed)
    G = new_generator(cfg, case.num_classes, dev)
    G.set_backend(backend)
    initial = G.mask_sizes()
    simulate_finished_tasks(G, task, reserve, dev, seed + 1)
    step, _, _ = prepare_task(cfg, task, tasks, G, new_critic(cfg, dev), None, initial, dev, world)
    return cfg, step, tasks


# --------------------------------------------------------------------------------------------------------
# one measurement (runs in the worker subprocess)


def simulate_finished_tasks(G, n: int, reserve: float, device, seed: int) -> None:
    """Finish ``n`` tasks without training: scores with a share ``reserve`` of entries >= 0, commit, grow."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        G.add_task_modules(device)
        finish_task(G, reserve, g)


def finish_task(G, reserve: float, g) -> None:
    """End the current task without training: scores drawn so that a share ``reserve`` is >= 0 (from the CPU
    generator ``g``), committed, the generator grown."""
    import torch

    q = math.sqrt(2) * torch.erfinv(torch.tensor(2 * (1 - reserve) - 1)).item()  # N(0,1) quantile of 1 - reserve
    with torch.no_grad():
        for _, layer in G.masked_layers():
            layer.scores.copy_((torch.randn(layer.scores.shape, generator=g) - q).to(layer.scores))
    G.commit_and_expand()


def measure(case: E2ECase, task: int, variant: str, device: str, *, iters: int, warmup: int, budget: float,
            per_class: int, reserve: float, seed: int = 0, profile: int = 0) -> dict:
    import torch

    import dgm_kernels as dk
    from dgm.data import to_model_range
    from dgm.plasticity import scale_at

    backend = variant_backend(variant)
    compiled_steps = variant.startswith(COMPILE_PREFIX)
    if device == "cpu" and case.cpu_iters:
        iters, warmup, budget = min(iters, case.cpu_iters), 1, 0.0
    if compiled_steps:
        warmup = max(warmup, COMPILE_WARMUP if backend == "triton" else COMPILED_STEPS_WARMUP)
    if variant == COMPILE and not (device == "cpu" and case.cpu_iters):
        # s changes every iteration and dynamo specialises the layers' float attribute s: the first iterations
        # recompile until torch._dynamo's recompile limit (8), then those frames run eagerly. Not timed.
        warmup = max(warmup, COMPILE_WARMUP)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with dk.use_backend(backend):
        cfg, step, tasks = build_step(case, task, backend, dev, per_class=per_class, reserve=reserve, seed=seed,
                                      compile_=compiled_steps)
        G = step.G
        compile_seconds = None
        if variant == COMPILE:
            G.forward = torch.compile(G.forward)
            G.current_masks = torch.compile(G.current_masks)
        real = tasks[task].train
        N, B = len(real), cfg.batch_size
        batches = max(1, N // B)
        epochs = max(cfg.epochs, 2)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        times, cpu_times, losses = [], [], []
        t_start = time.perf_counter()
        i = 0
        while True:
            b = i % batches
            idx = order[b * B:(b + 1) * B]
            x = to_model_range(real.images[idx.to(dev)])
            pos = real.positions[idx.to(dev)]
            # s anneals along a mid-training epoch: a new value every iteration, as in training
            s, s_max = scale_at(cfg.s_schedule, cfg.s_max, epochs // 2, epochs, b, batches)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            out = step.iteration(x, pos, idx, s, s_max)
            sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i == 0 and is_compiled(variant):
                compile_seconds = dt
            if i < CHECKED_ITERS:
                losses.append({k: out[k] for k in LOSS_KEYS})
            if i >= warmup:
                times.append(dt)
                cpu_times.append(dc)
            i += 1
            enough = len(times) >= iters and time.perf_counter() - t_start >= budget
            if enough or len(times) >= 10 * iters:
                break
        profile_table = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as _profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with _profile(activities=acts) as prof:
                for _ in range(3):
                    step.iteration(x, pos, idx, s, s_max)
                sync()
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            profile_table = prof.key_averages().table(sort_by=sort, row_limit=profile)
        flops = None
        if variant == "reference":
            # the algorithm's arithmetic, which every variant of this (case, task) is credited with (roofline)
            from benchmarks.flops import count_flops

            flops = count_flops(step.iteration, x, pos, idx, s, s_max)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cuda_peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
    from benchmarks.roofline import matmul_rate

    mm_rate = matmul_rate(device)  # after the peak memory is read: its matrices are not the iteration's
    result = dict(
        case=case.name, task=task, variant=variant, backend=backend, device=device,
        device_name=torch.cuda.get_device_name(dev) if cuda else "cpu", threads=torch.get_num_threads(),
        iterations=len(times), warmup=warmup, median_s=med, iqr_s=q[2] - q[0], mean_s=statistics.fmean(times),
        it_per_s=1.0 / med, cpu_median_s=statistics.median(cpu_times), losses=losses,
        widths=list(G.widths()), generator_parameters=sum(p.numel() for p in G.parameters()),
        mask_entries=G.mask_sizes(), replayed_images=0 if step.replay_x is None else int(step.replay_x.shape[0]),
        config={k: v for k, v in cfg.to_dict().items() if k in (
            "dataset", "method", "preset", "architecture", "batch_size", "critic_widths", "classifier",
            "classifier_schedule", "lambda_gp", "s_schedule", "ngf", "nz", "classifier_widths")},
        compile_first_iteration_s=compile_seconds, matmul_flops_per_s=mm_rate,
    )
    if flops is not None:
        result["flops"], result["flops_per_op"] = flops
    if profile_table:
        result["profile"] = profile_table
    result["classifier_steps"] = task + 1 if cfg.classifier_schedule == "interleaved" else 0
    if cuda:
        result["peak_memory_bytes"] = cuda_peak
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_memory_bytes"] = int(rss_peak * 1024)
        result["memory_growth_bytes"] = int((rss_peak - rss_start) * 1024)
        result["memory_kind"] = "peak RSS of the process (ru_maxrss)"
    return result


# --------------------------------------------------------------------------------------------------------
# driver


def _worker(args) -> int:
    case = CASES[args.worker_case]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = measure(case, args.worker_task, args.worker_variant, args.device, iters=args.iters, warmup=args.warmup,
                  budget=args.budget, per_class=args.per_class, reserve=args.reserve,
                  profile=args.profile)
    if args.profile:
        print(res.get("profile", ""), file=sys.stderr)
    print("E2E-RESULT " + json.dumps(res))
    return 0


def compare_losses(results: list[dict]) -> None:
    """Add ``loss_max_rel_diff`` (vs the reference variant of the same case and task) to every result."""
    refs = {(r["case"], r["task"], r["device"]): r for r in results if r["variant"] == "reference" and "error" not in r}
    for r in results:
        ref = refs.get((r["case"], r["task"], r["device"]))
        if ref is None or "error" in r:
            continue
        worst, first = 0.0, 0.0
        for i, (a, b) in enumerate(zip(r["losses"], ref["losses"])):
            for k in LOSS_KEYS:
                diff = abs(a[k] - b[k]) / max(abs(b[k]), 1e-3)
                worst = max(worst, diff)
                if i == 0:
                    first = max(first, diff)
        r["loss_max_rel_diff"] = worst
        r["loss_first_rel_diff"] = first
        if ref.get("flops"):
            from benchmarks.flops import rate_row

            roof = rate_row(ref["flops"], r["median_s"], r.get("matmul_flops_per_s"))
            r["flops"], r["gflop_per_s"], r["matmul_fraction"] = roof["flops"], roof["gflop_per_s"], roof["matmul_fraction"]
        r["speedup_vs_reference"] = ref["median_s"] / r["median_s"]
        if r.get("cpu_median_s") and ref.get("cpu_median_s"):
            r["cpu_time_speedup_vs_reference"] = ref["cpu_median_s"] / r["cpu_median_s"]
    for r in results:
        peer = next((p for p in results if p["variant"] == COMPILE and p["case"] == r["case"] and
                     p["task"] == r["task"] and p["device"] == r["device"] and "error" not in p), None)
        if peer is not None and "error" not in r:
            r["speedup_vs_compile"] = peer["median_s"] / r["median_s"]


def run_all(*, device: str, cases, variants=None, iters: int, warmup: int, budget: float, per_class: int,
            reserve: float, threads: int | None = None, progress=True, timeout: float = 1800,
            profile: int = 0) -> dict:
    """Measure every (case, task, variant) in its own subprocess; returns {"results": [...], "not_measured": {}}."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    variants = variants or variants_for(device)
    jobs = [(c, t, v) for c in cases for t in CASES[c].tasks for v in variants]
    results = []
    bar = tqdm(jobs, desc="end-to-end", unit="run", disable=not progress) if tqdm else jobs
    for case, task, variant in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{case} task {task} {variant}")
        cmd = [sys.executable, "-m", "benchmarks.e2e", "--worker-case", case, "--worker-task", str(task),
               "--worker-variant", variant, "--device", device, "--iters", str(iters), "--warmup", str(warmup),
               "--budget", str(budget), "--per-class", str(per_class), "--reserve", str(reserve)]
        if threads:
            cmd += ["--threads", str(threads)]
        if profile:
            cmd += ["--profile", str(profile)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results.append(dict(case=case, task=task, variant=variant, device=device, error=f"timed out after {timeout} s"))
            continue
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("E2E-RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append(dict(case=case, task=task, variant=variant, device=device,
                                error=f"exit {proc.returncode}: " + " | ".join(tail)))
            continue
        results.append(json.loads(line[len("E2E-RESULT "):]))
    compare_losses(results)
    return {"results": results, "not_measured": unavailable(device),
            "settings": dict(iters=iters, warmup=warmup, budget_s=budget, per_class=per_class, reserve=reserve,
                             threads=threads)}


def format_table(data: dict) -> list[str]:
    """Markdown rows: case, task, variant, it/s, median, speedups, peak memory, loss agreement."""
    lines = ["| case | task | variant | it/s | median | IQR | vs reference | vs torch.compile(reference) | "
             "vs reference, CPU time | GFLOP/s (share of matmul rate) | peak memory | "
             "losses vs reference: max rel. diff, 1st it / first 5 its |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['task']} | {r['variant']} | — | — | — | — | — | — | — | — | {r['error'][:120]} |")
            continue
        mem = r["peak_memory_bytes"] / 2**20
        memtxt = f"{mem:.0f} MiB" + (f" (+{r['memory_growth_bytes'] / 2**20:.0f})" if "memory_growth_bytes" in r else "")
        label = variant_label(r["variant"])
        roof = "—"
        if r.get("gflop_per_s") is not None:
            share = r.get("matmul_fraction")
            roof = f"{r['gflop_per_s']:.1f}" + ("" if share is None else f" ({100 * share:.0f} %)")
        lines.append(
            f"| {r['case']} | {r['task']} | {label} | {r['it_per_s']:.2f} | {r['median_s'] * 1e3:.1f} ms | "
            f"{r['iqr_s'] * 1e3:.1f} ms | {r.get('speedup_vs_reference', float('nan')):.2f}x | "
            f"{r.get('speedup_vs_compile', float('nan')):.2f}x | {r.get('cpu_time_speedup_vs_reference', float('nan')):.2f}x | {roof} | {memtxt} | {r.get('loss_first_rel_diff', float('nan')):.1e} / {r.get('loss_max_rel_diff', float('nan')):.1e} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible, else cpu)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--variants", default=None, help="comma-separated backends, 'compile' (torch.compile of the "
                   "reference) and/or 'compile-BACKEND' (dgm train --compile with BACKEND) (default: all here)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations, at least (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--budget", type=float, default=5.0, help="keep timing until this many seconds (default 5)")
    p.add_argument("--per-class", type=int, default=256, help="real (and replayed) images per class (default 256)")
    p.add_argument("--reserve", type=float, default=0.25, help="share of entries each simulated task reserves")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in the workers")
    p.add_argument("--profile", type=int, default=0, help="keep a torch.profiler table of 3 iterations (N rows)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--worker-case", help=argparse.SUPPRESS)
    p.add_argument("--worker-task", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("iters", "per_class"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.reserve < 1:
        p.error(f"--reserve must lie in (0, 1), got {args.reserve}")
    if args.worker_case:
        return _worker(args)
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; known: {', '.join(CASES)}")
    variants = args.variants.split(",") if args.variants else None
    if variants:
        known = set(variants_for(args.device)) | set(unavailable(args.device))
        bad = [v for v in variants if v not in known]
        if bad:
            p.error(f"unknown variant(s) {bad}; known: {', '.join(sorted(known))}")
    data = run_all(device=args.device, cases=cases, variants=variants, iters=args.iters, warmup=args.warmup,
                   budget=args.budget, per_class=args.per_class, reserve=args.reserve, threads=args.threads,
                   profile=args.profile)
    print("\n".join(format_table(data)))
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    return 1 if any("error" in r for r in data["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
