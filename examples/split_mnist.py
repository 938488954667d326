"""The data of the three ports (hat_, packnet_, piggyback_split_mnist.py): split MNIST from the project's readers."""
from __future__ import annotations


def load_tasks(synthetic: bool, max_train_per_class: int | None, max_test_per_class: int | None = None):
    """Split MNIST (5 tasks of 2 digits, 28x28, in [-1, 1]) from the project's readers: per task (x_train, y_train,
    x_test, y_test) with labels 0/1 within the task."""
    from dgm.data import class_incremental_split, synthetic_tasks  # the examples may use dgm's data; the library not

    if synthetic:
        tasks = synthetic_tasks(classes_per_task=2, max_train_per_class=max_train_per_class,
                                max_test_per_class=max_test_per_class)
    else:
        tasks = class_incremental_split("mnist", classes_per_task=2, image_size=28,
                                        max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    return [(t.train.float_images(), t.train.positions % 2, t.test.float_images(), t.test.positions % 2) for t in tasks]
