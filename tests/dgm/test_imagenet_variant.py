"""The ImageNet-50 variant of DGM (SPEC section 2): residual generator, ResNet-18 critic, preset, runs.

There is no ImageNet data here: the runs use the synthetic data set of dgm.train with 3 channels, 2 classes per task
and tiny widths (CPU, a few seconds each).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import dgm_kernels as dk
from invariants import assert_old_task_unchanged, snapshot_old_task
from dgm.checkpoint import build_models, load_checkpoint
from dgm.models import (RESIDUAL_LAYER_NAMES, Discriminator, Generator, ResidualGenerator, ResNetClassifier,
                        ResNetDiscriminator, build_classifier, build_discriminator, build_generator, count_parameters)
from dgm.presets import PAPER_NOTES, ConfigError, RunConfig, make_config
from dgm.data import synthetic_tasks
from dgm.train import train, train_task

BACKEND = "cpu" if dk.backends.unavailable_reason("cpu") is None else "reference"
BLOCKS = [("up1_a", "up1_b"), ("up2_a", "up2_b"), ("up3_a", "up3_b")]
STREAM_LAYERS = ("stem", "up1_b", "up2_b", "up3_b")


def tiny_config(method: str = "dgmw", preset: str = "quick", **kw) -> RunConfig:
    base = dict(epochs=1, num_tasks=2, batch_size=8, critic_widths=[4, 4, 8, 8], classifier_widths=[4, 4, 8, 8],
                ngf=8, inner_width=4, classifier_epochs=1, classifier_batch_size=16, samples_per_class=2, threads=1,
                backend=BACKEND)
    base.update(kw)
    return make_config("imagenet50", method, preset, **base)


def tiny_tasks(train_per_class: int = 16):
    """Two tasks of two classes of 32x32x3 images (the stand-in for ImageNet-50's five tasks of ten classes)."""
    return synthetic_tasks(0, num_classes=4, classes_per_task=2, channels=3, train_per_class=train_per_class,
                           test_per_class=8)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# the networks


@pytest.mark.parametrize("method", ["dgmw", "dgma"])
def test_residual_generator_shapes_and_growth(method, one_thread):
    g = ResidualGenerator(method, ngf=8, inner_width=4, nc=3, n_classes=6, backend="reference")
    assert [n for n, _ in g.masked_layers()] == list(RESIDUAL_LAYER_NAMES) == g.ledger.names
    assert g.widths() == (4, 4, 4) and g.stem.weight.shape == (128, 8, 4, 4)  # linear 128 -> 4x4x8, bias-free
    g.add_task_modules()
    z, y = torch.randn(5, 128), torch.tensor([0, 1, 2, 3, 5])
    assert g(z, y).shape == (5, 3, 32, 32)
    assert [bn.num_features for bn in g.bns[0]] == [8, 4, 8, 4, 8, 4, 8]
    stream_shapes = {"stem": tuple(g.stem.weight.shape)}
    info = g.commit_and_expand()  # every score is 0: the task reserves everything
    for a, b in BLOCKS:
        if method == "dgmw":
            assert info["plan"][a] == math.ceil(max(info["new_reserved"][a], info["new_reserved"][b]) / (8 * 9))
        else:
            assert info["plan"][a] == info["new_reserved"][a] == 4
        assert getattr(g, a).out_channels == getattr(g, b).in_channels == 4 + info["plan"][a]
    assert all(info["plan"][n] == 0 for n in STREAM_LAYERS)
    assert tuple(g.stem.weight.shape) == stream_shapes["stem"]  # the stream keeps its width
    assert all(getattr(g, b).out_channels == 8 and getattr(g, a).in_channels == 8 for a, b in BLOCKS)
    assert g.widths() != (4, 4, 4) and tuple(info["widths"]) == g.widths()
    g.add_task_modules()
    assert g.task_widths(0) == (4, 4, 4) and g.task_widths(1) == g.widths()
    assert [bn.num_features for bn in g.bns[1]][1::2] == list(g.widths())
    assert g(z, y, task=0).shape == g(z, y).shape == (5, 3, 32, 32)
    assert g.task_parameter_count(1) > g.task_parameter_count(0)
    with torch.no_grad():  # the count matches the modules task 0 computes with
        assert g.task_parameter_count(0) == (128 * 8 * 16 + 3 * 2 * 8 * 4 * 9 + count_parameters(g.bns[0])
                                             + count_parameters(g.heads[0]))


def test_dgmw_expansion_keeps_the_blocks_free_capacity():
    g = ResidualGenerator("dgmw", ngf=8, inner_width=4, nc=3, n_classes=4, backend="reference")
    g.add_task_modules()
    reserve = {"up1_a": 100, "up1_b": 80, "up2_a": 0, "up2_b": 200, "up3_a": 0, "up3_b": 0, "stem": 7}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in g.masked_layers():
            layer.scores.fill_(-1.0)
            flat = layer.scores.view(-1)
            flat[torch.randperm(flat.numel(), generator=gen)[: reserve[name]]] = 1.0
    free_before = {n: l.scores.numel() for n, l in g.masked_layers()}
    info = g.commit_and_expand()
    assert info["new_reserved"] == reserve
    assert info["plan"] == {"stem": 0, "up1_a": 2, "up1_b": 0, "up2_a": 3, "up2_b": 0, "up3_a": 0, "up3_b": 0}
    assert g.widths() == (6, 7, 4)
    for a, b in BLOCKS:
        for n in (a, b):
            free_after = int((~g.ledger.reserved_mask(n)).sum())
            assert free_after >= free_before[n], f"{n}: free capacity shrank from {free_before[n]} to {free_after}"
    assert int((~g.ledger.reserved_mask("stem")).sum()) == free_before["stem"] - 7  # the stem does not grow


def test_resnet18_critic_has_the_2048_feature_and_two_heads(one_thread):
    d = ResNetDiscriminator(3, 2)
    assert d.trunk.features == 2048
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert d.critic(x).shape == (2,) and d.classify(x).shape == (2, 2)
    # 18 weighted layers: 1 stem conv + 8 blocks x 2 convs (shortcuts are 1x1 projections) + the classifier head
    convs = [m for m in d.trunk.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 17
    small = ResNetDiscriminator(3, 2, (4, 4, 8, 8))
    old = small.aux_head.linear.weight.detach().clone()
    small.grow_classes(5)
    assert small.classify(x).shape == (2, 5) and torch.equal(small.aux_head.linear.weight[:2], old)
    assert ResNetClassifier(3, 3, (4, 4, 8, 8)).classify(x).shape == (2, 3)
    with pytest.raises(ValueError, match="widths must be four positive ints"):
        ResNetDiscriminator(3, 0, (32, 64, 128))
    with pytest.raises(ValueError, match="takes 32x32 images"):
        small.critic(torch.randn(1, 3, 28, 28))


def test_builders_pick_the_architecture_and_reject_bad_arguments():
    assert type(build_generator("dcgan", "dgmw", nc=1, n_classes=10)) is Generator
    assert type(build_generator("resnet", "dgma", nc=3, n_classes=50, ngf=8)) is ResidualGenerator
    assert type(build_discriminator("dcgan", 1)) is Discriminator
    assert type(build_discriminator("resnet", 3, 0, [4, 4, 8, 8])) is ResNetDiscriminator
    assert type(build_classifier("resnet", 3, 0, [4, 4, 8, 8])) is ResNetClassifier
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_generator("vit", "dgmw", nc=3, n_classes=10)
    with pytest.raises(ValueError, match="inner_width applies to the 'resnet' generator only"):
        build_generator("dcgan", "dgmw", nc=1, n_classes=10, inner_width=4)
    with pytest.raises(ValueError, match="inner_width must be a positive int"):
        ResidualGenerator("dgmw", inner_width=0)
    with pytest.raises(ValueError, match="gate_after_bn applies to method='dgma'"):
        ResidualGenerator("dgmw", gate_after_bn=True)
    g = ResidualGenerator("dgmw", ngf=8, inner_width=4, n_classes=4, backend="reference")
    with pytest.raises(ValueError, match="cannot shrink"):
        g.grow_to((3, 4, 4))


# ---------------------------------------------------------------------------------------------------------
# old tasks are frozen


@pytest.mark.parametrize("method", ["dgmw", "dgma"])
def test_old_task_generation_is_bit_identical_after_the_next_task(method, one_thread):
    config = tiny_config(method, epochs=2)
    assert config.architecture == "resnet"
    tasks = tiny_tasks()
    torch.manual_seed(0)
    G = ResidualGenerator(method, ngf=8, inner_width=4, nc=3, n_classes=4, backend=BACKEND)
    D, C = ResNetDiscriminator(3, 0, config.critic_widths), None
    size = G.mask_sizes()
    with dk.use_backend(BACKEND):
        D, C, _ = train_task(config, 0, tasks, G, D, C, size, "cpu", {})
        G.commit_and_expand()
        z, y = torch.randn(6, 128), torch.tensor([0, 1, 0, 1, 0, 1])
        images0 = G(z, y, task=0)
        weights0 = snapshot_old_task(G)
        D, C, _ = train_task(config, 1, tasks, G, D, C, size, "cpu", {})
        G.commit_and_expand()
    assert_old_task_unchanged(G, z, y, images0, weights0, method)


# ---------------------------------------------------------------------------------------------------------
# runs


@pytest.mark.parametrize("method,preset", [("dgmw", "quick"), ("dgma", "paper")])
def test_two_task_run_end_to_end(method, preset, tmp_path, one_thread):
    config = tiny_config(method, preset)
    results = train(config, tmp_path / "run", tasks=tiny_tasks())
    assert results["complete"] and results["tasks_done"] == 2
    assert len(results["accuracy_matrix"]) == 2 and results["accuracy_matrix"][0][1] is None
    assert all(0.0 <= v <= 100.0 for v in results["accuracy_matrix"][1])
    assert list(results["A_named"]) == ["A2", "A4"]  # two classes per task
    assert results["config"]["architecture"] == "resnet" and results["config"]["dataset"] == "imagenet50"
    widths = results["generator"]["widths_per_task"]
    assert widths[0] == [4, 4, 4] and all(w1 >= w0 for w1, w0 in zip(widths[1], widths[0]))
    for png in ("samples/task_00.png", "samples/task_01.png", "accuracy.png"):
        assert (tmp_path / "run" / png).stat().st_size > 0, png
    state = load_checkpoint(tmp_path / "run")
    assert state["tasks_done"] == 2
    saved = RunConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    g, d, c = build_models(state, saved, "cpu")
    assert type(g) is ResidualGenerator and type(d) is ResNetDiscriminator
    assert (c is None) == (preset == "paper") and (c is None or type(c) is ResNetClassifier)
    assert g.ledger.num_tasks == 2 and g.task_widths(0) == (4, 4, 4)
    # the restored generator is the trained one: same images for the same noise
    z, y = torch.randn(3, 128), torch.tensor([2, 3, 2])
    g.eval()
    first = g(z, y, task=1)
    g2, _, _ = build_models(state, saved, "cpu")
    g2.eval()
    assert torch.equal(g2(z, y, task=1), first)


class _Kill(Exception):
    pass


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, one_thread):
    config = tiny_config("dgmw", epochs=2, backend="reference")
    tasks = tiny_tasks(train_per_class=8)
    full = train(config, tmp_path / "full", tasks=tasks)

    def kill(task, epoch, batch):
        if (task, epoch) == (1, 1):
            raise _Kill()

    with pytest.raises(_Kill):
        train(config, tmp_path / "killed", tasks=tasks, hooks={"iteration": kill})
    resumed = train(config, tmp_path / "killed", tasks=tasks, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "killed")
    assert a["generator"]["state"].keys() == b["generator"]["state"].keys()
    assert all(torch.equal(a["generator"]["state"][k], b["generator"]["state"][k])
               for k in a["generator"]["state"] if isinstance(a["generator"]["state"][k], torch.Tensor))


# ---------------------------------------------------------------------------------------------------------
# configuration


def test_paper_preset_for_imagenet50_carries_the_spec_values():
    w = make_config("imagenet50", "dgmw", "paper")
    assert (w.architecture, w.epochs, w.lr_g, w.lr_d, w.lr_c, w.lambda_gp, w.lambda_sparsity, w.s_max) == (
        "resnet", 101, 0.0002, 0.0002, 0.0002, 0.6, 0.001, 1e4)
    assert w.critic_widths == [64, 128, 256, 512] and w.classifier == "shared" and w.nz == 128
    assert (w.batch_size, w.betas, w.mask_mode, w.hat_compensation) == (64, [0.5, 0.999], "anneal", True)
    assert not w.reinit_discriminator  # SPEC re-initialises D on MNIST/SVHN only
    g = build_generator(w.architecture, w.method, nz=w.nz, ngf=w.ngf, inner_width=w.inner_width, nc=3, n_classes=50)
    assert g.stem.weight.shape == (128, 64, 4, 4) and g.widths() == (64, 64, 64)  # linear 128 -> 4x4x64
    assert build_discriminator(w.architecture, 3, 0, w.critic_widths).trunk.features == 2048
    a = make_config("imagenet50", "dgma", "paper")
    assert (a.architecture, a.epochs, a.lr_g, a.lambda_gp, a.s_max, a.s_schedule, a.gate_after_bn) == (
        "resnet", 101, 0.0002, 0.6, 1e5, "dgma", False)
    assert "imagenet50" in PAPER_NOTES and "imagenet50/dgma" in PAPER_NOTES
    q = make_config("imagenet50", "dgmw", "quick")
    assert q.architecture == "resnet" and len(q.critic_widths) == len(q.classifier_widths) == 4
    # the other data sets keep the DCGAN networks
    assert make_config("mnist", "dgmw", "paper").architecture == "dcgan"
    assert make_config("svhn", "dgmw", "paper").critic_widths == [32, 64, 128]


def test_config_errors_of_the_architecture():
    with pytest.raises(ConfigError, match="architecture must be one of"):
        make_config("imagenet50", architecture="vit")
    with pytest.raises(ConfigError, match="critic_widths must be four positive ints"):
        make_config("imagenet50", critic_widths=[16, 32, 64])
    with pytest.raises(ConfigError, match="classifier_widths must be three positive ints"):
        make_config("mnist", classifier_widths=[16, 32, 64, 128])
    with pytest.raises(ConfigError, match="inner_width applies to architecture 'resnet' only"):
        make_config("mnist", inner_width=8)
    # the residual networks run on other data sets too, when asked for
    c = make_config("cifar10", "dgmw", "quick", architecture="resnet", critic_widths=[8, 8, 16, 16],
                    classifier_widths=[8, 8, 16, 16])
    assert c.architecture == "resnet"
    # a config saved before the field existed loads as the data set's default
    old = make_config("mnist").to_dict()
    del old["architecture"], old["inner_width"]
    assert RunConfig.from_dict(old).architecture == "dcgan"
