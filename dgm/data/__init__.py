"""The data layer of the DGM pipeline: real data sets in their standard formats, class-incremental splits.

Typical use::

    from dgm.data import class_incremental_split
    tasks = class_incremental_split("mnist", seed=0, val_fraction=0.1)   # 10 tasks of 1 digit
    config["data"] = tasks.record.to_dict()                              # class order, seed, digests...
    for task in tasks:
        task = task.to("cuda")                                           # uint8 tensors on the GPU
        for x, y, pos in task.train.batches(64, generator=g):            # x float32 in [-1, 1]
            ...

Public API:

- :data:`DATASETS`, :func:`dataset_info`: registry with channels, sizes, classes, published class order.
- :func:`load_dataset` -> :class:`ImageSet` ``(images uint8 NCHW, labels int64)``.
- :func:`class_incremental_split` -> :class:`TaskSequence` of :class:`TaskData` (``train``/``val``/``test``
  :class:`Subset` with ``labels`` = class ids and ``positions`` = index in the class order; ``.to(device)``)
  and its :class:`SplitRecord`; :func:`split_tasks` does the same for arrays already in memory.
- :func:`to_model_range` / :func:`from_model_range` (uint8 <-> [-1, 1]), :func:`resize_images`.
- :func:`synthetic_tasks`: the synthetic stand-in for MNIST (tests, smoke runs; no download), named
  :data:`SYNTHETIC` in a run's configuration.
- Readers of each format (:mod:`dgm.data.formats`) and fetching helpers (:mod:`dgm.data.fetch`); inside
  :func:`load_dataset`: the registry (:mod:`dgm.data.registry`), finding, verifying and caching files
  (:mod:`dgm.data.sources`) and one reader per data set (:mod:`dgm.data.loaders`).
- Errors: :class:`DataError`, :class:`DataFormatError`, :class:`ChecksumError`, :class:`DatasetNotFoundError`.
"""
from .datasets import (DATASETS, IMAGENET50_CLASSES, SPLITS, DatasetInfo, ImageSet, dataset_info, load_dataset,
                       load_dataset_with_provenance, shared_cifar10_dir)
from .errors import ChecksumError, DataError, DataFormatError, DatasetNotFoundError
from .fetch import default_data_dir
from .splits import (SplitRecord, Subset, TaskData, TaskSequence, class_incremental_split, resolve_class_order,
                     split_tasks)
from .synthetic import SYNTHETIC, SYNTHETIC_CHANNELS, synthetic_tasks
from .transforms import from_model_range, resize_images, to_model_range

__all__ = [
    "DATASETS", "IMAGENET50_CLASSES", "SPLITS", "DatasetInfo", "ImageSet", "dataset_info", "load_dataset",
    "load_dataset_with_provenance", "shared_cifar10_dir", "default_data_dir",
    "ChecksumError", "DataError", "DataFormatError", "DatasetNotFoundError",
    "SplitRecord", "Subset", "TaskData", "TaskSequence", "class_incremental_split", "resolve_class_order",
    "split_tasks", "SYNTHETIC", "SYNTHETIC_CHANNELS", "synthetic_tasks",
    "from_model_range", "resize_images", "to_model_range",
]
