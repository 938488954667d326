"""Where the time of one DGM training iteration goes, per backend: each part timed alone.

    python -m benchmarks.breakdown                                   # mnist-dgmw, task 5, every CPU backend
    python -m benchmarks.breakdown --case mnist-dgmw-quick --task 5 --threads 1

Parts (the pieces of :meth:`dgm.steps.TaskStep.iteration`, same networks and state as ``benchmarks/e2e.py``):
the generator's forward without gradient (the critic step's fake batch), the critic step with the gradient
penalty, one classifier step, the generator step split into the generator's forward + backward alone, the
critic's forward + backward to its input, the sparsity regulariser, and the masked Adam step; then the whole
iteration. Each part is timed by the median CPU time of the process (``time.process_time``: robust to other
processes on a busy machine; with one torch thread it equals the compute time) and by the median wall time; CUDA
times are wall-clock with synchronisation.

The roofline of each part: its FLOPs (convolutions and matrix products, forward, backward and double backward, as
the ``reference`` backend computes them: ``benchmarks/flops.py``) over its median wall time, and that rate's share
of the best matmul rate measured in the same process (``benchmarks.roofline.matmul_rate``). On the CPU the parts
run with every torch thread, so wall time is what the matmul rate compares with.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def _parts(step, cfg, x, pos, idx, z, fake) -> list[tuple]:
    """[(part, function, share of the repeats, preparation or None)]: the pieces of one iteration in the order they
    run; the preparation runs before each timed call and is not timed."""
    import torch

    from dgm.plasticity import sparsity_loss
    from dgm.steps import classifier_step, critic_step, frozen_params

    G, D = step.G, step.D

    def g_forward():
        with torch.no_grad():
            G(z, pos)

    def g_alone():
        G(z, pos).sum().backward()

    def d_input():
        with frozen_params(D):
            D.critic(fake.clone().requires_grad_()).sum().backward()

    out = [("generator forward, no grad (fake batch)", g_forward, 1, None),
           ("critic step with gradient penalty", lambda: critic_step(D, step.opt_d, x, fake, cfg.lambda_gp), 1, None)]
    if cfg.classifier_schedule == "interleaved":
        out.append(("one classifier step (x t+1 per iteration)",
                    lambda: classifier_step(step.clf, step.opt_c, x, pos), 1, None))
    out += [("generator forward + backward", g_alone, 1, None),
            ("critic forward + backward to its input", d_input, 1, None),
            ("sparsity regulariser forward + backward", lambda: sparsity_loss(G, step.reserved).backward(), 1, None),
            ("masked Adam step (generator)", step.opt_g.step, 1, g_alone),
            (WHOLE, lambda: step.iteration(x, pos, idx, 50.0, cfg.s_max), 0.5, None)]
    return out


WHOLE = "whole iteration"


def _state(case_name: str, task: int, backend: str, device: str, per_class: int):
    import torch

    from benchmarks.e2e import CASES, build_step
    from dgm.data import to_model_range

    dev = torch.device(device)
    cfg, step, tasks = build_step(CASES[case_name], task, backend, dev, per_class=per_class)
    real = tasks[task].train
    idx = torch.arange(min(cfg.batch_size, len(real)))
    x, pos = to_model_range(real.images[idx.to(dev)]), real.positions[idx.to(dev)]
    step.G.set_schedule(50.0, cfg.s_max)
    z = torch.randn(x.shape[0], step.G.nz, device=dev)
    fake = step.G(z, pos).detach()
    return _parts(step, cfg, x, pos, idx, z, fake)


def breakdown(case_name: str, task: int, backend: str, device: str = "cpu", *, repeats: int = 10,
              per_class: int = 256) -> dict[str, dict[str, float]]:
    """{part: {"wall_s": median wall time, "cpu_s": median CPU time of the process}} of one iteration of
    ``case_name`` at ``task`` with ``backend`` (CUDA: both are wall times after synchronisation)."""
    import torch

    import dgm_kernels as dk

    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cpu_clock = time.perf_counter if cuda else time.process_time
    out = {}
    with dk.use_backend(backend):
        parts = _state(case_name, task, backend, device, per_class)
        for name, fn, share, prepare in parts:
            fn()
            sync()
            walls, cpus = [], []
            for _ in range(max(1, int(repeats * share))):
                if prepare is not None:
                    prepare()
                    sync()
                t0, c0 = time.perf_counter(), cpu_clock()
                fn()
                sync()
                walls.append(time.perf_counter() - t0)
                cpus.append(cpu_clock() - c0)
            out[name] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}
    return out


def part_flops(case_name: str, task: int, device: str = "cpu", *, per_class: int = 256) -> dict[str, int]:
    """{part: FLOPs of its convolutions and matrix products} (``benchmarks.flops``), as the ``reference`` backend
    computes them: the algorithm's arithmetic, the same for every backend (a backend that computes more, such as
    zero taps of a rewritten convolution, is not credited for it)."""
    import dgm_kernels as dk
    from benchmarks.flops import count_flops

    with dk.use_backend("reference"):
        parts = _state(case_name, task, "reference", device, per_class)
        return {name: count_flops(fn)[0] for name, fn, _, _ in parts}


def measure(case_name: str, task: int, device: str, backends, *, repeats: int = 10, per_class: int = 256) -> dict:
    """Everything the suite reports about one (case, task): the part times per backend, the FLOPs per part and the
    matmul rate of this process (``benchmarks.roofline.matmul_rate``)."""
    from benchmarks.roofline import matmul_rate

    parts = {b: breakdown(case_name, task, b, device, repeats=repeats, per_class=per_class) for b in backends}
    return {"device": device, "case": case_name, "task": task, "parts": parts,
            "flops": part_flops(case_name, task, device, per_class=per_class),
            "matmul_flops_per_s": matmul_rate(device)}


def format_tables(b: dict) -> list[str]:
    """Markdown: the part times (CPU time of the process on a CPU) and the roofline of every part (its FLOPs over
    its median wall time, and that rate's share of the process's matmul rate)."""
    from benchmarks.flops import rate_row

    names = list(b["parts"])
    parts = list(next(iter(b["parts"].values())))
    cpu = b["device"] == "cpu"
    lines = [f"### Where the time goes: {b['case']}, task {b['task']}, {b['device']} (ms, "
             f"{'CPU time of the process' if cpu else 'wall time'}, median)", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    key = "cpu_s" if cpu else "wall_s"
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{b['parts'][n][part][key] * 1e3:.2f}" for n in names) + " |")
    mm = b.get("matmul_flops_per_s")
    if b.get("flops"):
        lines += ["", f"Roofline of the same parts: GFLOP (convolutions and matrix products, `benchmarks/flops.py`) "
                  f"over the median wall time, GFLOP/s and its share of the matmul rate of the process "
                  f"({mm / 1e9:.1f} GFLOP/s)." if mm else "", "",
                  "| part | GFLOP | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for part in parts:
            fl = b["flops"].get(part, 0)
            if not fl:
                lines.append(f"| {part} | 0 | " + " | ".join("—" for _ in names) + " |")
                continue
            cells = []
            for n in names:
                r = rate_row(fl, b["parts"][n][part]["wall_s"], mm)
                frac = "" if r["matmul_fraction"] is None else f" ({100 * r['matmul_fraction']:.0f} %)"
                cells.append(f"{r['gflop_per_s']:.1f}{frac}")
            lines.append(f"| {part} | {fl / 1e9:.3f} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> int:
    from benchmarks.e2e import CASES, is_compiled, variants_for

    p = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="mnist-dgmw", choices=list(CASES))
    p.add_argument("--task", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: every backend of the device)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends.split(",") if args.backends else [v for v in variants_for(args.device) if not is_compiled(v)]
    result = measure(args.case, args.task, args.device, backends, repeats=args.repeats)
    print(f"torch threads {torch.get_num_threads()}\n")
    print("\n".join(format_tables(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
