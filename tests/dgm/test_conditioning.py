"""The AC-GAN term (``aux_critic_weight`` / ``aux_generator_weight``, on in the quick preset): what ties a task's
generated images to their label when a task holds several classes (the 5 x 2 split). SPEC's losses have no such
term; with one class per task the term is 0 and is skipped, so DGM's own protocol is unchanged bit for bit."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from dgm.checkpoint import new_generator
from dgm.data import synthetic_tasks, to_model_range
from dgm.presets import ConfigError, make_config
from dgm.steps import critic_step, generator_step, prepare_task
from dgm.train import train

TINY = dict(epochs=1, max_train_per_class=16, max_test_per_class=4, batch_size=8, threads=1, ngf=2, nz=16,
            critic_widths=[4, 4, 4], classifier_widths=[4, 4, 4], classifier_epochs=1, samples_per_class=1,
            backend="reference")


def _tasks(classes_per_task: int, num_tasks: int = 2):
    return synthetic_tasks(0, num_tasks=num_tasks, classes_per_task=classes_per_task, max_train_per_class=16,
                           max_test_per_class=4)


def _step(config, tasks, t: int = 0):
    torch.manual_seed(3)
    G = new_generator(config, 10, torch.device("cpu"))
    G.set_backend("reference")
    step, _, _ = prepare_task(config, t, tasks, G, None, None, G.mask_sizes(), "cpu")
    return step


def test_the_presets_weights_and_their_validation():
    quick, paper = make_config("mnist", "dgmw", "quick"), make_config("mnist", "dgmw", "paper")
    assert (quick.aux_critic_weight, quick.aux_generator_weight) == (1.0, 1.0)
    assert (paper.aux_critic_weight, paper.aux_generator_weight) == (0.0, 0.0)  # SPEC's recipe
    with pytest.raises(ConfigError, match=r"aux_critic_weight must be a finite number >= 0, got -1"):
        make_config("mnist", aux_critic_weight=-1)
    with pytest.raises(ConfigError, match=r"aux_generator_weight must be a finite number >= 0, got nan"):
        make_config("mnist", aux_generator_weight=float("nan"))
    with pytest.raises(ConfigError, match=r"aux_generator_weight > 0 needs aux_critic_weight > 0.*got "
                                          r"aux_critic_weight 0"):
        make_config("mnist", aux_critic_weight=0, aux_generator_weight=0.1)


def test_the_term_is_wired_only_for_tasks_of_several_classes():
    config = make_config("synthetic", "dgmw", "quick", **TINY)
    tasks = _tasks(2)
    step = _step(config, tasks)
    assert step.aux_positions.tolist() == list(tasks[0].positions) == [0, 1]
    assert step.D.classes == 2  # D's auxiliary head covers the classes seen so far
    assert step.aux_local[torch.tensor([1, 0, 1])].tolist() == [1, 0, 1]
    # the loss: cross-entropy among the task's classes against each image's class
    x = to_model_range(tasks[0].train.images[:6])
    pos = tasks[0].train.positions[:6]
    want = F.cross_entropy(step.D.classify(x)[:, [0, 1]], pos)
    torch.testing.assert_close(step.aux_loss(x, pos), want)
    # one class per task, or both weights 0: nothing is wired and D keeps no class outputs
    for cfg, tk in ((config, _tasks(1)), (make_config("synthetic", "dgmw", "quick", aux_critic_weight=0,
                                                      aux_generator_weight=0, **TINY), tasks)):
        step = _step(cfg, tk)
        assert step.aux_positions is None and step.aux_local is None and step.D.classes == 0


def test_a_later_task_maps_its_positions_among_all_seen_classes():
    config = make_config("synthetic", "dgmw", "quick", **TINY)
    tasks = _tasks(2)
    torch.manual_seed(3)
    G = new_generator(config, 10, torch.device("cpu"))
    G.set_backend("reference")
    G.add_task_modules("cpu")
    G.commit_and_expand()
    step, _, _ = prepare_task(config, 1, tasks, G, None, None, G.mask_sizes(), "cpu")
    assert step.aux_positions.tolist() == [2, 3] and step.D.classes == 4
    assert step.aux_local[torch.tensor([3, 2])].tolist() == [1, 0]


def test_critic_and_generator_steps_add_the_term_of_the_right_images():
    config = make_config("synthetic", "dgmw", "quick", **TINY)
    step = _step(config, _tasks(2))
    G, D = step.G, step.D
    real = to_model_range(_tasks(2)[0].train.images[:8])
    fake = torch.randn_like(real)
    seen = {}

    def aux(name):
        def f(x):
            seen[name] = x
            return torch.tensor(2.5)
        return f

    losses = []
    for term in (None, aux("critic")):
        d = copy.deepcopy(D)
        torch.manual_seed(0)
        losses.append(critic_step(d, torch.optim.Adam(d.parameters()), real, fake, 1.0, aux=term)[0])
    assert seen["critic"] is real
    assert losses[1] == pytest.approx(losses[0] + 2.5, abs=1e-5)
    z, labels = torch.randn(8, G.nz), torch.tensor([0, 1] * 4)
    advs = []
    for term in (None, aux("generator")):
        g = copy.deepcopy(G)
        opt = torch.optim.SGD(g.task_parameters(0), lr=0.0)
        advs.append(generator_step(g, D, opt, z, labels, None, 0.0, aux=term)[0])
    assert seen["generator"].shape == real.shape and seen["generator"].requires_grad  # G(z), differentiable
    assert advs[1] == pytest.approx(advs[0] + 2.5, abs=1e-5)


def test_the_generator_term_moves_the_generated_images_towards_their_label():
    """One generator step with the term lowers the auxiliary loss of the generated images more than the same step
    without it (a sign error, or a term on the wrong images, would not)."""
    config = make_config("synthetic", "dgmw", "quick", **TINY)
    step = _step(config, _tasks(2))
    z, labels = torch.randn(64, step.G.nz), torch.tensor([0, 1] * 32)
    after = []
    for weight in (0.0, 5.0):
        g = copy.deepcopy(step.G)
        opt = torch.optim.SGD([p for p in g.parameters() if p.requires_grad], lr=0.05)
        step.G = g  # aux_loss reads step.D only; G is the copy being stepped
        term = None if weight == 0 else (lambda x, w=weight: w * step.aux_loss(x, labels))
        g.eval()  # the same BatchNorm statistics before and after
        generator_step(g, step.D, opt, z, labels, None, 0.0, aux=term)
        with torch.no_grad():
            after.append(float(step.aux_loss(g(z, labels), labels)))
    assert after[1] < after[0] - 1e-4, after


def test_one_class_tasks_are_bit_identical_with_and_without_the_term(tmp_path):
    tasks = _tasks(1)
    results = []
    for name, weights in (("on", {}), ("off", dict(aux_critic_weight=0, aux_generator_weight=0))):
        config = make_config("synthetic", "dgmw", "quick", num_tasks=2, **TINY, **weights)
        train(config, tmp_path / name, tasks=tasks, hooks=None)
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
        results[-1]["state"] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
    on, off = results
    assert on["accuracy_matrix"] == off["accuracy_matrix"]
    for key, value in on["state"]["generator"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, off["state"]["generator"][key]), key


def test_two_class_tasks_train_with_the_term(tmp_path):
    tasks = _tasks(2)
    config = make_config("synthetic", "dgmw", "quick", num_tasks=2, **TINY)
    train(config, tmp_path / "run", tasks=tasks, hooks=None)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["complete"] and len(results["accuracy_matrix"]) == 2
