"""scripts/classifier_ceiling.py: the joint classifier it trains learns separable classes, its command reads the
quick preset's split of a data set, and bad arguments are refused naming them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "classifier_ceiling.py"


def _load():
    spec = importlib.util.spec_from_file_location("classifier_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _separable(per_class: int, classes: int, seed: int):
    """A Subset of uint8 32 x 32 x 3 images whose class is the colour channel that is bright, plus noise."""
    from dgm.data import Subset

    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randint(0, 60, (len(labels), 3, 32, 32), generator=gen)
    for c in range(classes):
        images[labels == c, c % 3] += 150 if c < 3 else 90
    return Subset(images.to(torch.uint8), labels, labels)


def test_learns_separable_classes_and_reports_each_epoch():
    ceiling = _load()
    seen = []
    accuracies = ceiling.train_joint(_separable(24, 3, seed=0), [_separable(10, 3, seed=1)], classes=3, epochs=3,
                                     widths=[8, 8, 8], lr=2e-3, betas=[0.5, 0.999], batch_size=64, shift=2,
                                     report=lambda e, a, s: seen.append((e, a)))
    assert len(accuracies) == 3 and [e for e, _ in seen] == [1, 2, 3]
    assert accuracies[-1] > 90.0, accuracies  # chance is 33 %


def test_command_on_the_synthetic_data_set(capsys):
    ceiling = _load()
    assert ceiling.main(["--dataset", "synthetic", "--per-class", "8", "--epochs", "2", "--widths", "8,8,8"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: A_T" in out and "epoch 2: A_T" in out


@pytest.mark.parametrize("args, needle", [(["--epochs", "0"], "--epochs must be >= 1, got 0"),
                                          (["--per-class", "-3"], "--per-class must be >= 1, got -3"),
                                          (["--widths", "16,x"], "--widths must be comma-separated integers"),
                                          (["--dataset", "cifar11"], "dataset must be one of")])
def test_bad_arguments_are_refused(args, needle, capsys):
    ceiling = _load()
    with pytest.raises(SystemExit) as exit_info:
        ceiling.main(args)
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
