"""Bookkeeping memory and time of the mask ledger over 10 tasks (a benchmark, not a test).

Compares everything the ledger keeps (every task's mask as bits, the reserved mask, the widths) with what
the authors' code keeps: one float32 score tensor per task per weight. Goal: at most 1/25 of it after 10
tasks. Also times ``commit_task`` + ``expansion_plan`` + ``grow`` per task.

    python -m benchmarks.ledger_memory [--tasks 10] [--backend auto] [--json PATH]

Scores are random (about a third of each layer's entries kept per task), which exercises growth like a
real run; memory depends only on the shapes, which follow DGM's expansion rule.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import dgm_kernels as dk
from dgm_kernels import nn as dnn

from dgm.plasticity import float_scores_bytes


def mnist_dgmw_generator(backend):
    """The masked layers of the MNIST DGMw generator (SPEC section 2): 128 -> 24 -> 12 -> 6, kernel 4."""
    return [
        ("conv1", dnn.MaskedConvTranspose2d(128, 24, 4, 1, 0, bias=False, backend=backend)),
        ("conv2", dnn.MaskedConvTranspose2d(24, 12, 4, 2, 1, bias=False, backend=backend)),
        ("conv3", dnn.MaskedConvTranspose2d(12, 6, 4, 2, 1, bias=False, backend=backend)),
    ]


def imagenet_dgmw_generator(backend):
    """The masked layers of the ImageNet residual generator: a 128 -> 4x4x64 linear and six 3x3 convs.

    As in dgm.models.ResidualGenerator, only each block's inner width grows (the first conv's outputs and the
    second conv's inputs); the 64-wide residual stream and the linear layer are masked but never grown.
    """
    layers = [("fc", dnn.MaskedLinear(128, 4 * 4 * 64, bias=False, backend=backend))]
    layers += [(f"block{b}.conv{c}", dnn.MaskedConv2d(64, 64, 3, 1, 1, bias=False, backend=backend)) for b in range(3) for c in range(2)]
    return layers


def run(name, layers, tasks, backend, keep=0.33):
    ledgers = [dk.MaskLedger(layers[:1], backend=backend)] if name == "imagenet" else []
    chain = layers[1:] if name == "imagenet" else layers
    ledgers.append(dk.MaskLedger(chain, backend=backend))
    gen = torch.Generator().manual_seed(0)
    times = []
    for t in range(tasks):
        for _, layer in layers:
            with torch.no_grad():
                layer.scores.copy_(torch.rand(layer.scores.shape, generator=gen) - (1 - keep))
        start = time.perf_counter()
        for i, ledger in enumerate(ledgers):
            counts = ledger.commit_task(t)
            plan = ledger.expansion_plan(counts) if i == len(ledgers) - 1 else {}  # the linear layer never grows
            if name == "imagenet":  # the residual stream keeps its width: only the blocks' inner convs grow
                plan = {layer: (gain if layer.endswith("conv0") else 0) for layer, gain in plan.items()}
            ledger.grow(plan)
        times.append(time.perf_counter() - start)
    kept = sum(ledger.memory_bytes() for ledger in ledgers)
    floats = sum(float_scores_bytes(ledger) for ledger in ledgers)
    widths = {n: ledgers[-1].widths(n)[-1] for n in ledgers[-1].names}
    params = sum(layer.weight.numel() for _, layer in layers)
    return dict(
        generator=name, tasks=tasks, ledger_bytes=kept, float_scores_bytes=floats, ratio=kept / floats,
        goal_ratio=1 / 25, meets_goal=kept * 25 <= floats, final_widths=widths, final_weights=params,
        commit_grow_ms_per_task=[round(1000 * x, 3) for x in times],
        commit_grow_ms_mean=round(1000 * sum(times) / len(times), 3),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error(f"--tasks must be >= 1, got {args.tasks}")
    results = [
        run("mnist-dgmw", mnist_dgmw_generator(args.backend), args.tasks, args.backend),
        run("imagenet", imagenet_dgmw_generator(args.backend), args.tasks, args.backend),
    ]
    for r in results:
        print(
            f"{r['generator']:>11}: after {r['tasks']} tasks the ledger keeps {r['ledger_bytes'] / 1024:.1f} KiB, "
            f"float32 scores per task would take {r['float_scores_bytes'] / 1024:.1f} KiB: ratio 1/{1 / r['ratio']:.1f} "
            f"(goal <= 1/25: {'met' if r['meets_goal'] else 'NOT met'}); commit+grow {r['commit_grow_ms_mean']:.2f} ms/task; "
            f"final widths {r['final_widths']}, {r['final_weights']} weights"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
