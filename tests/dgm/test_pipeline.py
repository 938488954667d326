"""The DGM pipeline: model shapes and widths, frozen old tasks, resume, backend agreement, config validation.

Everything runs on the CPU with the small synthetic data set of dgm.train (no download).
"""
from __future__ import annotations

import copy

import json
import math

import numpy as np
import pytest
import torch

import dgm_kernels as dk
from invariants import assert_old_task_unchanged, snapshot_old_task
from dgm import evaluate
from dgm.checkpoint import build_models, load_checkpoint
from dgm.data import synthetic_tasks
from dgm.models import Classifier, Discriminator, Generator
from dgm.plasticity import scale_at, sparsity_weight
from dgm.presets import ConfigError, RunConfig, make_config
from dgm.steps import critic_step, generator_step
from dgm.train import RunDirError, train, train_task

from helpers import backend_params


def tiny_config(method: str = "dgmw", **kw) -> RunConfig:
    base = dict(epochs=2, num_tasks=2, max_train_per_class=48, max_test_per_class=16, batch_size=16,
                classifier_epochs=1, classifier_batch_size=32, critic_widths=[4, 8, 8], classifier_widths=[4, 8, 8],
                samples_per_class=2, threads=1)
    base.update(kw)
    return make_config("synthetic", method, "quick", **base)


# ---------------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("method,widths", [("dgmw", (24, 12, 6)), ("dgma", (80, 40, 20))])
def test_generator_shapes_and_widths_per_task(method, widths):
    g = Generator(method, nc=3, n_classes=10, backend="reference")
    assert g.widths() == widths
    g.add_task_modules()
    z, y = torch.randn(5, 128), torch.tensor([0, 1, 2, 3, 9])
    assert g(z, y).shape == (5, 3, 32, 32)
    info = g.commit_and_expand()
    assert tuple(info["widths"]) == g.widths()
    assert all(n >= o for n, o in zip(g.widths(), widths)) and g.widths() != widths  # grew (every score was 0 -> kept)
    g.add_task_modules()
    assert g.task_widths(0) == widths
    assert g.heads[0].in_channels == widths[-1] and g.heads[1].in_channels == g.widths()[-1]
    assert g(z, y, task=0).shape == g(z, y).shape == (5, 3, 32, 32)
    assert g.task_parameter_count(1) > g.task_parameter_count(0)
    if method == "dgma":  # the DGMa rule: a layer gains exactly the units the task reserved
        assert [n - o for n, o in zip(g.widths(), widths)] == [info["new_reserved"][n] for n in ("conv1", "conv2", "conv3")]


def test_generator_label_overwrites_noise_and_bad_input():
    g = Generator("dgmw", n_classes=10, backend="reference")
    z = torch.randn(2, 128)
    h = g.make_input(z, torch.tensor([3, 7]))
    assert torch.equal(h[0, :10, 0, 0], torch.eye(10)[3]) and torch.equal(h[:, 10:, 0, 0], z[:, 10:])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        g.make_input(z, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="method must be one of"):
        Generator("dgmx")
    with pytest.raises(ValueError, match="gate_after_bn applies to method='dgma'"):
        Generator("dgmw", gate_after_bn=True)


def test_discriminator_and_classifier_heads_grow_keeping_old_rows():
    d = Discriminator(1, 2, (8, 8, 16))
    x = torch.randn(4, 1, 32, 32)
    assert d.critic(x).shape == (4,) and d.classify(x).shape == (4, 2)
    old = d.aux_head.linear.weight.detach().clone()
    d.grow_classes(5)
    assert d.classify(x).shape == (4, 5) and torch.equal(d.aux_head.linear.weight[:2], old)
    c = Classifier(3, 1, (4, 8, 8))
    assert c.classify(torch.randn(2, 3, 32, 32)).shape == (2, 1)


def test_schedules():
    S = 1e4
    assert scale_at("hat", S, 0, 3, 0, 10) == (1 / S, S)
    assert scale_at("task", S, 2, 3, 9, 10)[0] == pytest.approx((S - 1 / S) * 29 / 30 + 1 / S)
    s, top = scale_at("dgmw", S, 1, 4, 5, 10)
    assert top == pytest.approx((S - 1 / S) / 4 + 1 / S) and s == pytest.approx((top - 1 / top) * 0.5 + 1 / top)
    assert scale_at("dgma", S, 2, 4, 7, 10) == (pytest.approx((S - 1 / S) / 2 + 1 / S),) * 2
    assert sparsity_weight(0.08, 300, 100) == pytest.approx(0.24)
    with pytest.raises(ValueError, match="s schedule must be one of"):
        scale_at("cosine", S, 0, 1, 0, 1)


def test_metrics_by_hand():
    R = np.array([[100.0, np.nan, np.nan], [80.0, 90.0, np.nan], [60.0, 95.0, 70.0]])
    assert evaluate.average_accuracy(R) == pytest.approx([100.0, 85.0, 75.0])
    f = evaluate.forgetting(R)
    assert math.isnan(f[0]) and f[1] == pytest.approx(20.0) and f[2] == pytest.approx(((100 - 60) + (90 - 95)) / 2)
    b = evaluate.backward_transfer(R)
    assert b[1] == pytest.approx(-20.0) and b[2] == pytest.approx(((60 - 100) + (95 - 90)) / 2)


# ---------------------------------------------------------------------------------------------------------
# old tasks are frozen


@pytest.mark.parametrize("method", ["dgmw", "dgma"])
def test_old_task_generation_is_bit_identical_after_the_next_task(method):
    config = tiny_config(method=method, backend="cpu" if dk.backends.unavailable_reason("cpu") is None else "reference")
    tasks = synthetic_tasks(0, num_tasks=2, max_train_per_class=48, max_test_per_class=16)
    torch.manual_seed(0)
    G = Generator(method, n_classes=10, backend=config.backend)
    D, C = Discriminator(1, 0, config.critic_widths), None
    size = G.mask_sizes()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster on a busy 2-core machine
    with dk.use_backend(config.backend):
        D, C, _ = train_task(config, 0, tasks, G, D, C, size, "cpu", {})
        G.commit_and_expand()
        z, y = torch.randn(6, 128), torch.zeros(6, dtype=torch.int64)
        images0 = G(z, y, task=0)
        weights0 = snapshot_old_task(G)
        D, C, _ = train_task(config, 1, tasks, G, D, C, size, "cpu", {})
        G.commit_and_expand()
    torch.set_num_threads(threads)
    assert_old_task_unchanged(G, z, y, images0, weights0, method)


# ---------------------------------------------------------------------------------------------------------
# a run, killed and resumed


class _Kill(Exception):
    pass


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_resume_after_a_kill_mid_task_equals_the_uninterrupted_run(tmp_path):
    config = tiny_config(num_tasks=2, backend="reference")
    tasks = synthetic_tasks(0, num_tasks=2, max_train_per_class=48, max_test_per_class=16)
    full = train(config, tmp_path / "full", tasks=tasks)

    def kill(task, epoch, batch):
        if (task, epoch, batch) == (1, 1, 1):
            raise _Kill()

    with pytest.raises(_Kill):
        train(config, tmp_path / "killed", tasks=tasks, hooks={"iteration": kill})
    assert load_checkpoint(tmp_path / "killed")["tasks_done"] == 1
    with pytest.raises(RunDirError, match="already holds a run"):
        train(config, tmp_path / "killed", tasks=tasks)
    resumed = train(config, tmp_path / "killed", tasks=tasks, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert _tensors_equal(a["generator"]["state"], b["generator"]["state"])
    assert _tensors_equal(a["classifier"]["state"], b["classifier"]["state"])
    for la, lb in zip(a["generator"]["ledger"]["layers"], b["generator"]["ledger"]["layers"]):
        assert all(torch.equal(x, y) for x, y in zip(la["task_bits"], lb["task_bits"]))
    # a resumed run must agree on everything that decides the numbers
    with pytest.raises(RunDirError, match="configured differently"):
        train(tiny_config(num_tasks=2, backend="reference", seed=1), tmp_path / "killed", tasks=tasks, resume=True)


def test_checkpoint_round_trip_generates_the_same_images(tmp_path):
    config = tiny_config(method="dgma", backend="reference", num_tasks=2)
    tasks = synthetic_tasks(0, num_tasks=2, max_train_per_class=32, max_test_per_class=8)
    train(config, tmp_path / "run", tasks=tasks)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    g1, _, c1 = build_models(state, config)
    g2, _, _ = build_models(state, config)
    z, y = torch.randn(4, 128), torch.ones(4, dtype=torch.int64)
    g1.eval(), g2.eval()
    assert torch.equal(g1(z, y, task=1), g2(z, y, task=1))
    assert g1.ledger.num_tasks == 2 and c1.classes == 2


# ---------------------------------------------------------------------------------------------------------
# backends agree with the reference


def _steps(backend: str, steps: int = 20, method: str = "dgmw"):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster on a busy 2-core machine; restored below
    try:
        return _run_steps(backend, steps, method)
    finally:
        torch.set_num_threads(threads)


def _run_steps(backend, steps, method):
    """20 training steps with the reference backend. In each, ``backend`` computes the same things from the same
    state: the fake batch of the critic step, then (from a copy of the generator, the critic and the generator's
    optimizer) the generator step. Returns (losses [steps, 2, 3]: d, adversarial, R of reference and backend;
    per step, {name: (parameter after the step, gradient)} of reference and backend)."""
    G = Generator(method, ngf=4, n_classes=10, backend="reference")
    G.add_task_modules()
    D = Discriminator(1, 0, (4, 8, 8))
    opt_d = torch.optim.Adam(D.parameters(), lr=0.002, betas=(0.5, 0.999))
    opt_g = dk.optim.MaskedAdam(G.task_parameters(0), lr=0.002, betas=(0.5, 0.999), backend="reference")
    G.ledger.attach(opt_g)
    x_all = torch.rand(steps, 8, 1, 32, 32) * 2 - 1
    pos = torch.zeros(8, dtype=torch.int64)
    losses, params = [], []
    for i in range(steps):
        s, s_max = scale_at("hat", 400.0, 0, 1, i, steps)
        z1, z2 = torch.randn(8, 128), torch.randn(8, 128)
        G.set_schedule(s, s_max)
        G2 = copy.deepcopy(G)
        G2.set_backend(backend)
        with torch.no_grad(), dk.use_backend(backend):
            fake_other = G2(z1, pos)
        with torch.no_grad(), dk.use_backend("reference"):
            fake = G(z1, pos)
        torch.testing.assert_close(fake_other, fake, rtol=1e-5, atol=1e-6, msg=f"fake batch of step {i}")
        torch.manual_seed(1000 + i)
        d_loss, _, _ = critic_step(D, opt_d, x_all[i], fake, 1.0)
        # the generator step from the same state (the critic is plain PyTorch and needs no second run)
        D2 = copy.deepcopy(D)
        opt_g2 = dk.optim.MaskedAdam(G2.task_parameters(0), lr=0.002, betas=(0.5, 0.999), backend=backend)
        opt_g2.load_state_dict(copy.deepcopy(opt_g.state_dict()))  # load_state_dict alone would share the moments
        G2.ledger.attach(opt_g2)
        with dk.use_backend(backend):
            other = generator_step(G2, D2, opt_g2, z2, pos, None, 0.08)
        with dk.use_backend("reference"):
            ref = generator_step(G, D, opt_g, z2, pos, None, 0.08)
        losses.append([[d_loss, *ref], [d_loss, *other]])
        params.append(tuple({n: (p.detach().clone(), p.grad.clone()) for n, p in net.named_parameters()
                             if p.grad is not None} for net in (G, G2)))
    return torch.tensor(losses), params


PIPELINE_BACKENDS = [p for p in backend_params([("cpu", "cpu"), ("triton", "cpu")])]


@pytest.mark.parametrize("method", ["dgmw", "dgma"])
@pytest.mark.parametrize("backend,device", PIPELINE_BACKENDS)
def test_twenty_training_steps_match_the_reference_backend(backend, device, method):
    """20 training steps (critic step with gradient penalty, generator step with the regulariser, HAT compensation
    and the masked Adam); in each, ``backend`` computes the generator's part from the reference run's state with the
    same batch and noise: the fake batch, the generator step's losses, gradients and updated parameters.

    Tolerance: fake batch within 1e-5 relative (+1e-6); losses within 1e-4 relative (+1e-5); gradients within 1e-4
    relative (+1e-4 x the largest entry of that gradient); parameters after the step within 1e-5 absolute (an
    Adam step moves a parameter by up to lr = 2e-3). The kernels reorder float32 sums, so bit equality is not
    expected. Free-running trajectories are not compared: this GAN amplifies 1e-7 rounding differences about 2x
    per step, and the critic's conv biases before BatchNorm have gradients that are rounding noise, which Adam
    turns into full steps of lr.
    """
    if backend == "triton":
        pytest.skip("the Triton interpreter runs these convolutions too slowly for a fast test (needs a CUDA GPU)")
    losses, params = _steps(backend, method=method)
    torch.testing.assert_close(losses[:, 1], losses[:, 0], rtol=1e-4, atol=1e-5)
    for i, (ref, other) in enumerate(params):
        assert ref.keys() == other.keys()
        for name, (value, grad) in ref.items():
            torch.testing.assert_close(other[name][1], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()) + 1e-12,
                                       msg=f"gradient of {name} at step {i}")
            torch.testing.assert_close(other[name][0], value, rtol=0, atol=1e-5, msg=f"{name} after step {i}")
    assert not torch.equal(params[0][0]["conv1.weight"][0], params[-1][0]["conv1.weight"][0])  # it did train


# ---------------------------------------------------------------------------------------------------------
# configuration


def test_config_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset must be one of"):
        make_config("mnits")
    with pytest.raises(ConfigError, match="method must be one of"):
        make_config("mnist", "dgmz")
    with pytest.raises(ConfigError, match="preset must be one of"):
        make_config("mnist", "dgmw", "fast")
    with pytest.raises(ConfigError, match=r"epochs must be an int >= 0, got -1"):
        make_config(epochs=-1)
    with pytest.raises(ConfigError, match="backend must be one of"):
        make_config(backend="gpu")
    with pytest.raises(ConfigError, match="lr_g must be a finite number > 0"):
        make_config(lr_g=float("nan"))
    with pytest.raises(ConfigError, match="unknown config field"):
        make_config(learning_rate=1.0)
    with pytest.raises(ConfigError, match="select_on_val needs val_fraction > 0"):
        make_config(select_on_val=True)
    with pytest.raises(ConfigError, match="unknown config fields"):
        RunConfig.from_dict({"dataset": "mnist", "colour": "red"})
    (tmp_path / "config.json").write_text(json.dumps(make_config().to_dict()))
    with pytest.raises(RunDirError, match="already holds a run"):
        train(make_config("synthetic"), tmp_path)


def test_presets_carry_the_paper_values():
    p = make_config("mnist", "dgmw", "paper")
    assert (p.epochs, p.lr_g, p.s_max, p.lambda_sparsity, p.ngf, p.classifier, p.reinit_discriminator) == (
        101, 0.002, 1e4, 0.08, None, "shared", True)
    a = make_config("mnist", "dgma", "paper")
    assert (a.s_max, a.lambda_sparsity, a.s_schedule, a.gate_after_bn) == (1e5, 0.01, "dgma", False)
    s = make_config("svhn", "dgmw", "paper")
    assert (s.epochs, s.lr_g, s.lambda_sparsity) == (151, 0.0005, 0.001)
    q = make_config("mnist", "dgmw", "quick")
    assert q.classifier == "separate" and not q.reinit_classifier and q.classifier_shift == 2
    assert p.classifier_shift == 0 and a.classifier_shift == 0  # the paper trains on the images as they are


def test_classifier_without_batchnorm():
    from dgm.models import build_classifier

    plain = build_classifier("dcgan", 1, 3, [8, 16, 32], batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in build_classifier("dcgan", 1, 3, [8, 16, 32]).modules())
    with pytest.raises(ValueError, match="dcgan"):
        build_classifier("resnet", 3, 3, batchnorm=False)
    with pytest.raises(ConfigError, match="classifier_batchnorm=false needs classifier 'separate'"):
        make_config("mnist", preset="paper", classifier_batchnorm=False)


def test_random_shift_translates_each_image_within_range():
    from dgm.steps import random_shift

    x = torch.randn(32, 2, 6, 7)
    out = random_shift(x, 2, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.is_contiguous()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for b in range(x.shape[0]):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[b], padded[b, :, dy:dy + 6, dx:dx + 7])]
        assert found, f"image {b} is not a translation of its input by at most 2 pixels"
        offsets.add(found[0])
    assert len(offsets) >= 8  # each image draws its own offset
    again = random_shift(x, 2, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert random_shift(x, 0, torch.Generator()) is x


def test_classifier_shift_changes_the_classifier_only(tmp_path):
    tasks = synthetic_tasks(0, num_tasks=2, max_train_per_class=48, max_test_per_class=16)
    runs = {}
    for shift in (0, 2):
        config = tiny_config(num_tasks=2, backend="reference", classifier_shift=shift)
        assert config.classifier_schedule == "after"
        train(config, tmp_path / f"shift{shift}", tasks=tasks)
        runs[shift] = load_checkpoint(tmp_path / f"shift{shift}")
    # the classifier trains after the GAN, from the task's own random stream: the generator is untouched
    assert _tensors_equal(runs[0]["generator"]["state"], runs[2]["generator"]["state"])
    assert not _tensors_equal(runs[0]["classifier"]["state"], runs[2]["classifier"]["state"])
    for bad in (-1, 9):
        with pytest.raises(ConfigError, match=rf"classifier_shift must be an int .*got {bad}"):
            make_config("mnist", classifier_shift=bad)


def test_classifier_study_retrains_the_classifier_of_a_finished_run(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "classifier_study.py"
    spec = importlib.util.spec_from_file_location("classifier_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    config = tiny_config(num_tasks=2, backend="reference")
    train(config, tmp_path / "run")
    study.main([str(tmp_path / "run"), "--recipe", "baseline", "--recipe", "shift2", "--recipe", "distill"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["baseline", "shift2", "distill"]
    for line in lines:
        a_t = [float(v) for v in line.split("A_t ")[1].split("  last row")[0].split()]
        assert len(a_t) == 2 and all(0 <= a <= 100 for a in a_t)
    with pytest.raises(SystemExit):
        study.main([str(tmp_path / "run"), "--recipe", "nonsense"])
