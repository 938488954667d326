"""The continual classifier's ceiling: the same network trained jointly on real images of every class.

A continual run's classifier sees the newest class's real images plus replay; with a perfect generator it could at
best match this network trained on the real images of all classes at once. Measuring that tells whether a data
set's A_T is limited by the generator or by the classifier (docs/results.md, "CIFAR-10").

    python scripts/classifier_ceiling.py --dataset cifar10_shared --per-class 1280 --epochs 10

The images, the network and its training are the quick preset's (``dgm train --dataset D``): the run's own split
(``max_train_per_class`` images of each class, :func:`dgm.train.load_tasks`), its separate classifier (widths
``classifier_widths`` unless ``--widths``, no BatchNorm), ``lr_c``, ``betas``, ``classifier_batch_size`` and
``classifier_shift``, one :func:`dgm.steps.classifier_step` per batch; the accuracy on the test images of every
class (A_T's definition, :func:`dgm.evaluate.accuracy_per_task`) is printed after every epoch.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from dgm.data import Subset, to_model_range
from dgm.evaluate import accuracy_per_task
from dgm.models import build_classifier
from dgm.presets import ConfigError, make_config
from dgm.steps import classifier_step
from dgm.train import load_tasks


def train_joint(train: Subset, tests: list[Subset], *, classes: int, epochs: int, widths, lr: float, betas,
                batch_size: int, shift: int, batchnorm: bool = False, seed: int = 0, report=None) -> list[float]:
    """A_T (%, the mean accuracy over ``tests``) after each epoch of a classifier trained on ``train`` (its
    ``positions`` are the targets) of every class at once; ``report(epoch, accuracy, seconds)`` after each epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_classifier("dcgan", train.images.shape[1], classes, list(widths), batchnorm=batchnorm)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(betas))
    start, accuracies = time.perf_counter(), []
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            classifier_step(net, opt, to_model_range(train.images[idx]), train.positions[idx], shift, gen)
        net.eval()
        with torch.no_grad():
            accuracies.append(float(np.mean(accuracy_per_task(net.classify, tests, classes))))
        if report is not None:
            report(epoch + 1, accuracies[-1], time.perf_counter() - start)
    return accuracies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar10_shared")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--per-class", type=int, default=1280, help="training images per class (default 1280)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--widths", default=None, help="the classifier's convolution widths (default: the preset's)")
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("per_class", "epochs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        widths = None if args.widths is None else [int(w) for w in args.widths.split(",")]
    except ValueError:
        parser.error(f"--widths must be comma-separated integers, got {args.widths!r}")
    torch.set_num_threads(args.threads)
    try:
        config = make_config(args.dataset, "dgmw", "quick", seed=args.seed, max_train_per_class=args.per_class,
                             data_dir=args.data_dir)
    except ConfigError as exc:
        parser.error(str(exc))
    widths = widths or config.classifier_widths
    tasks = load_tasks(config)
    train = Subset(*(torch.cat([getattr(t.train, f) for t in tasks]) for f in ("images", "labels", "positions")))
    classes = len(tasks.class_order)
    print(f"{args.dataset}: {len(train)} training images ({args.per_class} per class at most), "
          f"{sum(len(t.test) for t in tasks)} test images, widths {widths}, BatchNorm {args.batchnorm}, "
          f"lr {config.lr_c}, betas {config.betas}")
    train_joint(train, [t.test for t in tasks], classes=classes, epochs=args.epochs, widths=widths, lr=config.lr_c,
                betas=config.betas, batch_size=config.classifier_batch_size, shift=config.classifier_shift,
                batchnorm=args.batchnorm, seed=args.seed,
                report=lambda e, a, s: print(f"epoch {e}: A_T {a:.2f} % ({s:.0f} s)", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
