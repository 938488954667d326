"""The continual classifier's ceiling: the same network trained jointly on real images of every class.

A continual run's classifier sees the newest class's real images plus replay; with a perfect generator it could at
best match this network trained on the real images of all classes at once. Measuring that tells whether a data
set's A_T is limited by the generator or by the classifier (docs/results.md, "CIFAR-10").

    python scripts/classifier_ceiling.py --dataset cifar10_shared --per-class 1280 --epochs 10 --widths 16,32,64

The network is the quick preset's (``dcgan`` classifier, no BatchNorm unless ``--batchnorm``), trained with its
optimizer (Adam 2e-3, betas 0.5 / 0.999), batch 64 and random translation; the test accuracy on all the test
images is printed after every epoch.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from dgm.data import load_dataset, to_model_range
from dgm.models import build_classifier
from dgm.steps import random_shift


def train_joint(train_x, train_y, test_x, test_y, *, classes: int, epochs: int, widths, batchnorm: bool = False,
                shift: int = 2, batch_size: int = 64, seed: int = 0, report=None) -> list[float]:
    """Test accuracy (%) after each epoch of the quick classifier trained on ``train_x`` (uint8 images) of every
    class at once; ``report(epoch, accuracy, seconds)`` is called after each epoch when given."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_classifier("dcgan", train_x.shape[1], classes, list(widths), batchnorm=batchnorm)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.5, 0.999))
    start, accuracies = time.perf_counter(), []
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = to_model_range(train_x[idx])
            if shift:
                x = random_shift(x, shift, gen)
            loss = F.cross_entropy(net.classify(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net.classify(to_model_range(test_x[i:i + 1000])).argmax(1) == test_y[i:i + 1000]).sum())
                          for i in range(0, len(test_x), 1000))
        accuracies.append(100.0 * correct / len(test_x))
        if report is not None:
            report(epoch + 1, accuracies[-1], time.perf_counter() - start)
    return accuracies


def first_per_class(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first ``per_class`` images of every class (the quick preset's ``max_train_per_class`` cap)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique().tolist()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar10_shared")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--per-class", type=int, default=1280, help="training images per class (default 1280)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--widths", default="16,32,64", help="the classifier's convolution widths")
    parser.add_argument("--batchnorm", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("per_class", "epochs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        parser.error(f"--widths must be comma-separated integers, got {args.widths!r}")
    torch.set_num_threads(args.threads)
    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    keep = first_per_class(train.labels, args.per_class)
    classes = int(train.labels.max()) + 1
    print(f"{args.dataset}: {len(keep)} training images ({args.per_class} per class at most), {len(test.labels)} test "
          f"images, widths {widths}, BatchNorm {args.batchnorm}")
    train_joint(train.images[keep], train.labels[keep], test.images, test.labels, classes=classes,
                epochs=args.epochs, widths=widths, batchnorm=args.batchnorm, seed=args.seed,
                report=lambda e, a, s: print(f"epoch {e}: test accuracy {a:.2f} % ({s:.0f} s)", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
