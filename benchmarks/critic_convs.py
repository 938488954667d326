"""The convolutions the ``cpu`` backend runs on its own kernels (``dgm_kernels/backends/thin_conv.py``), against
PyTorch's layers on the same shapes: forward + backward, and the WGAN-GP pattern (forward, the input gradient with
``create_graph=True``, then the backward of a penalty on it to the weights: the double backward).

    python -m benchmarks.critic_convs [--threads N] [--repeats 30]

Shapes: the DGM critics' first layer (5x5, stride 2, on 1-channel MNIST and 3-channel SVHN/CIFAR images, the
quick and the paper widths) and the DCGAN generator's output head (a 4x4 stride-2 transposed convolution to 1 or
3 channels), batch 64. Times: the median wall time of ``--repeats`` calls after 3 warm-up calls.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

# (name, transposed, input shape, weight shape, stride, padding)
SHAPES = (
    ("critic conv1, MNIST quick (1->16)", False, (64, 1, 32, 32), (16, 1, 5, 5), 2, 2),
    ("critic conv1, MNIST paper (1->32)", False, (64, 1, 32, 32), (32, 1, 5, 5), 2, 2),
    ("critic conv1, RGB quick (3->16)", False, (64, 3, 32, 32), (16, 3, 5, 5), 2, 2),
    ("critic conv1, RGB paper (3->32)", False, (64, 3, 32, 32), (32, 3, 5, 5), 2, 2),
    ("generator head, MNIST (16->1)", True, (64, 16, 16, 16), (16, 1, 4, 4), 2, 1),
    ("generator head, RGB (16->3)", True, (64, 16, 16, 16), (16, 3, 4, 4), 2, 1),
)
PHASES = ("fwd+bwd", "penalty (double backward)")


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(repeats: int = 30) -> list[dict]:
    """[{shape, phase, backend: seconds}] for the ``reference`` (PyTorch's convolution) and ``cpu`` backends."""
    import torch

    import dgm_kernels as dk

    rows = []
    for name, transposed, xs, ws, stride, padding in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(xs, generator=g)
        w = (torch.randn(ws, generator=g) * 0.1).requires_grad_()
        b = torch.zeros(ws[1] if transposed else ws[0], requires_grad=True)

        def conv(inp, backend):
            if transposed:
                return dk.functional.conv_transpose2d(inp, w, b, stride, padding, backend=backend)
            return dk.functional.conv2d(inp, w, b, stride, padding, backend=backend)

        out = conv(x, "reference")
        go = torch.randn(out.shape, generator=g)
        for phase in PHASES:
            row = {"shape": name, "phase": phase}
            for backend in ("reference", "cpu"):
                if phase == "fwd+bwd":
                    def fn():
                        xx = x.detach().requires_grad_()
                        torch.autograd.grad(conv(xx, backend), (xx, w, b), go)
                else:
                    def fn():
                        xx = x.detach().requires_grad_()
                        y = torch.nn.functional.leaky_relu(conv(xx, backend), 0.2)
                        gx, = torch.autograd.grad((y * go).sum(), xx, create_graph=True)
                        torch.autograd.grad((gx.flatten(1).norm(dim=1) - 1).square().mean(), (w, b))
                row[backend] = _time(fn, repeats)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> list[str]:
    lines = ["| shape | phase | PyTorch (reference) | `cpu` | speedup |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['phase']} | {r['reference'] * 1e3:.2f} ms | {r['cpu'] * 1e3:.2f} ms | "
                     f"{r['reference'] / r['cpu']:.2f}x |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.critic_convs", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, batch 64, median wall time\n")
    print("\n".join(format_table(measure(args.repeats))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
