"""examples/packnet_split_mnist.py on tiny synthetic tasks: the masks PackNet must produce (each task keeps a fraction
of the weights that were free and reuses every earlier task's), old tasks bit-identical, the script's run."""
from __future__ import annotations

import torch

IN, HIDDEN, TASKS, N = 12, 16, 3, 256


def _tasks():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(TASKS):
        x = torch.randn(N, IN, generator=g)
        out.append((x, (x @ torch.randn(IN, generator=g) > 0).long()))
    return out


def test_packnet_masks_and_old_tasks(load_example):
    packnet = load_example("packnet_split_mnist")
    torch.manual_seed(0)
    cfg = packnet.Config(hidden=HIDDEN, epochs=2, retrain_epochs=1, keep=0.5, batch_size=32, lr=1e-2)
    model = packnet.PackNetMLP(IN, HIDDEN, TASKS, 2, backend=cfg.backend)
    method = packnet.PackNet(model, cfg)
    g = torch.Generator().manual_seed(1)
    x_test = torch.randn(64, IN)
    outputs, weights, reserved_before, at_pruning = [], [], [], []
    prune = method.prune

    def recording_prune():  # the magnitudes the pruning saw (retraining moves the kept weights afterwards)
        at_pruning.append({n: layer.weight.detach().abs().clone() for n, layer in model.masked()})
        return prune()

    method.prune = recording_prune
    for t, (x, y) in enumerate(_tasks()):
        reserved_before.append({n: method.ledger.reserved_mask(n).clone() for n, _ in model.masked()})
        info = method.train_task(t, x, y, g)
        outputs.append(method.predict(x_test, t))
        weights.append({n: layer.weight.detach().clone() for n, layer in model.masked()})
        assert info["losses"][-1] < info["losses"][0], "the task learned"
        acc = (method.predict(x, t).argmax(1) == y).float().mean()
        assert acc > 0.7, f"task {t}: training accuracy {acc:.2f}"
    for t in range(TASKS):
        # bit-identical after every later task
        assert torch.equal(method.predict(x_test, t), outputs[t]), f"task {t}'s outputs changed"
        for name, _ in model.masked():
            mask = method.ledger.task_view(name, t).mask
            before = reserved_before[t][name]
            # the task computes with every earlier task's weights ...
            assert torch.equal(mask & before, before)
            # ... and keeps `keep` of those that were free, the largest by magnitude when it pruned
            new = mask & ~before
            assert new.sum() == round(cfg.keep * (~before).sum().item())
            w = at_pruning[t][name]
            pruned = ~mask & ~before
            assert w[new].min() >= w[pruned].max()
            # the weights the task owns never change again
            assert torch.equal(weights[-1][name][mask], weights[t][name][mask])
    free = method.free_fraction()
    assert all(abs(f - 0.5 ** TASKS) < 0.01 for f in free.values()), free


def test_the_script_runs_on_the_synthetic_set(load_example):
    packnet = load_example("packnet_split_mnist")
    summary = packnet.main(["--synthetic", "--epochs", "1", "--hidden", "16", "--max-train-per-class", "32"])
    assert len(summary["accuracy_after_last"]) == 5
    assert summary["task0_logit_drift"] == 0.0
    assert abs(summary["free_after_last"]["fc1"] - 0.5 ** 5) < 0.01
