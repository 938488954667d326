"""Avalanche benchmarks from this project's data readers: class-incremental, in-memory, no download by Avalanche.

Every sample is ``(image, target, task label)``: the image as stored (``uint8 [C, H, W]``), the target the class's
*position* in the class order (0 for the first class, as everywhere in ``dgm``), the task label 0 (one head, no task
id). Experience t holds the classes of task t of :func:`dgm.data.class_incremental_split` with the same class
order, images and image order, so a strategy sees exactly what ``dgm train`` sees. Models take the images through
:class:`ModelRangeInput` (``uint8`` to ``[-1, 1]``, as ``dgm`` converts them).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset

from dgm.data import SYNTHETIC, Subset, TaskData, class_incremental_split, synthetic_tasks, to_model_range

__all__ = ["PROTOCOLS", "make_benchmark", "protocol_tasks", "benchmark_from_tasks", "experience_task", "ModelRangeInput"]

# protocol name -> classes per experience (10 experiences of 1 class: DGM's protocol; 5 of 2: the common split)
PROTOCOLS = {"10x1": 1, "5x2": 2}


class ModelRangeInput(nn.Module):
    """``net`` on images as the benchmarks store them: ``uint8`` images are mapped to ``[-1, 1]`` first
    (:func:`dgm.data.to_model_range`); float images pass unchanged. ``method`` names the network's logits function
    (``classify`` for this project's classifiers, ``forward`` for any other network).

    ``num_outputs``: pad the logits with -inf up to this many classes. A DGM classifier has outputs for the classes
    seen so far only; Avalanche evaluates the whole stream, future classes included, and its loss needs a logit
    for every target (the loss on a class the classifier has never seen is then infinite: its probability is 0;
    the accuracy is unaffected)."""

    def __init__(self, net: nn.Module, method: str = "forward", num_outputs: int | None = None):
        super().__init__()
        self.net = net
        self.method = method
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = to_model_range(x)
        logits = getattr(self.net, self.method)(x)
        missing = 0 if self.num_outputs is None else self.num_outputs - logits.shape[-1]
        if missing > 0:
            logits = torch.cat([logits, logits.new_full(logits.shape[:-1] + (missing,), float("-inf"))], dim=-1)
        return logits


def _dataset(subsets) -> ClassificationDataset:
    images = torch.cat([s.images.cpu() for s in subsets])
    targets = torch.cat([s.positions.cpu() for s in subsets])
    rows = list(range(len(targets)))
    return ClassificationDataset(
        [TensorDataset(images, targets)],
        data_attributes=[DataAttribute(targets.tolist(), "targets"),
                         DataAttribute([0] * len(rows), "targets_task_labels", use_in_getitem=True),
                         DataAttribute(rows, "rows")])


def benchmark_from_tasks(tasks):
    """An Avalanche class-incremental benchmark with one experience per task of ``tasks`` (a dgm.data
    TaskSequence or list of TaskData): streams ``train_stream``, ``test_stream`` and, when the tasks hold
    validation images, ``valid_stream``."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks must hold at least one task, got none")
    streams = {"train": _dataset([t.train for t in tasks]), "test": _dataset([t.test for t in tasks])}
    if all(len(t.val) for t in tasks):
        streams["valid"] = _dataset([t.val for t in tasks])
    order = [int(p) for t in tasks for p in t.positions]
    return class_incremental_benchmark(streams, class_order=order,
                                       num_classes_per_exp=[len(t.positions) for t in tasks])


def protocol_tasks(dataset: str = "mnist", protocol: str = "10x1", *, class_order=None, seed: int = 0,
                   data_dir=None, val_fraction: float = 0.0, max_train_per_class: int | None = None,
                   max_test_per_class: int | None = None, num_tasks: int | None = None):
    """The dgm.data TaskSequence of ``dataset`` under ``protocol`` (:data:`PROTOCOLS`), read by this project's
    readers (``data_dir`` as for ``dgm train``; CIFAR-10 from the shared arrays with ``cifar10_shared``;
    ``synthetic``: the tests' data set); ``num_tasks``: the first tasks only."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if dataset == SYNTHETIC:  # the tests' data set (dgm.data.synthetic_tasks): no files
        return synthetic_tasks(seed, classes_per_task=PROTOCOLS[protocol], max_train_per_class=max_train_per_class,
                               max_test_per_class=max_test_per_class, val_fraction=val_fraction, num_tasks=num_tasks)
    return class_incremental_split(dataset, class_order=class_order, classes_per_task=PROTOCOLS[protocol],
                                   val_fraction=val_fraction, seed=seed, data_dir=data_dir,
                                   max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class,
                                   num_tasks=num_tasks)


def make_benchmark(dataset: str = "mnist", protocol: str = "10x1", **kwargs):
    """(Avalanche benchmark, dgm.data TaskSequence) of ``dataset`` under ``protocol``: :func:`protocol_tasks` (same
    keywords) and :func:`benchmark_from_tasks` over them."""
    tasks = protocol_tasks(dataset, protocol, **kwargs)
    return benchmark_from_tasks(tasks), tasks


def experience_task(experience, task: int) -> TaskData:
    """The dgm.data TaskData of an experience of these benchmarks (training images in the benchmark's order;
    labels are the positions, as the benchmark keeps no other id)."""
    data = experience.dataset
    rows = torch.tensor(list(data.rows))
    order = torch.argsort(rows)
    items = [data[int(i)] for i in order]
    images = torch.stack([it[0] for it in items]) if items else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
    positions = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
    if images.dtype != torch.uint8:
        raise ValueError(f"experience {task}: images must be uint8 as the benchmarks of dgm.avalanche store them, "
                         f"got {images.dtype}")
    classes = tuple(sorted(int(c) for c in experience.classes_in_this_experience))
    empty = Subset(images[:0], positions[:0], positions[:0])
    return TaskData(task, classes, classes, Subset(images, positions.clone(), positions), empty, empty)
