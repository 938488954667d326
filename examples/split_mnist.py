"""The data of the three ports (hat_, packnet_, piggyback_split_mnist.py): split MNIST from the project's readers."""
from __future__ import annotations

import argparse


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (an epoch count of 0 or less would train nothing and say nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_common_arguments(p: argparse.ArgumentParser, epochs: int, hidden: int) -> None:
    """The options every port takes: its training length and width, the data, the seed and the threads."""
    p.add_argument("--epochs", type=positive_int, default=epochs, help=f"epochs per task (default {epochs})")
    p.add_argument("--hidden", type=positive_int, default=hidden, help=f"hidden units per layer (default {hidden})")
    p.add_argument("--synthetic", action="store_true", help="the synthetic stand-in for MNIST (no files needed)")
    p.add_argument("--max-train-per-class", type=positive_int, help="cap on the training images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads")
