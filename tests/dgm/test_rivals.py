"""The generative-replay rivals (dgm.rivals): DGR, MeRGAN-JTR and MeRGAN-RA trained by DGM's loop."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dgm.data import synthetic_tasks
from dgm.models import PlainGenerator, build_generator
from dgm.presets import ConfigError, make_config
from dgm.rivals import alignment_loss, label_replay, prepare_rival_task
from dgm.train import train

TINY = dict(epochs=1, max_train_per_class=16, max_test_per_class=4, batch_size=8, threads=1, ngf=2, nz=16,
            critic_widths=[4, 4, 4], classifier_widths=[4, 4, 4], classifier_epochs=1, samples_per_class=1,
            backend="reference", num_tasks=3)


def _tasks():
    return synthetic_tasks(0, num_tasks=3, max_train_per_class=16, max_test_per_class=4)


@pytest.mark.parametrize("method", ["dgr", "mergan-jtr", "mergan-ra"])
def test_each_rival_trains_resumes_and_writes_the_results_contract(method, tmp_path):
    config = make_config("synthetic", method, "quick", **TINY)
    whole = train(config, tmp_path / "whole", tasks=_tasks())
    assert whole["complete"] and len(whole["average_accuracy"]) == 3
    assert whole["generator"]["mask_bookkeeping_bytes"] == 0
    # killed after task 1, resumed: the same accuracy matrix as the uninterrupted run
    def stop(t, ep, i):
        if t == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "cut", tasks=_tasks(), hooks={"iteration": stop})
    resumed = train(config, tmp_path / "cut", tasks=_tasks(), resume=True)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert saved["config"]["method"] == method


def test_the_previous_generator_reaches_the_critic_and_the_classifier():
    tasks = _tasks()
    config = make_config("synthetic", "mergan-jtr", "quick", **TINY)
    torch.manual_seed(0)
    G = build_generator("dcgan", "mergan-jtr", nz=16, ngf=2, nc=tasks[0].train.images.shape[1], n_classes=3)
    step, D, C = prepare_rival_task(config, 0, tasks, G, None, None, "cpu")
    assert step.previous is None and step.replay_x is None
    G.commit_and_expand()
    step, D, C = prepare_rival_task(config, 1, tasks, G, D, C, "cpu")
    assert step.previous is not G and all(not p.requires_grad for p in step.previous.parameters())
    assert step.replay_y.tolist() == [0] * step.per_class  # the old class, as conditioned
    assert step.aux_positions.tolist() == [0, 1]  # MeRGAN's head tells every seen class apart
    # one JTR iteration changes the critic through the replay term: without the previous generator it differs
    x = tasks[1].train.images[:8].float() / 127.5 - 1
    pos, idx = tasks[1].train.positions[:8], torch.arange(8)
    alone = copy.deepcopy(step)
    alone.previous = None
    torch.manual_seed(1)
    with_replay = step.iteration(x, pos, idx, 1.0, None)
    torch.manual_seed(1)
    without = alone.iteration(x, pos, idx, 1.0, None)
    assert with_replay["d"] != without["d"]


def _step_at(method, t, tasks):
    """A rival's step at task ``t`` (the earlier tasks only prepared, not trained: the previous generator exists)."""
    config = make_config("synthetic", method, "quick", **TINY)
    torch.manual_seed(0)
    G = build_generator("dcgan", method, nz=16, ngf=2, nc=tasks[0].train.images.shape[1], n_classes=3)
    D = C = None
    for j in range(t + 1):
        if j:
            G.commit_and_expand()
        step, D, C = prepare_rival_task(config, j, tasks, G, D, C, "cpu")
    return step


def test_dgr_critic_batch_stays_constant_and_weighs_each_class_alike(monkeypatch):
    import dgm.rivals
    tasks = _tasks()
    step = _step_at("dgr", 2, tasks)  # two old classes, one new
    seen = []
    real_critic_step = dgm.rivals.critic_step
    def spy(D, opt, real, fake, lambda_gp, aux=None, real_weights=None):
        seen.append((real.shape[0], fake.shape[0], real_weights))
        return real_critic_step(D, opt, real, fake, lambda_gp, aux=aux, real_weights=real_weights)
    monkeypatch.setattr(dgm.rivals, "critic_step", spy)
    x = tasks[2].train.images[:8].float() / 127.5 - 1
    step.iteration(x, tasks[2].train.positions[:8], torch.arange(8), 1.0, None)
    (n_real, n_fake, w), = seen
    assert (n_real, n_fake) == (16, 16)  # 8 real + 8 replayed rows, not 8 per old class
    assert torch.allclose(w.sum(), torch.tensor(1.0))
    assert torch.allclose(w[:8].sum(), torch.tensor(1 / 3)) and torch.allclose(w[8:].sum(), torch.tensor(2 / 3))


def test_critic_step_real_weights_replace_the_uniform_mean():
    from dgm.steps import critic_step
    step = _step_at("dgr", 0, _tasks())
    torch.manual_seed(3)
    real, fake = torch.rand(6, 1, 32, 32) * 2 - 1, torch.rand(6, 1, 32, 32) * 2 - 1

    def run(x, weights):
        D = copy.deepcopy(step.D).eval()  # running BatchNorm statistics: each row's score is its own
        torch.manual_seed(4)  # the same interpolation draws
        return critic_step(D, torch.optim.SGD(D.parameters(), lr=0.0), x, fake, 10.0, real_weights=weights)
    uniform = run(real, None)
    assert run(real, torch.full((6,), 1 / 6)) == pytest.approx(uniform, rel=1e-5)
    # rows of weight 0 do not count: changing them changes nothing, and the losses differ from the uniform mean
    half = torch.tensor([1 / 3] * 3 + [0.0] * 3)
    other = real.clone()
    other[3:] = -other[3:]
    assert run(real, half) == pytest.approx(run(other, half), rel=1e-6)
    assert run(real, half)[2] != pytest.approx(uniform[2], rel=1e-3)
    with pytest.raises(ValueError, match=r"real_weights must have shape \(6,\)"):
        run(real, torch.full((5,), 0.2))


def test_alignment_is_zero_for_the_same_generator_and_positive_otherwise():
    torch.manual_seed(0)
    G = PlainGenerator(nz=16, ngf=2, n_classes=3).eval()
    prev = copy.deepcopy(G)
    z, y = torch.randn(6, 16), torch.tensor([0, 1, 0, 1, 0, 1])
    assert float(alignment_loss(G, prev, z, y, 2).detach()) == 0.0
    with torch.no_grad():
        G.conv1.weight.add_(0.1)
    loss = alignment_loss(G, prev, z, y, 2)
    assert float(loss.detach()) > 0
    loss.backward()
    assert G.conv1.weight.grad is not None and prev.conv1.weight.grad is None


def test_dgr_labels_its_replay_with_the_previous_classifier():
    class Stub(torch.nn.Module):
        def classify(self, x):  # class 2 for bright images, class 0 otherwise; class 1 never among the old ones
            m = x.flatten(1).mean(1)
            return torch.stack([-m, torch.full_like(m, 100.0), m], 1)
    x = torch.cat([torch.full((2, 1, 4, 4), 1.0), torch.full((2, 1, 4, 4), -1.0)])
    assert label_replay(Stub(), x, torch.tensor([0, 2])).tolist() == [2, 2, 0, 0]


def test_unconditional_generator_ignores_labels_and_conditional_does_not():
    torch.manual_seed(0)
    z = torch.randn(4, 16)
    dgr = PlainGenerator(nz=16, ngf=2, n_classes=3, conditional=False).eval()
    assert torch.equal(dgr(z, torch.tensor([0, 0, 0, 0])), dgr(z, torch.tensor([2, 2, 2, 2])))
    mergan = PlainGenerator(nz=16, ngf=2, n_classes=3).eval()
    assert not torch.equal(mergan(z, torch.tensor([0, 0, 0, 0])), mergan(z, torch.tensor([2, 2, 2, 2])))


def test_the_rivals_configuration_is_checked():
    paper = make_config("mnist", "mergan-ra", "paper")
    assert (paper.lambda_gp, paper.critic_iterations, paper.lr_g, paper.betas, paper.lambda_ra) == (
        10.0, 5, 1e-4, [0.0, 0.9], 1e-3)
    assert make_config("mnist", "dgr", "quick").aux_critic_weight == 0
    with pytest.raises(ConfigError, match="lambda_ra must be > 0 for method 'mergan-ra'"):
        make_config("mnist", "mergan-ra", lambda_ra=0)
    with pytest.raises(ConfigError, match="lambda_ra must be > 0 for method 'mergan-ra' and 0 for the others"):
        make_config("mnist", "mergan-jtr", lambda_ra=0.1)
    with pytest.raises(ConfigError, match="'dgr' has an unconditional generator"):
        make_config("mnist", "dgr", aux_critic_weight=1.0)
    with pytest.raises(ConfigError, match="critic_iterations applies to the rivals"):
        make_config("mnist", "dgmw", critic_iterations=5)
    with pytest.raises(ConfigError, match="compile is not supported for method 'dgr'"):
        make_config("mnist", "dgr", compile=True)
