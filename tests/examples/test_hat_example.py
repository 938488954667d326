"""examples/hat_split_mnist.py against a plain-PyTorch HAT written here from the paper (Serra et al. 2018) and its
published training loop: same weights, embeddings, inputs and batch order, two tasks of 40 steps each.

With ``hat_numerics=True`` the port must agree with it to float rounding (the sums of the regulariser, the clip's
norm and the schedule's s are ordered differently: relative 1e-4 after 80 steps); with the library's defaults,
an old task's outputs must stay bit-identical while later tasks train.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

IN, HIDDEN, TASKS, CLASSES, N = 20, 16, 2, 2, 320


class PlainHatNet(nn.Module):
    """HAT's MLP: fc layers, one embedding per task and layer, a head per task."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.efc1, self.efc2 = nn.Embedding(TASKS, HIDDEN), nn.Embedding(TASKS, HIDDEN)
        self.last = nn.ModuleList(nn.Linear(HIDDEN, CLASSES) for _ in range(TASKS))

    def mask(self, t, s):
        t = torch.tensor([t])
        return [torch.sigmoid(s * self.efc1(t)), torch.sigmoid(s * self.efc2(t))]

    def forward(self, t, x, s):
        g1, g2 = self.mask(t, s)
        h = F.relu(self.fc1(x)) * g1
        h = F.relu(self.fc2(h)) * g2
        return self.last[t](h), [g1, g2]


def plain_hat_task(net, t, x, y, gen, cfg, mask_pre):
    """One task of HAT's training loop; returns the losses and the new cumulative masks."""
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    mask_back = {}
    if mask_pre is not None:
        post1, post2 = mask_pre[0].view(-1, 1), mask_pre[1].view(-1, 1)
        mask_back = {
            net.fc1.weight: 1 - post1.expand_as(net.fc1.weight),
            net.fc1.bias: 1 - mask_pre[0].view(-1),
            net.fc2.weight: 1 - torch.min(post2.expand_as(net.fc2.weight),
                                          mask_pre[0].view(1, -1).expand_as(net.fc2.weight)),
            net.fc2.bias: 1 - mask_pre[1].view(-1),
        }
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(N, generator=gen)
        for start in range(0, N, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            s = (cfg.s_max - 1 / cfg.s_max) * start / N + 1 / cfg.s_max
            out, masks = net(t, x[idx], s)
            reg, count = 0, 0
            if mask_pre is None:
                for m in masks:
                    reg, count = reg + m.sum(), count + m.numel()
            else:
                for m, mp in zip(masks, mask_pre):
                    reg, count = reg + (m * (1 - mp)).sum(), count + (1 - mp).sum()
            loss = F.cross_entropy(out, y[idx]) + cfg.lamb * reg / count
            opt.zero_grad()
            loss.backward()
            for p, factor in mask_back.items():
                p.grad *= factor
            for e in (net.efc1, net.efc2):  # the compensation of the embeddings' gradient
                num = torch.cosh(torch.clamp(s * e.weight.detach(), -50, 50)) + 1
                den = torch.cosh(e.weight.detach()) + 1
                e.weight.grad *= cfg.s_max / s * num / den
            nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
            opt.step()
            with torch.no_grad():
                for e in (net.efc1, net.efc2):
                    e.weight.clamp_(-6, 6)
            losses.append(loss.item())
    with torch.no_grad():
        masks = [m.view(-1) for m in net.mask(t, cfg.s_max)]
    mask_pre = masks if mask_pre is None else [torch.max(a, b) for a, b in zip(mask_pre, masks)]
    return losses, mask_pre


def _data():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(TASKS):
        x = torch.randn(N, IN, generator=g)
        teacher = torch.randn(IN, generator=g)
        tasks.append((x, (x @ teacher > 0).long()))
    return tasks


def _port(hat, hat_numerics):
    cfg = hat.Config(hidden=HIDDEN, epochs=2, batch_size=16, drop_in=0.0, drop_hidden=0.0, hat_numerics=hat_numerics)
    model = hat.HatMLP(IN, HIDDEN, TASKS, CLASSES, drop_in=0.0, drop_hidden=0.0, backend=cfg.backend)
    return cfg, model, hat.HAT(model, cfg)


def _copy_weights(net, model):
    with torch.no_grad():
        for a, b in ((model.fc1, net.fc1), (model.fc2, net.fc2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        for head, last in zip(model.heads, net.last):
            head.load_state_dict(last.state_dict())


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@functools.lru_cache(maxsize=1)
def _plain_run():
    """HAT's run (cached: two tests compare with it): the net, its initial state, the cumulative masks, the losses."""
    torch.manual_seed(0)
    net = PlainHatNet()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    g, mask_pre, losses = torch.Generator().manual_seed(7), None, []
    for t, (x, y) in enumerate(_data()):
        task_losses, mask_pre = plain_hat_task(net, t, x, y, g, CFG, mask_pre)
        losses.append(task_losses)
    return net, initial, mask_pre, losses


class CFG:  # the run's settings, shared by the plain HAT and the port
    lr, lamb, s_max, clip_grad, epochs, batch_size = 0.05, 0.75, 400.0, 10000.0, 2, 16


def _port_run(hat, derivative="hat"):
    """The port with HAT's numerics (``derivative``: which mask derivative its layers use), from the plain net's
    initial weights and embeddings, on the same batches."""
    net, initial, _, _ = _plain_run()
    start = PlainHatNet()
    start.load_state_dict(initial)
    cfg, model, method = _port(hat, hat_numerics=True)
    assert (cfg.lr, cfg.lamb, cfg.s_max, cfg.clip_grad, cfg.epochs, cfg.batch_size) == (
        CFG.lr, CFG.lamb, CFG.s_max, CFG.clip_grad, CFG.epochs, CFG.batch_size)
    _copy_weights(start, model)
    for _, layer in model.gated():
        layer.derivative = derivative
    g, losses = torch.Generator().manual_seed(7), []
    for t, (x, y) in enumerate(_data()):
        scores = {"fc1": start.efc1.weight[t].detach().clone(), "fc2": start.efc2.weight[t].detach().clone()}
        losses.append(method.train_task(t, x, y, g, scores=scores))
    return model, method, losses


def test_hat_numerics_agree_with_plain_hat(load_example):
    hat = load_example("hat_split_mnist")
    net, _, mask_pre, plain_losses = _plain_run()
    model, method, port_losses = _port_run(hat)
    for t in range(TASKS):
        assert len(plain_losses[t]) == len(port_losses[t]) == 40
        _close(torch.tensor(port_losses[t]), torch.tensor(plain_losses[t]), f"losses of task {t}")
    for a, b, what in ((model.fc1.weight, net.fc1.weight, "fc1.weight"), (model.fc1.bias, net.fc1.bias, "fc1.bias"),
                       (model.fc2.weight, net.fc2.weight, "fc2.weight"), (model.fc2.bias, net.fc2.bias, "fc2.bias"),
                       (model.heads[1].weight, net.last[1].weight, "head 1")):
        _close(a.detach(), b.detach(), what)
    for t in range(TASKS):
        _close(method.saved_scores[t]["fc1"], net.efc1.weight[t].detach(), f"embedding fc1 of task {t}")
        _close(method.saved_scores[t]["fc2"], net.efc2.weight[t].detach(), f"embedding fc2 of task {t}")
    for a, b in zip(method.cumulative, mask_pre):
        _close(a, b, "soft cumulative mask")
    # the second task was protected softly: some units of task 0 are reserved, and some are not
    assert (mask_pre[0] == 1).any() and (mask_pre[0] < 1).any()
    x0 = _data()[0][0][:8]
    with torch.no_grad():
        plain_out = net(0, x0, 400.0)[0]
    _close(method.predict(x0, 0), plain_out, "task 0's test-time outputs")


def test_the_stable_derivative_is_not_hats_here(load_example):
    """The agreement above needs HAT's derivative: with the library's stable one, the same run drifts apart (the
    scores keep a gradient where HAT's float32 derivative is 0)."""
    hat = load_example("hat_split_mnist")
    net, _, _, _ = _plain_run()
    _, method, _ = _port_run(hat, derivative="stable")
    embeddings = {"fc1": net.efc1.weight.detach(), "fc2": net.efc2.weight.detach()}
    diff = max((method.saved_scores[t][n] - embeddings[n][t]).abs().max().item() for t in range(TASKS) for n in embeddings)
    assert diff > 1e-3, diff


def test_defaults_keep_old_tasks_bit_identical(load_example):
    hat = load_example("hat_split_mnist")
    torch.manual_seed(1)
    cfg, model, method = _port(hat, hat_numerics=False)
    tasks = _data()
    g = torch.Generator().manual_seed(3)
    x_test = torch.randn(32, IN)
    method.train_task(0, *tasks[0], g)
    reserved = method.ledger.reserved_mask("fc1")
    assert reserved.any() and not reserved.all(), "task 0 reserved some units and left others free"
    before = method.predict(x_test, 0)
    weights = model.fc1.weight.detach().clone()
    losses = method.train_task(1, *tasks[1], g)
    assert len(losses) == 2 * N // cfg.batch_size
    assert not torch.equal(model.fc1.weight, weights), "task 1 trained the free units"
    assert torch.equal(method.predict(x_test, 0), before), "task 0's outputs are bit-identical"
    assert torch.equal(model.fc1.weight[reserved], weights[reserved])


def test_the_script_runs_on_the_synthetic_set(load_example):
    hat = load_example("hat_split_mnist")
    summary = hat.main(["--synthetic", "--epochs", "1", "--hidden", "32", "--max-train-per-class", "32"])
    assert len(summary["accuracy_after_last"]) == 5
    assert summary["task0_logit_drift"] == 0.0
