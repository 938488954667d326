"""Class-incremental task splits.

A class order (the published one by default) is cut into tasks of ``classes_per_task`` classes. Task ``t`` holds
the train / validation / test images of its classes only. Labels come twice: ``labels`` are the original class
ids (what the data set files say) and ``positions`` the index of the class in the class order (what a single
growing classifier head predicts: after task ``t`` it covers positions ``0 .. (t+1) k - 1``).

Determinism: the validation split and any per-class subsampling draw from ``numpy.random.default_rng([seed,
class_id, stream])``, one stream per class, so a class's split depends only on the seed and the class, never on
the class order, the task grouping or which other classes are loaded. Images keep their file order inside a
task (shuffling is the training loop's job).

Images stay ``uint8`` (4x smaller than float32); :meth:`Subset.batches` converts each batch to ``[-1, 1]`` on the
tensors' device, so a whole task can live on the GPU (:meth:`TaskData.to`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .datasets import ImageSet, dataset_info, load_dataset_with_provenance
from .fetch import DEFAULT_TIMEOUT_S
from .transforms import to_model_range

__all__ = ["Subset", "TaskData", "SplitRecord", "TaskSequence", "class_incremental_split", "split_tasks",
           "resolve_class_order"]

# numpy SeedSequence entropy words that tell the per-class random streams apart
_VAL_STREAM, _TRAIN_CAP_STREAM, _TEST_CAP_STREAM, _ORDER_STREAM = 0, 1, 2, 3


@dataclass(frozen=True)
class Subset:
    """Images ``uint8 [N, C, H, W]``, ``labels`` int64 (original class ids), ``positions`` int64 (in the order)."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"Subset.images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{list(self.images.shape)}")
        for name in ("labels", "positions"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(f"Subset.{name} must be int64 [{n}], got {t.dtype} {list(t.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Subset:
        """A copy on ``device`` (the same object when it is already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return Subset(self.images.to(device, non_blocking=non_blocking),
                      self.labels.to(device, non_blocking=non_blocking),
                      self.positions.to(device, non_blocking=non_blocking))

    def float_images(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All images in ``[-1, 1]`` (allocates N x C x H x W floats: prefer :meth:`batches` for big sets)."""
        return to_model_range(self.images, dtype)

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                drop_last: bool = False, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(images in [-1, 1], labels, positions)`` batches, on the subset's device.

        The permutation is drawn on the CPU from ``generator`` (a CPU ``torch.Generator``), so the batch order
        depends only on that generator, not on the device.
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield to_model_range(self.images[idx], dtype), self.labels[idx], self.positions[idx]


@dataclass(frozen=True)
class TaskData:
    """The data of one task: its classes (original ids and positions in the class order) and three subsets."""

    task: int
    classes: tuple[int, ...]
    positions: tuple[int, ...]
    train: Subset
    val: Subset
    test: Subset

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskData:
        """A copy with every tensor on ``device``."""
        return replace(self, train=self.train.to(device, non_blocking), val=self.val.to(device, non_blocking),
                       test=self.test.to(device, non_blocking))

    @property
    def device(self) -> torch.device:
        return self.train.device


@dataclass(frozen=True)
class SplitRecord:
    """What a run must write into its config to reproduce (and document) its data."""

    dataset: str
    class_order: tuple[int, ...]
    class_names: tuple[str, ...]  # names of the classes in class_order, same order
    classes_per_task: int
    tasks: tuple[tuple[int, ...], ...]
    val_fraction: float
    seed: int
    image_size: int
    max_train_per_class: int | None
    max_test_per_class: int | None
    counts: tuple[dict, ...]  # per task: {"train": n, "val": n, "test": n}
    provenance: dict  # per split: source and file digests

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["class_order"] = list(self.class_order)
        d["class_names"] = list(self.class_names)
        d["tasks"] = [list(t) for t in self.tasks]
        d["counts"] = [dict(c) for c in self.counts]
        return d


class TaskSequence(list):
    """A ``list[TaskData]`` that also carries its :class:`SplitRecord` (``.record``)."""

    def __init__(self, tasks: Sequence[TaskData], record: SplitRecord):
        super().__init__(tasks)
        self.record = record

    @property
    def class_order(self) -> tuple[int, ...]:
        return self.record.class_order

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskSequence:
        return TaskSequence([t.to(device, non_blocking) for t in self], self.record)


def resolve_class_order(name: str, class_order=None, seed: int = 0) -> tuple[int, ...]:
    """Turn a ``class_order`` argument into a tuple of class ids.

    ``None``: the data set's published order; ``"random"``: a permutation of it drawn from ``seed``; a sequence
    of class ids or class names (e.g. wnids): that order (a subset of the classes is allowed).
    """
    info = dataset_info(name)
    if class_order is None:
        return tuple(info.class_order)
    if isinstance(class_order, str):
        if class_order.lower() in ("random", "shuffled", "shuffle"):
            rng = np.random.default_rng([int(seed), _ORDER_STREAM])
            return tuple(int(info.class_order[i]) for i in rng.permutation(len(info.class_order)))
        raise ValueError(f"class_order must be None, 'random' or a sequence of classes, got {class_order!r}")
    order = []
    for c in class_order:
        if isinstance(c, str):
            if c not in info.class_names:
                raise ValueError(f"class_order: {c!r} is not a class of {info.name} (classes: "
                                 f"{list(info.class_names)[:10]}{'...' if info.num_classes > 10 else ''})")
            order.append(info.class_names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= int(c) < info.num_classes:
                raise ValueError(f"class_order: class id {c} out of range [0, {info.num_classes - 1}] for {info.name}")
            order.append(int(c))
        else:
            raise TypeError(f"class_order entries must be class ids (int) or names (str), got {type(c).__name__}")
    if len(set(order)) != len(order):
        dup = sorted({c for c in order if order.count(c) > 1})
        raise ValueError(f"class_order lists classes {dup} more than once")
    if not order:
        raise ValueError("class_order is empty")
    return tuple(order)


def _class_indices(labels: np.ndarray, c: int) -> np.ndarray:
    return np.flatnonzero(labels == c)


def split_tasks(train: ImageSet, test: ImageSet, class_order: Sequence[int], classes_per_task: int,
                val_fraction: float = 0.0, seed: int = 0, *, num_tasks: int | None = None,
                max_train_per_class: int | None = None, max_test_per_class: int | None = None
                ) -> list[TaskData]:
    """Cut already-loaded train/test sets into class-incremental tasks (see the module docstring).

    ``val_fraction`` of each class's training images (rounded down) go to the task's validation subset.
    ``max_train_per_class`` / ``max_test_per_class`` keep a seeded random subset of that many images per class
    (smoke runs); the validation images are drawn first, from the whole class.
    """
    order = [int(c) for c in class_order]
    if not isinstance(classes_per_task, int) or isinstance(classes_per_task, bool) or classes_per_task <= 0:
        raise ValueError(f"classes_per_task must be a positive int, got {classes_per_task!r}")
    if len(order) % classes_per_task:
        raise ValueError(f"classes_per_task={classes_per_task} does not divide the {len(order)} classes of the "
                         "class order")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    for name, cap in (("max_train_per_class", max_train_per_class), ("max_test_per_class", max_test_per_class)):
        if cap is not None and (not isinstance(cap, int) or cap <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {cap!r}")
    total_tasks = len(order) // classes_per_task
    if num_tasks is None:
        num_tasks = total_tasks
    if not isinstance(num_tasks, int) or not 1 <= num_tasks <= total_tasks:
        raise ValueError(f"num_tasks must be an int in [1, {total_tasks}], got {num_tasks!r}")
    seed = int(seed)
    tr_y, te_y = train.labels.numpy(), test.labels.numpy()
    position = {c: i for i, c in enumerate(order)}

    tasks = []
    for t in range(num_tasks):
        classes = order[t * classes_per_task:(t + 1) * classes_per_task]
        tr_idx, va_idx, te_idx = [], [], []
        for c in classes:
            idx = _class_indices(tr_y, c)
            if len(idx) == 0:
                raise ValueError(f"class {c} has no training images")
            perm = idx[np.random.default_rng([seed, c, _VAL_STREAM]).permutation(len(idx))]
            n_val = int(float(val_fraction) * len(idx))
            if val_fraction > 0 and n_val == len(idx):
                raise ValueError(f"val_fraction={val_fraction} leaves class {c} no training images")
            va_idx.append(perm[:n_val])
            rest = perm[n_val:]
            if max_train_per_class is not None and len(rest) > max_train_per_class:
                rest = rest[np.random.default_rng([seed, c, _TRAIN_CAP_STREAM]).permutation(len(rest))]
                rest = rest[:max_train_per_class]
            tr_idx.append(rest)
            tidx = _class_indices(te_y, c)
            if max_test_per_class is not None and len(tidx) > max_test_per_class:
                tidx = tidx[np.random.default_rng([seed, c, _TEST_CAP_STREAM]).permutation(len(tidx))]
                tidx = tidx[:max_test_per_class]
            te_idx.append(tidx)
        tasks.append(TaskData(
            task=t, classes=tuple(classes), positions=tuple(position[c] for c in classes),
            train=_gather(train, np.sort(np.concatenate(tr_idx)), position),
            val=_gather(train, np.sort(np.concatenate(va_idx)), position),
            test=_gather(test, np.sort(np.concatenate(te_idx)), position)))
    return tasks


def _gather(data: ImageSet, idx: np.ndarray, position: dict[int, int]) -> Subset:
    index = torch.from_numpy(idx.astype(np.int64))
    labels = data.labels.index_select(0, index)
    lut = torch.full((int(data.labels.max()) + 1 if len(data.labels) else 1,), -1, dtype=torch.int64)
    for c, p in position.items():
        if c < len(lut):
            lut[c] = p
    return Subset(data.images.index_select(0, index), labels, lut[labels] if len(labels) else labels.clone())


def class_incremental_split(name: str, class_order=None, classes_per_task: int | None = None,
                            val_fraction: float = 0.0, seed: int = 0, *, num_tasks: int | None = None,
                            data_dir: str | os.PathLike | None = None, download: bool = True,
                            image_size: int = 32, max_train_per_class: int | None = None,
                            max_test_per_class: int | None = None, verify: bool = True,
                            device: torch.device | str | None = None,
                            timeout: float = DEFAULT_TIMEOUT_S, allow_apt: bool | None = None) -> TaskSequence:
    """Load a registered data set and split it into class-incremental tasks.

    Args:
        name: a key of :data:`dgm.data.DATASETS`.
        class_order: ``None`` (the published order: 0..9 for the digit sets and CIFAR-10, the recorded 50 wnids
            for ImageNet-50), ``"random"`` (seeded permutation) or a sequence of class ids / names.
        classes_per_task: default: the data set's (1 for MNIST, Fashion-MNIST, SVHN, CIFAR-10; 10 for
            ImageNet-50).
        val_fraction: share of each class's training images held out as the task's validation subset.
        seed: drives the validation split, the per-class caps and a ``"random"`` class order.
        num_tasks: keep only the first tasks.
        data_dir, download, verify, timeout, allow_apt: see :func:`dgm.data.load_dataset`.
        image_size: output resolution (32 in every DGM benchmark).
        max_train_per_class, max_test_per_class: cap the images per class (smoke runs).
        device: move every task's tensors there.

    Returns:
        A :class:`TaskSequence` (a list of :class:`TaskData`) whose ``.record`` holds the class order, the tasks,
        the seed, the counts and the files' digests, ready for a run's config.
    """
    info = dataset_info(name)
    order = resolve_class_order(info.name, class_order, seed)
    k = info.classes_per_task if classes_per_task is None else classes_per_task
    common = dict(image_size=image_size, verify=verify, timeout=timeout, allow_apt=allow_apt)
    tr_x, tr_y, tr_prov = load_dataset_with_provenance(info.name, "train", data_dir, download, **common)
    te_x, te_y, te_prov = load_dataset_with_provenance(info.name, "test", data_dir, download, **common)
    tasks = split_tasks(ImageSet(tr_x, tr_y), ImageSet(te_x, te_y), order, k, val_fraction, seed,
                        num_tasks=num_tasks, max_train_per_class=max_train_per_class,
                        max_test_per_class=max_test_per_class)
    record = SplitRecord(
        dataset=info.name, class_order=order, class_names=tuple(info.class_names[c] for c in order),
        classes_per_task=k, tasks=tuple(t.classes for t in tasks), val_fraction=float(val_fraction),
        seed=int(seed), image_size=int(tr_x.shape[-1]), max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
        counts=tuple({"train": len(t.train), "val": len(t.val), "test": len(t.test)} for t in tasks),
        provenance={"train": tr_prov, "test": te_prov})
    seq = TaskSequence(tasks, record)
    return seq.to(device) if device is not None else seq
