"""examples/piggyback_split_mnist.py on tiny synthetic tasks: the backbone never changes after the first task, each
later task learns a binary mask over it (stored as bits) and its head, old tasks stay bit-identical."""
from __future__ import annotations

import math

import torch

IN, HIDDEN, TASKS, N = 12, 32, 3, 256


def _tasks():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(TASKS):
        x = torch.randn(N, IN, generator=g)
        out.append((x, (x @ torch.randn(IN, generator=g) > 0).long()))
    return out


def test_piggyback_learns_masks_over_a_frozen_backbone(load_example):
    piggyback = load_example("piggyback_split_mnist")
    torch.manual_seed(0)
    cfg = piggyback.Config(hidden=HIDDEN, backbone_epochs=3, epochs=3, batch_size=32, lr=1e-2, mask_lr=1e-2)
    model = piggyback.PiggybackMLP(IN, HIDDEN, TASKS, 2, backend=cfg.backend)
    method = piggyback.Piggyback(model, cfg)
    g = torch.Generator().manual_seed(1)
    x_test = torch.randn(64, IN)
    outputs = []
    for t, (x, y) in enumerate(_tasks()):
        losses = method.train_task(t, x, y, g)
        outputs.append(method.predict(x_test, t))
        if t == 0:
            backbone = {n: (layer.weight.detach().clone(), layer.bias.detach().clone()) for n, layer in model.masked()}
            assert all(f == 1.0 for f in method.used_fraction(0).values()), "the backbone task uses every weight"
            continue
        head = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
        assert head[1] < head[0], f"task {t} learned: mean loss {head[0]:.3f} -> {head[1]:.3f}"
        used = method.used_fraction(t)
        assert all(0.2 < f < 1.0 for f in used.values()), f"task {t} switched some weights off: {used}"
    for t in range(TASKS):
        assert torch.equal(method.predict(x_test, t), outputs[t]), f"task {t}'s outputs changed"
    for name, layer in model.masked():
        assert torch.equal(layer.weight, backbone[name][0]) and torch.equal(layer.bias, backbone[name][1])
    # the masks of tasks 1 and 2 differ, and each is kept as one bit per weight
    masks = [method.ledger.task_view("fc2", t).mask for t in (1, 2)]
    assert not torch.equal(*masks)
    state = method.ledger.state_dict()["layers"]
    for layer_state, (_, layer) in zip(state, model.masked()):
        for bits in layer_state["task_bits"]:
            assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(layer.weight.numel() / 8)


def test_the_script_runs_on_the_synthetic_set(load_example):
    piggyback = load_example("piggyback_split_mnist")
    summary = piggyback.main(["--synthetic", "--epochs", "1", "--hidden", "16", "--max-train-per-class", "32"])
    assert len(summary["accuracy_after_last"]) == 5
    assert summary["backbone_unchanged"] is True and summary["task0_logit_drift"] == 0.0
