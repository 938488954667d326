"""Where the time of one DGM training iteration goes, per backend: each part timed alone.

    python -m benchmarks.breakdown                                   # mnist-dgmw, task 5, every CPU backend
    python -m benchmarks.breakdown --case mnist-dgmw-quick --task 5 --threads 1

Parts (the pieces of :meth:`dgm.steps.TaskStep.iteration`, same networks and state as ``benchmarks/e2e.py``):
the generator's forward without gradient (the critic step's fake batch), the critic step with the gradient
penalty, one classifier step, the generator step split into the generator's forward + backward alone, the
critic's forward + backward to its input, the sparsity regulariser, and the masked Adam step; then the whole
iteration. Times are the median CPU time of the process (``time.process_time``: robust to other processes on a
busy machine; with one torch thread it equals the compute time) or, with ``--wall``, wall-clock time; CUDA times
are wall-clock with synchronisation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def breakdown(case_name: str, task: int, backend: str, device: str = "cpu", *, repeats: int = 10,
              per_class: int = 256, wall: bool = False) -> dict[str, float]:
    import torch

    import dgm_kernels as dk
    from benchmarks.e2e import CASES, build_step
    from dgm.data import to_model_range
    from dgm.plasticity import sparsity_loss
    from dgm.steps import classifier_step, critic_step, frozen_params

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    clock = time.perf_counter if (wall or cuda) else time.process_time
    out = {}
    with dk.use_backend(backend):
        cfg, step, tasks = build_step(CASES[case_name], task, backend, dev, per_class=per_class)
        G, D = step.G, step.D
        real = tasks[task].train
        idx = torch.arange(min(cfg.batch_size, len(real)))
        x, pos = to_model_range(real.images[idx.to(dev)]), real.positions[idx.to(dev)]
        G.set_schedule(50.0, cfg.s_max)
        z = torch.randn(x.shape[0], G.nz, device=dev)
        fake = G(z, pos).detach()

        def timed(name, fn, n=repeats):
            fn()
            sync()
            ts = []
            for _ in range(n):
                t0 = clock()
                fn()
                sync()
                ts.append(clock() - t0)
            out[name] = statistics.median(ts)

        def g_forward():
            with torch.no_grad():
                G(z, pos)

        def g_alone():
            G(z, pos).sum().backward()

        def d_input():
            with frozen_params(D):
                D.critic(fake.clone().requires_grad_()).sum().backward()

        def reg():
            sparsity_loss(G, step.reserved).backward()

        def adam():
            step.opt_g.step()

        timed("generator forward, no grad (fake batch)", g_forward)
        timed("critic step with gradient penalty", lambda: critic_step(D, step.opt_d, x, fake, cfg.lambda_gp))
        if cfg.classifier_schedule == "interleaved":
            timed("one classifier step (x t+1 per iteration)", lambda: classifier_step(step.clf, step.opt_c, x, pos))
        timed("generator forward + backward", g_alone)
        timed("critic forward + backward to its input", d_input)
        timed("sparsity regulariser forward + backward", reg)
        g_alone()
        timed("masked Adam step (generator)", adam)
        timed("whole iteration", lambda: step.iteration(x, pos, idx, 50.0, cfg.s_max), n=max(1, repeats // 2))
    return out


def main(argv=None) -> int:
    from benchmarks.e2e import CASES, is_compiled, variants_for

    p = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="mnist-dgmw", choices=list(CASES))
    p.add_argument("--task", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: every backend of the device)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--wall", action="store_true", help="wall-clock instead of process CPU time")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = args.backends.split(",") if args.backends else [v for v in variants_for(args.device) if not is_compiled(v)]
    cols = {b: breakdown(args.case, args.task, b, args.device, repeats=args.repeats, wall=args.wall) for b in backends}
    parts = list(next(iter(cols.values())))
    unit = "wall ms" if args.wall or args.device != "cpu" else "CPU ms"
    print(f"{args.case}, task {args.task}, {args.device}, torch threads {torch.get_num_threads()} ({unit}, median)\n")
    print("| part | " + " | ".join(backends) + " |")
    print("|---|" + "---|" * len(backends))
    for part in parts:
        print(f"| {part} | " + " | ".join(f"{cols[b][part] * 1e3:.2f}" for b in backends) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
