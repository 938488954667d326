"""The communication of data-parallel DGM training (docs/distributed.md), from the networks' parameter counts.

    python -m benchmarks.dp_cost                 # every preset's case, tasks 0-9, as a Markdown table
    python -m benchmarks.dp_cost --json out.json

Per GAN iteration, :mod:`dgm.distributed` all-reduces the float32 gradients of every optimizer step once (the
critic's, the generator's trained parameters: the masked weights, their mask scores, the task's BatchNorms and
head, and each interleaved classifier step's), and each BatchNorm in training mode all-reduces its statistics once
per forward and once per backward. The generator grows after every task; its growth here is the end-to-end
benchmarks' simulation (``benchmarks.e2e.simulate_finished_tasks``: a quarter of the entries reserved per task),
so the counts at task 9 are those of a plausibly grown network, not of one particular run. Every optimizer step
all-reduces all of its optimizer's parameters (zeros where one has no gradient in that step).

The time model of an all-reduce of ``n`` bytes among ``W`` ranks (ring): ``alpha + 2 (W - 1) / W * n / bandwidth``,
with ``alpha`` the latency of one collective; the iteration's communication is its gradient all-reduces plus its
BatchNorm all-reduces (small: latency-bound). ``efficiency(W) = (T1 / W) / (T1 / W + T_comm)`` for an iteration
taking ``T1`` on one GPU, assuming the compute divides by ``W`` (optimistic for small per-rank batches, where a
GPU's kernel launches, not its arithmetic, set the time).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# (name, dataset, method, preset)
CASES = (
    ("mnist-dgmw-quick", "mnist", "dgmw", "quick"),
    ("mnist-dgma-quick", "mnist", "dgma", "quick"),
    ("mnist-dgmw-paper", "mnist", "dgmw", "paper"),
    ("mnist-dgma-paper", "mnist", "dgma", "paper"),
    ("svhn-dgmw-paper", "svhn", "dgmw", "paper"),
    ("cifar10-dgmw-paper", "cifar10", "dgmw", "paper"),
    ("imagenet50-dgmw-paper", "imagenet50", "dgmw", "paper"),
)


@dataclass(frozen=True)
class Link:
    """An interconnect of the model: per-collective latency and ring bus bandwidth."""

    name: str
    alpha_s: float
    bandwidth: float  # bytes / s


LINKS = (
    Link("one node, NVLink", 25e-6, 100e9),  # 8 GPUs of one node
    Link("two nodes, 100 Gb/s", 60e-6, 10e9),  # 2 x 4 GPUs, the ring crossing the network
)


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters()) if net is not None else 0


def _batchnorms(net) -> int:
    from torch import nn

    return 0 if net is None else sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def case_rows(dataset: str, method: str, preset: str, tasks: int = 10, reserve: float = 0.25) -> list[dict]:
    """Per task t: parameters all-reduced per iteration, bytes, and the number of collectives."""
    import torch

    from benchmarks.e2e import finish_task
    from dgm.checkpoint import new_generator
    from dgm.presets import make_config
    from dgm.steps import new_classifier, new_critic

    cfg = make_config(dataset, method, preset).validate()
    classes_per_task = 5 if dataset == "imagenet50" else 1
    torch.manual_seed(0)
    G = new_generator(cfg, classes_per_task * tasks, "cpu")
    D = new_critic(cfg, "cpu")
    C = new_classifier(cfg, "cpu") if cfg.classifier == "separate" else None
    rows = []
    for t in range(tasks):
        if t:  # task t - 1 ends: a share ``reserve`` of its entries reserved, committed, the generator grown
            finish_task(G, reserve, torch.Generator().manual_seed(t))
        G.add_task_modules("cpu")
        seen = classes_per_task * (t + 1)
        (C if C is not None else D).grow_classes(seen)
        g = sum(p.numel() for p in G.task_parameters(t))
        # every optimizer step all-reduces all of its optimizer's parameters (zeros where a parameter has no
        # gradient in that step, such as the critic's head in a classifier step)
        d = _count(D)
        steps = t + 1 if cfg.classifier_schedule == "interleaved" else 0
        clf = _count(C) if C is not None else d
        grads = g + d + steps * clf
        bn_g = len(G.bns[t])
        bn_d = _batchnorms(D)
        bn_c = _batchnorms(C) if C is not None else bn_d
        bn_collectives = batchnorm_allreduces(bn_g, bn_d, bn_c, steps)
        rows.append(dict(task=t, widths=list(G.widths()), generator=g, critic=d, classifier_steps=steps,
                         classifier=clf if steps else 0, gradient_bytes=4 * grads, gradient_allreduces=2 + steps,
                         batchnorm_allreduces=bn_collectives))
    return rows


def batchnorm_allreduces(bn_g: int, bn_d: int, bn_c: int, classifier_steps: int, aux: bool = False) -> int:
    """BatchNorm all-reduces of one GAN iteration, for ``bn_g`` BatchNorms in the generator's task, ``bn_d`` in the
    critic, ``bn_c`` in the classifier: one per BatchNorm per forward and per backward. The critic step: three
    forwards (real, fake, interpolated), the penalty's gradient, the backward of the three forwards and of the
    gradient's graph (8); the fake images' generator forward (no gradient); the generator step: G and D forward and
    backward; each classifier step: forward and backward (tests/dgm/test_distributed.py counts them). ``aux``: the
    AC-GAN term of a task of several classes adds D's forward and backward of the real images (critic step) and of
    the generated ones (generator step)."""
    return 8 * bn_d + bn_g + 2 * (bn_g + bn_d) + classifier_steps * 2 * bn_c + (4 * bn_d if aux else 0)


def comm_seconds(row: dict, link: Link, world: int) -> float:
    ring = 2 * (world - 1) / world
    n = row["gradient_allreduces"] + row["batchnorm_allreduces"]
    return n * link.alpha_s + ring * row["gradient_bytes"] / link.bandwidth


def efficiency(t1: float, comm: float, world: int) -> float:
    return (t1 / world) / (t1 / world + comm)


def build(tasks: int = 10) -> dict:
    out = {}
    for name, dataset, method, preset in CASES:
        print(f"dp_cost: {name} ...", file=sys.stderr, flush=True)
        rows = case_rows(dataset, method, preset, tasks)
        for r in rows:
            r["comm_ms"] = {link.name: 1e3 * comm_seconds(r, link, 8) for link in LINKS}
        out[name] = rows
    return out


def format_tables(data: dict, t1_ms=(5.0, 20.0, 100.0)) -> list[str]:
    lines = ["Links: " + "; ".join(f"{link.name}: {link.alpha_s * 1e6:g} us per collective, {link.bandwidth / 1e9:g} GB/s"
                                  for link in LINKS) + " (8 ranks).", "",
             "| case | task | generator widths | parameters all-reduced (G + D + classifier steps) | MB / iteration | "
             "collectives / iteration (gradients + BatchNorm) | " + " | ".join(f"comm. ms: {link.name}" for link in LINKS)
             + " |", "|---|---|---|---|---|---|" + "---|" * len(LINKS)]
    for name, rows in data.items():
        for r in (rows[0], rows[-1]):
            clf = f" + {r['classifier_steps']} x {r['classifier']:,}" if r["classifier_steps"] else ""
            lines.append(f"| {name} | {r['task']} | {'/'.join(map(str, r['widths']))} | {r['generator']:,} + "
                         f"{r['critic']:,}{clf} | {r['gradient_bytes'] / 1e6:.1f} | {r['gradient_allreduces']} + "
                         f"{r['batchnorm_allreduces']} | "
                         + " | ".join(f"{1e3 * comm_seconds(r, link, 8):.2f}" for link in LINKS) + " |")
    lines += ["", "Scaling efficiency on 8 GPUs, (T1/8) / (T1/8 + communication), for an iteration taking T1 on one "
              "GPU (task 9's communication):", "",
              "| case | " + " | ".join(f"{link.name}, T1 = {t:g} ms" for link in LINKS for t in t1_ms) + " |",
              "|---|" + "---|" * (len(LINKS) * len(t1_ms))]
    for name, rows in data.items():
        r = rows[-1]
        lines.append(f"| {name} | " + " | ".join(
            f"{efficiency(t / 1e3, comm_seconds(r, link, 8), 8):.2f}" for link in LINKS for t in t1_ms) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dp_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tasks < 1:
        p.error(f"--tasks must be >= 1, got {args.tasks}")
    data = build(args.tasks)
    print("\n".join(format_tables(data)))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
