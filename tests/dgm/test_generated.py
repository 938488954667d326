"""The generated-sample metric: the reference classifier, its cache, and `dgm eval --generated`."""
from __future__ import annotations

import json

import pytest
import torch

from dgm.cli import main
from helpers import TINY_TRAIN_ARGS
from dgm.data import synthetic_tasks, to_model_range
from dgm.generated import generated_accuracy, labelled_accuracy, reference_classifier


def _real_sampler(tasks, shift_class: int = 0):
    """A perfect generator stand-in: the real test images of the class asked for (of the next class with
    ``shift_class`` 1), in order, cycling."""
    by_position = {}
    for t in tasks:
        for p in t.positions:
            by_position[int(p)] = to_model_range(t.test.images[t.test.positions == p])

    def sample(task, position, n, gen):
        images = by_position[(position + shift_class) % len(by_position)]
        return images[torch.arange(n) % len(images)]

    return sample


def test_a_perfect_generator_scores_the_reference_classifiers_own_accuracy(tmp_path):
    ref, info = reference_classifier("synthetic", epochs=1, cache_dir=tmp_path, quiet=True)
    tasks = synthetic_tasks(0, num_tasks=4)
    per_class = len(tasks[0].test)
    acc = generated_accuracy(_real_sampler(tasks), tasks, ref, n_per_class=per_class, batch_size=7)
    with torch.no_grad():
        own = [100.0 * float((ref.classify(to_model_range(t.test.images)).argmax(1) == t.test.labels).float().mean())
               for t in tasks]
    assert acc == pytest.approx(own, abs=1e-9)
    everything = synthetic_tasks(0)
    mean_all = generated_accuracy(_real_sampler(everything), everything, ref, n_per_class=per_class)
    assert sum(mean_all) / len(mean_all) == pytest.approx(info["test_accuracy"], abs=1e-3)
    # images of the wrong class are scored as wrong
    wrong = generated_accuracy(_real_sampler(everything, shift_class=1), everything, ref, n_per_class=per_class)
    assert sum(wrong) / len(wrong) < 50 < info["test_accuracy"]
    with pytest.raises(ValueError, match="n_per_class must be an int >= 1"):
        generated_accuracy(_real_sampler(tasks), tasks, ref, n_per_class=0)


def test_an_unconditional_generator_is_scored_against_its_labels(tmp_path):
    """DGR's path: images labelled by a classifier. Real test images with their true labels score the reference's
    own accuracy; wrong labels score low; a label never given leaves its task unscored (NaN), its share 0."""
    import math

    ref, _ = reference_classifier("synthetic", epochs=1, cache_dir=tmp_path, quiet=True)
    tasks = synthetic_tasks(0, num_tasks=4)
    images = torch.cat([to_model_range(t.test.images) for t in tasks])
    positions = torch.cat([t.test.positions for t in tasks])
    per_class = len(tasks[0].test)

    def sample(n, gen):  # every test image once, in order (n_per_class x classes = all of them)
        start = sample.next
        sample.next += n
        return images[start:start + n]

    def run(label):
        sample.next = 0
        return labelled_accuracy(sample, label, tasks, ref, n_per_class=per_class, batch_size=9)

    truth = lambda x: positions[sample.next - len(x):sample.next]  # noqa: E731 -- the labels of the batch drawn
    acc, share = run(truth)
    with torch.no_grad():
        own = [100.0 * float((ref.classify(to_model_range(t.test.images)).argmax(1) == t.test.labels).float().mean())
               for t in tasks]
    assert acc == pytest.approx(own, abs=1e-9) and share == pytest.approx([25.0] * 4)
    acc, _ = run(lambda x: (truth(x) + 1) % 4)
    assert max(acc) < 50 < min(own)
    acc, share = run(lambda x: torch.zeros(len(x), dtype=torch.int64))
    assert share == [100.0, 0.0, 0.0, 0.0] and all(math.isnan(a) for a in acc[1:])
    with pytest.raises(ValueError, match=r"label returned positions \[7\]"):
        run(lambda x: torch.full((len(x),), 7))


def test_the_reference_classifier_is_trained_once_and_cached(tmp_path):
    ref, info = reference_classifier("synthetic", epochs=1, cache_dir=tmp_path, quiet=True)
    files = list(tmp_path.glob("synthetic-*.pt"))
    assert len(files) == 1 and info["path"] == str(files[0]) and info["train_images"] == 960
    state = torch.load(files[0], weights_only=True)
    assert state["info"]["test_accuracy"] == info["test_accuracy"]
    again, info2 = reference_classifier("synthetic", epochs=1, cache_dir=tmp_path, quiet=True)
    assert info2 == info
    for (name, a), b in zip(ref.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # another recipe is another file, never the cached one
    reference_classifier("synthetic", epochs=2, cache_dir=tmp_path, quiet=True)
    assert len(list(tmp_path.glob("synthetic-*.pt"))) == 2
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        reference_classifier("synthetic", epochs=0, cache_dir=tmp_path)


@pytest.mark.parametrize("method", ["dgmw", "dgr"])
def test_dgm_eval_generated_on_a_trained_run(tmp_path, monkeypatch, capsys, method):
    monkeypatch.setenv("DGM_DATA_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN_ARGS, "--method", method, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--generated", "--n-per-class", "20"]) == 0
    out = capsys.readouterr().out
    assert "generated-sample accuracy" in out
    result = json.loads((run / "generated_accuracy.json").read_text())
    assert len(result["per_task"]) == 2 and 0 <= result["mean"] <= 100 and result["n_per_class"] == 20
    assert result["reference"]["path"].startswith(str(tmp_path / "cache"))
    if method == "dgr":  # unconditional: scored against the classifier's labels, with the share of each task
        assert "labelled by the run's continual classifier" in out
        assert sum(result["share_per_task"]) == pytest.approx(100.0)
    else:
        assert "share_per_task" not in result
    # the other commands read a run of either kind
    assert main(["info", str(run)]) == 0
    info = capsys.readouterr().out
    assert ("one unmasked generator" in info) == (method == "dgr") and ("reserved fraction" in info) == (method == "dgmw")
    assert main(["sample", str(run), "--task", "1", "--n", "3"]) == 0
    assert ("no row is a class" in capsys.readouterr().out) == (method == "dgr")
    assert (run / "samples" / "sample_task_01.png").stat().st_size > 0


def test_the_reference_classifier_of_a_registered_data_set(tmp_path, monkeypatch):
    """The path of the real data sets (read by dgm.data.load_dataset; here a small stand-in in MNIST's shape)."""
    import dgm.data
    from dgm.data import ImageSet

    g = torch.Generator().manual_seed(0)

    def fake_load(name, split="train", data_dir=None, **kw):
        assert name == "mnist"
        n = 20 if split == "train" else 5
        labels = torch.arange(10).repeat_interleave(n)
        return ImageSet(torch.randint(0, 256, (10 * n, 1, 32, 32), dtype=torch.uint8, generator=g), labels)

    monkeypatch.setattr(dgm.data, "load_dataset", fake_load)
    ref, info = reference_classifier("mnist", epochs=1, cache_dir=tmp_path, quiet=True)
    assert info["num_classes"] == 10 and info["train_images"] == 200 and 0 <= info["test_accuracy"] <= 100
    assert ref.classify(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
