"""A small, learnable, deterministic stand-in for MNIST: tests and smoke runs without a download.

It is no entry of :data:`dgm.data.DATASETS` (that registry describes data sets with files to fetch and verify); the
run configuration names it :data:`SYNTHETIC`.
"""
from __future__ import annotations

import torch

from .datasets import ImageSet
from .splits import SplitRecord, TaskSequence, split_tasks

__all__ = ["SYNTHETIC", "SYNTHETIC_CHANNELS", "synthetic_tasks"]

SYNTHETIC = "synthetic"
#: grey images, like MNIST's; tests of 3-channel networks pass ``channels=3``
SYNTHETIC_CHANNELS = 1


def synthetic_tasks(seed: int = 0, *, num_classes: int = 10, train_per_class: int = 96, test_per_class: int = 32,
                    channels: int = SYNTHETIC_CHANNELS, num_tasks: int | None = None, classes_per_task: int = 1,
                    max_train_per_class: int | None = None, max_test_per_class: int | None = None,
                    val_fraction: float = 0.0):
    """The class-incremental tasks (a :class:`TaskSequence`) of the synthetic data set (``val_fraction`` of each
    class's training images held out, as :func:`dgm.data.class_incremental_split` does).

    Class c is a bright 8x8 square at a class-specific place of a dark 32x32 image, plus noise. The images do not
    depend on ``seed`` (only the caps do, as with real data sets).
    """
    g = torch.Generator().manual_seed(20190601)

    def make(n):
        imgs, labels = [], []
        for c in range(num_classes):
            base = torch.zeros(n, channels, 32, 32)
            r, q = divmod(c, 4)
            base[:, :, 2 + 7 * r: 10 + 7 * r, 2 + 7 * q: 10 + 7 * q] = 0.8
            noisy = (base + 0.1 * torch.randn(base.shape, generator=g)).clamp(0, 1)
            imgs.append((noisy * 255).round().to(torch.uint8))
            labels.append(torch.full((n,), c, dtype=torch.int64))
        return ImageSet(torch.cat(imgs), torch.cat(labels))

    train, test = make(train_per_class), make(test_per_class)
    order = list(range(num_classes))
    tasks = split_tasks(train, test, order, classes_per_task, val_fraction, seed, num_tasks=num_tasks,
                        max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    record = SplitRecord(
        dataset=SYNTHETIC, class_order=tuple(order), class_names=tuple(str(c) for c in order),
        classes_per_task=classes_per_task, tasks=tuple(t.classes for t in tasks), val_fraction=val_fraction, seed=seed,
        image_size=32, max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class,
        counts=tuple({"train": len(t.train), "val": len(t.val), "test": len(t.test)} for t in tasks),
        provenance={"train": "synthetic", "test": "synthetic"})
    return TaskSequence(tasks, record)
