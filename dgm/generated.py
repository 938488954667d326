"""The generated-sample metric (MeRGAN's; DGM's Table 1 copies some of its numbers): the accuracy of a *reference*
classifier, trained once on all real training images of the data set, on generated images of every class seen.

It measures the generator's memory (are old classes still generated recognisably?), not the continual classifier:
``A_t`` of :mod:`dgm.evaluate` is the continual classifier's accuracy on real test images. Never compare a number
of one metric with a number of the other.

The reference classifier is the preset critic's design (:func:`dgm.models.build_classifier`, the paper's widths,
BatchNorm) trained for :data:`REFERENCE_EPOCHS` epochs with Adam on every real training image, labelled by class id;
it is cached per data set under ``<data dir>/reference/`` (atomic write, loaded with ``weights_only=True``) with its
own test accuracy, which bounds what any generator can score.

An unconditional generator (DGR's) cannot be asked for a class: its images are labelled by the run's continual
classifier, as DGR's replay labels them, and the metric is the reference classifier's agreement with those labels
(:func:`labelled_accuracy`). It then measures the replay DGR really trains on (recognisable images *and* the right
label), not the generator alone; the share of each class among the images says whether old classes are still
generated at all.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["REFERENCE_EPOCHS", "reference_classifier", "generated_accuracy", "labelled_accuracy", "generator_sampler",
           "run_generated_accuracy"]

#: epochs of the reference classifier over all real training images
REFERENCE_EPOCHS = 3
_FORMAT = "dgm-reference-classifier-1"


def _real_data(dataset: str, data_dir):
    """(train images, train class ids, test images, test class ids, number of classes) of ``dataset``."""
    from .data import SYNTHETIC, dataset_info, load_dataset, synthetic_tasks

    if dataset == SYNTHETIC:
        tasks = synthetic_tasks(0)
        tr = [t.train for t in tasks]
        te = [t.test for t in tasks]
        return (torch.cat([s.images for s in tr]), torch.cat([s.labels for s in tr]),
                torch.cat([s.images for s in te]), torch.cat([s.labels for s in te]), len(tasks))
    train, test = load_dataset(dataset, "train", data_dir), load_dataset(dataset, "test", data_dir)
    return train.images, train.labels, test.images, test.labels, dataset_info(dataset).num_classes


@torch.no_grad()
def _accuracy(net, images, labels, batch_size=1000) -> float:
    from .data import to_model_range

    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size].to(_device(net)))
        correct += int((net.classify(x).argmax(1).cpu() == labels[i:i + batch_size]).sum())
    return 100.0 * correct / max(len(images), 1)


def _device(net) -> torch.device:
    return next(net.parameters()).device


def reference_classifier(dataset: str, *, data_dir=None, device="cpu", epochs: int = REFERENCE_EPOCHS,
                         seed: int = 0, cache_dir=None, quiet: bool = False):
    """(network, info) of ``dataset``'s reference classifier: loaded from the cache, or trained and cached.

    ``info``: ``test_accuracy`` (%, on the real test images), ``epochs``, ``train_images``, ``num_classes``,
    ``path``. The network classifies images in ``[-1, 1]`` into class ids (``net.classify``)."""
    from .checkpoint import save_atomic
    from .data import default_data_dir, to_model_range
    from .models import build_classifier
    from .names import image_channels
    from .presets import default_architecture

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    architecture = default_architecture(dataset)
    # the data set's files are checksummed by its reader, so its name fixes the images: a cached classifier is
    # found without reading them
    key = json.dumps({"format": _FORMAT, "dataset": dataset, "epochs": epochs, "seed": seed,
                      "architecture": architecture}, sort_keys=True)
    cache = Path(cache_dir) if cache_dir is not None else Path(data_dir or default_data_dir()) / "reference"
    path = cache / f"{dataset}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def new_net(classes):
        return build_classifier(architecture, image_channels(dataset), classes).to(device)

    if path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("key") != key:
            raise ValueError(f"{path} is not the reference classifier it is named for (delete it to retrain)")
        net = new_net(int(state["info"]["num_classes"]))
        net.load_state_dict(state["net"])
        net.eval()
        return net, {**state["info"], "path": str(path)}

    train_x, train_y, test_x, test_y, classes = _real_data(dataset, data_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = new_net(classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        tqdm = None
    per_epoch = (len(train_x) + 127) // 128
    bar = None if tqdm is None else tqdm(total=epochs * per_epoch, desc=f"reference classifier for {dataset}",
                                         disable=True if quiet else None, dynamic_ncols=True)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            x = to_model_range(train_x[idx].to(device))
            loss = F.cross_entropy(net.classify(x), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    info = {"test_accuracy": round(_accuracy(net, test_x, test_y), 4), "epochs": epochs,
            "train_images": len(train_x), "num_classes": classes, "dataset": dataset}
    cache.mkdir(parents=True, exist_ok=True)
    save_atomic({"key": key, "net": net.state_dict(), "info": info}, path)
    os.chmod(path, 0o644)
    net.eval()
    return net, {**info, "path": str(path)}


def generator_sampler(generator, device="cpu"):
    """``sample(task, position, n, gen)`` of a DGM generator: ``n`` images of the class at ``position`` generated
    with the masks of ``task`` (the task that learned it), as replay draws them."""
    generator.eval()

    @torch.no_grad()
    def sample(task: int, position: int, n: int, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, generator.nz, generator=gen).to(device)
        labels = torch.full((n,), position, dtype=torch.int64, device=device)
        return generator(z, labels, task=task)

    return sample


@torch.no_grad()
def generated_accuracy(sample, tasks, reference, n_per_class: int = 1000, seed: int = 0,
                       batch_size: int = 500) -> list[float]:
    """Accuracy (%) of ``reference`` on generated images of each task's classes, one value per task.

    ``sample(task, position, n, gen)`` returns ``n`` images in ``[-1, 1]`` of the class at ``position`` (see
    :func:`generator_sampler`); ``tasks``: the run's tasks (dgm.data TaskData: ``classes`` and ``positions``). An
    image counts as correct when the reference predicts the class id of its position."""
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an int >= 1, got {n_per_class!r}")
    gen = torch.Generator().manual_seed(seed)
    reference.eval()
    device = _device(reference)
    out = []
    for t, task in enumerate(tasks):
        correct = total = 0
        for class_id, position in zip(task.classes, task.positions):
            for start in range(0, n_per_class, batch_size):
                n = min(batch_size, n_per_class - start)
                x = sample(t, int(position), n, gen).to(device)
                if x.shape[0] != n:
                    raise ValueError(f"the sampler returned {x.shape[0]} images of position {position}, {n} asked")
                correct += int((reference.classify(x).argmax(1) == int(class_id)).sum())
                total += n
        out.append(100.0 * correct / total)
    return out


@torch.no_grad()
def labelled_accuracy(sample, label, tasks, reference, n_per_class: int = 1000, seed: int = 0,
                      batch_size: int = 500) -> tuple[list[float], list[float]]:
    """The metric for an unconditional generator: (accuracy per task, share per task), both in %.

    ``sample(n, gen)`` returns ``n`` images in ``[-1, 1]``; ``label(x)`` their positions (the continual classifier's
    argmax over the classes seen, DGR's replay labels). ``n_per_class`` times the classes of ``tasks`` images are
    drawn; an image counts for the task its label belongs to, and as correct when the reference predicts the class
    id of that label. ``share``: the part of all images labelled as each task's classes (a task no image is
    labelled as has accuracy NaN: forgotten, not scored)."""
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an int >= 1, got {n_per_class!r}")
    class_of = {int(p): int(c) for task in tasks for c, p in zip(task.classes, task.positions)}
    task_of = {int(p): t for t, task in enumerate(tasks) for p in task.positions}
    gen = torch.Generator().manual_seed(seed)
    reference.eval()
    device = _device(reference)
    total = n_per_class * len(class_of)
    correct, count = [0] * len(tasks), [0] * len(tasks)
    for start in range(0, total, batch_size):
        n = min(batch_size, total - start)
        x = sample(n, gen).to(device)
        if x.shape[0] != n:
            raise ValueError(f"the sampler returned {x.shape[0]} images, {n} asked")
        positions = label(x).to(device)
        unknown = set(positions.tolist()) - set(class_of)
        if unknown:
            raise ValueError(f"label returned positions {sorted(unknown)}, outside the tasks' {sorted(class_of)}")
        predicted = reference.classify(x).argmax(1)
        for p in positions.unique().tolist():
            chosen = positions == p
            count[task_of[p]] += int(chosen.sum())
            correct[task_of[p]] += int((predicted[chosen] == class_of[p]).sum())
    accuracy = [100.0 * c / k if k else float("nan") for c, k in zip(correct, count)]
    return accuracy, [100.0 * k / total for k in count]


def run_generated_accuracy(generator, classifier, tasks, reference, n_per_class: int, seed: int,
                           device="cpu") -> dict:
    """The metric for a run's generator after ``len(tasks)`` tasks: ``per_task`` and ``mean`` (% over every image
    scored), and for an unconditional generator ``share_per_task`` and ``labelled_by`` as well.

    A conditional generator (DGM's, MeRGAN's) is asked for each class with the masks of the task that learned it;
    an unconditional one (DGR's) is labelled by ``classifier`` (:func:`labelled_accuracy`)."""
    import math

    if getattr(generator, "conditional", True):
        acc = generated_accuracy(generator_sampler(generator, device), tasks, reference, n_per_class, seed=seed)
        per_class = [len(t.positions) for t in tasks]
        mean = sum(a * k for a, k in zip(acc, per_class)) / sum(per_class)
        return {"per_task": [round(a, 4) for a in acc], "mean": round(mean, 4)}
    seen = sum(len(t.positions) for t in tasks)
    generator.eval()
    classifier.eval()

    def sample(n, gen):
        z = torch.randn(n, generator.nz, generator=gen).to(device)
        return generator(z, torch.zeros(n, dtype=torch.int64, device=device))

    def label(x):
        return classifier.classify(x)[:, :seen].argmax(1)

    acc, share = labelled_accuracy(sample, label, tasks, reference, n_per_class, seed=seed)
    scored = [(a, s) for a, s in zip(acc, share) if not math.isnan(a)]
    mean = sum(a * s for a, s in scored) / sum(s for _, s in scored)
    return {"per_task": [None if math.isnan(a) else round(a, 4) for a in acc], "mean": round(mean, 4),
            "share_per_task": [round(s, 4) for s in share],
            "labelled_by": "the run's continual classifier"}
