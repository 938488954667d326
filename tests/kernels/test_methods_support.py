"""What HAT, PackNet, Piggyback and SupSup need from the library (issue 16): the gated linear layer
(``dk.gated_linear``, ``dk.nn.GatedLinear``) and its place in the ledger.

Parity with the reference: float32, relative 2e-4 of the expected tensor's largest magnitude for anything that
goes through a matrix product (summation orders differ), exact zero for anything frozen.
"""
from __future__ import annotations

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels import nn as dnn
from dgm_kernels.bits import pack_bits_reference, unit_block_pattern

from helpers import backend_params

BACKENDS = backend_params()
SCHEDULES = {
    "anneal": dict(mode="anneal", s_max=None),
    "anneal-hat": dict(mode="anneal", s_max=400.0),
    "ste": dict(mode="ste", s_max=None),
    "ste-hat": dict(mode="ste", s_max=400.0),
}


def _scores(n):
    # both signs, some near the decision boundary, none exactly 0
    e = torch.randn(n) * 0.7
    e[::3] *= 1e-3
    return e


def _run(backend, tensors, **kwargs):
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None and v.dtype.is_floating_point else v)
              for k, v in tensors.items()}
    out = dk.gated_linear(**leaves, **kwargs, backend=backend)
    g = torch.Generator().manual_seed(3)
    out.backward(torch.randn(out.shape, generator=g).to(out.device))
    grads = {k: v.grad for k, v in leaves.items() if v is not None and v.dtype.is_floating_point}
    return out.detach(), grads


def _close(actual, expected, what, rel=2e-4):
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("variant", ["plain", "frozen", "frozen-packed", "unmasked-input", "batched-3d"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gated_linear_matches_reference(backend, device, variant, schedule):
    out_f, in_f = 7, 10
    x = torch.randn(3, 4, in_f) if variant == "batched-3d" else torch.randn(5, in_f)
    fo = torch.tensor([True, False, True, True, False, False, True])
    fi = torch.rand(in_f) < 0.5
    fi[0], fi[1] = True, False
    tensors = dict(input=x, weight=torch.randn(out_f, in_f) * 0.3, scores=_scores(out_f), bias=torch.randn(out_f))
    if variant in ("frozen", "frozen-packed", "batched-3d"):
        tensors.update(frozen_out=fo, frozen_in=fi)
    elif variant == "unmasked-input":
        tensors.update(frozen_out=fo)
    if variant == "frozen-packed":
        tensors.update(frozen_out=pack_bits_reference(fo), frozen_in=pack_bits_reference(fi))
    tensors = {k: v.to(device) for k, v in tensors.items()}
    ref_out, ref_grads = _run("reference", tensors, s=3.0, **SCHEDULES[schedule])
    out, grads = _run(backend, tensors, s=3.0, **SCHEDULES[schedule])
    _close(out, ref_out, "forward")
    for name, g in ref_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        _close(grads[name], g, f"grad of {name}")
    if variant != "plain":
        block = unit_block_pattern((out_f, in_f), fo, None if variant == "unmasked-input" else fi, False, 1)
        block = block.to(device)
        assert block.any() and not block.all()
        assert (grads["weight"][block] == 0).all(), "weights between frozen units must get exactly zero gradient"
        assert (grads["weight"][~block] != 0).any()
        assert (grads["bias"][fo.to(device)] == 0).all(), "the bias of a frozen unit must get no gradient"
        assert (grads["bias"][~fo.to(device)] != 0).any()  # (a closed ste gate passes none)


def test_gated_linear_is_the_gate_of_a_linear_map():
    """The definition, written out: (x W^T + b) * sigmoid(s e) per output feature; a 1-D input works as a row."""
    x, w, b, e = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3), torch.randn(3)
    want = (x @ w.T + b) * torch.sigmoid(2.0 * e)
    torch.testing.assert_close(dk.gated_linear(x, w, e, 2.0, bias=b, backend="reference"), want)
    torch.testing.assert_close(dk.gated_linear(x[0], w, e, 2.0, bias=b, backend="reference"), want[0])
    ste = dk.gated_linear(x, w, e, 2.0, bias=b, mode="ste", backend="reference")
    torch.testing.assert_close(ste, (x @ w.T + b) * (e >= 0).float())
    norm = torch.nn.BatchNorm1d(3).eval()
    torch.testing.assert_close(dk.gated_linear(x, w, e, 2.0, bias=b, norm=norm, backend="reference"),
                               norm(x @ w.T + b) * torch.sigmoid(2.0 * e))


def test_gated_linear_refuses_bad_arguments():
    x, w, e = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    with pytest.raises(ValueError, match="in_features=6"):
        dk.gated_linear(torch.randn(4, 5), w, e, 1.0)
    with pytest.raises(ValueError, match="scores"):
        dk.gated_linear(x, w, torch.randn(4), 1.0)
    with pytest.raises(ValueError, match="frozen_in"):
        dk.gated_linear(x, w, e, 1.0, torch.zeros(3, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="norm"):
        dk.gated_linear(x, w, e, 1.0, norm=3)


def test_gated_linear_gradcheck_float64():
    """Every derivative the reference gives is the true one, except where it is zero by design (frozen weights
    and biases) or rescaled by design (HAT's compensation of the scores' gradient): those inputs are left out."""
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 5, **d, requires_grad=True)
    w = torch.randn(4, 5, **d, requires_grad=True)
    e = (torch.randn(4, **d) * 0.5).requires_grad_(True)
    b = torch.randn(4, **d, requires_grad=True)
    fo, fi = torch.tensor([True, False, True, False]), torch.tensor([True, True, False, False, True])

    def f(x, w, e, b, frozen=False, s_max=None):
        frozen_args = (fo, fi) if frozen else ()
        return dk.gated_linear(x, w, e, 1.7, *frozen_args, bias=b, s_max=s_max, backend="reference")

    assert torch.autograd.gradcheck(f, (x, w, e, b))
    assert torch.autograd.gradcheck(lambda x, w, b: f(x, w, e, b, s_max=30.0), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, e: f(x, w, e, b, frozen=True), (x, e))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gated_linear_layer_grows_and_freezes(backend, device):
    layer = dnn.GatedLinear(6, 4, backend=backend, device=device)
    assert layer.mask_kind == dnn.UNIT and layer.linear and layer.mask_shape() == (4,)
    assert (layer.in_width, layer.out_width, layer.kernel_area) == (6, 4, 1)
    layer.s = 4.0
    with torch.no_grad():
        layer.scores.normal_()
    layer.set_frozen(torch.tensor([True, False, True, False]), torch.tensor([True, True, False, False, False, True]))
    x = torch.randn(3, 6, device=device)
    before = layer(x).detach()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    changes = layer.grow(2, 3)
    assert len(changes) == 3  # weight, bias, scores
    assert layer.weight.shape == (7, 8) and layer.bias.shape == (7,) and layer.scores.shape == (7,)
    assert torch.equal(layer.weight.detach()[:4, :6], w0) and torch.equal(layer.bias.detach()[:4], b0)
    assert (layer.scores == 0).all()
    fo = dk.unpack_bits(layer.frozen_out, (7,))
    fi = dk.unpack_bits(layer.frozen_in, (8,))
    assert fo.tolist() == [True, False, True, False, False, False, False]
    assert fi.tolist() == [True, True, False, False, False, True, False, False]
    layer(torch.randn(3, 8, device=device)).sum().backward()
    blocked = fo[:, None] & fi[None, :]
    assert (layer.weight.grad[blocked] == 0).all() and (layer.bias.grad[fo] == 0).all()
    # a state dict round-trips the layer (extra state: s, s_max, mode)
    again = dnn.GatedLinear(8, 7, backend=backend, device=device)
    again.load_state_dict(layer.state_dict())
    assert again.s == 4.0 and torch.equal(again.frozen_in, layer.frozen_in)
    first = dnn.GatedLinear(6, 4, input_masked=False, backend=backend, device=device)
    assert first.frozen_in is None
    with pytest.raises(ValueError, match="input_masked=False"):
        first.set_frozen(torch.zeros(4, dtype=torch.bool), torch.zeros(6, dtype=torch.bool))
    assert before.shape == (3, 4)


# ---------------------------------------------------------------------------------------------------------
# the ledger with a gated convolution, a flatten, then gated linear layers (HAT's AlexNet-like shape)


class ConvThenDense(torch.nn.Module):
    """gated conv(2 -> 3, 4x4 -> 2x2) -> flatten [3, 2, 2] -> gated linear(12 -> 5) -> gated linear(5 -> 4)."""

    def __init__(self, backend):
        super().__init__()
        self.conv = dnn.GatedConv2d(2, 3, 3, stride=2, padding=1, input_masked=False, mode="ste", backend=backend)
        self.fc1 = dnn.GatedLinear(12, 5, mode="ste", backend=backend)
        self.fc2 = dnn.GatedLinear(5, 4, mode="ste", backend=backend)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))

    def layers(self):
        return [("conv", self.conv), ("fc1", self.fc1), ("fc2", self.fc2)]


def _task_output(ledger, x, task):
    h = torch.relu(ledger.task_forward("conv", x, task)).flatten(1)
    return ledger.task_forward("fc2", torch.relu(ledger.task_forward("fc1", h, task)), task)


def _train(model, opt, steps=5):
    with torch.no_grad():  # a spread of scores: each task keeps some units and leaves others
        for _, layer in model.layers():
            layer.scores.normal_(0.1, 1.0)
    target = torch.randn(6, 4)
    for step in range(steps):
        for _, layer in model.layers():
            layer.s, layer.s_max = 5.0 * (step + 1), 400.0
        loss = (model(torch.randn(6, 2, 4, 4))[:, :4] - target).square().mean()  # fc2 grows too: the first 4
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ledger_keeps_old_task_outputs_of_linear_layers(backend):
    if dk.backend_status().get(backend) is not None:
        pytest.skip(f"{backend}: {dk.backend_status()[backend]}")
    model = ConvThenDense(backend)
    ledger = dk.MaskLedger(model.layers(), backend=backend)
    assert ledger.names == ["conv", "fc1", "fc2"]
    opt = dk.optim.MaskedAdam(model.parameters(), lr=0.05, backend=backend)
    ledger.attach(opt)
    x = torch.randn(3, 2, 4, 4)

    _train(model, opt)
    counts = ledger.commit_task(0)
    out0 = _task_output(ledger, x, 0)
    # fc1's input features are the conv's channels repeated over the 2x2 positions
    conv_units = ledger.reserved_mask("conv")
    assert conv_units.any() and not conv_units.all(), "the seed must give a partly reserved conv layer"
    assert torch.equal(dk.unpack_bits(model.fc1.frozen_in, (12,)), conv_units.repeat_interleave(4))
    assert torch.equal(dk.unpack_bits(model.fc2.frozen_in, (5,)), ledger.reserved_mask("fc1"))

    plan = ledger.expansion_plan(counts)  # DGMa: as many new units as the task reserved
    changes = ledger.grow(plan)
    assert changes["fc1"][1] == (5 + plan["fc1"], 12 + 4 * plan["conv"])
    assert torch.equal(_task_output(ledger, x, 0), out0), "growing must not change an old task's output"
    _train(model, opt)
    ledger.commit_task(1)
    assert torch.equal(_task_output(ledger, x, 0), out0), "task 0 must compute bit-identical outputs"

    ledger.begin_task()  # a third task without growth, trained too
    _train(model, opt)
    ledger.commit_task(2)
    assert torch.equal(_task_output(ledger, x, 0), out0)
    # the live layers, gated with task 0's bits at task 0's widths, give the same output as task_forward
    v = ledger.task_view("fc2", 0)
    with torch.no_grad():
        h = torch.relu(ledger.task_forward("fc1", torch.relu(ledger.task_forward("conv", x, 0)).flatten(1), 0))
        assert torch.equal(torch.nn.functional.linear(h, v.weight, v.bias) * v.mask.float(), out0)
    # a state dict round-trip keeps it
    state = ledger.state_dict()
    again = dk.MaskLedger(model.layers(), backend=backend)
    again.load_state_dict(state)
    assert torch.equal(_task_output(again, x, 0), out0)


def test_task_forward_of_a_linear_layer_gates_the_last_dim():
    layer = dnn.GatedLinear(3, 2, mode="ste", backend="reference")
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([1.0, -1.0]))
    ledger = dk.MaskLedger([("fc", layer)])
    ledger.commit_task(0)
    x = torch.randn(4, 5, 3)  # a sequence: the units are the last dim, not dim 1
    out = ledger.task_forward("fc", x, 0)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias) * torch.tensor([1.0, 0.0])
    assert torch.equal(out, want.detach())


# ---------------------------------------------------------------------------------------------------------
# per-task scores: a new task's initial scores, and HAT's soft test-time gate from stored real scores


def _dense_ledger():
    layers = [("fc1", dnn.GatedLinear(4, 6, input_masked=False, mode="ste", backend="reference")),
              ("fc2", dnn.GatedLinear(6, 3, mode="ste", backend="reference"))]
    return layers, dk.MaskLedger(layers)


def test_begin_task_and_grow_start_scores_from_init():
    layers, ledger = _dense_ledger()
    with torch.no_grad():
        for _, layer in layers:
            layer.scores.normal_()
    ledger.commit_task(0)
    ledger.begin_task()  # the default: today's behaviour
    assert all((layer.scores == 0).all() for _, layer in layers)
    ledger.commit_task(1)

    torch.manual_seed(7)
    ledger.begin_task(init=torch.nn.init.normal_)
    torch.manual_seed(7)
    want = [torch.nn.init.normal_(torch.empty(6)), torch.nn.init.normal_(torch.empty(3))]  # one call per layer, in order
    assert all(torch.equal(layer.scores.detach(), w) for (_, layer), w in zip(layers, want))
    ledger.commit_task(2)

    ledger.grow({"fc1": 2, "fc2": 1}, init=lambda e: torch.nn.init.constant_(e, 0.25))
    assert [layer.scores.shape[0] for _, layer in layers] == [8, 4]
    assert all((layer.scores == 0.25).all() for _, layer in layers), "grow must start the new task from init"


def test_bad_init_is_refused_and_changes_nothing():
    layers, ledger = _dense_ledger()
    with torch.no_grad():
        layers[0][1].scores.fill_(0.5)
    counts = ledger.commit_task(0)
    widths = [tuple(layer.weight.shape) for _, layer in layers]
    for bad in ("normal", 0.0, None):
        with pytest.raises(dk.LedgerError, match="init must be"):
            ledger.begin_task(init=bad)
        with pytest.raises(dk.LedgerError, match="init must be"):
            ledger.grow(ledger.expansion_plan(counts), init=bad)
    assert [tuple(layer.weight.shape) for _, layer in layers] == widths
    assert (layers[0][1].scores == 0.5).all()
    with pytest.raises(dk.LedgerError, match="already committed|no new task"):
        ledger.commit_task(1)  # the task was not opened by the refused calls


@pytest.mark.parametrize("kind", ["unit", "weight"])
def test_soft_task_forward_is_hats_test_time_gate(kind):
    if kind == "unit":
        layer = dnn.GatedLinear(5, 4, mode="anneal", backend="reference")
    else:
        layer = dnn.MaskedLinear(5, 4, mode="anneal", backend="reference")
    ledger = dk.MaskLedger([("fc", layer)])
    with torch.no_grad():
        layer.scores.normal_()
    saved = layer.scores.detach().clone()  # the recipe: the real scores of the task, kept by the user
    ledger.commit_task(0)
    x = torch.randn(3, 5)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    gate = torch.sigmoid(2.5 * saved)
    if kind == "unit":
        want = torch.nn.functional.linear(x, w, b) * gate
    else:
        want = torch.nn.functional.linear(x, w * gate, b)
    # (the ledger's default backend computes the sigmoid: equal to float rounding)
    torch.testing.assert_close(ledger.task_forward("fc", x, 0, soft_scores=saved, s=2.5), want, rtol=1e-6, atol=1e-6)
    # with a large s the soft gate is the binary one (no score sits at exactly 0 here)
    binary = ledger.task_forward("fc", x, 0)
    torch.testing.assert_close(ledger.task_forward("fc", x, 0, soft_scores=saved, s=1e4), binary)
    with pytest.raises(dk.LedgerError, match="go together"):
        ledger.task_forward("fc", x, 0, soft_scores=saved)
    with pytest.raises(dk.LedgerError, match="go together"):
        ledger.task_forward("fc", x, 0, s=3.0)
    with pytest.raises(dk.LedgerError, match="mask shape"):
        ledger.task_forward("fc", x, 0, soft_scores=saved.flatten()[:3], s=3.0)
    with pytest.raises(ValueError):
        ledger.task_forward("fc", x, 0, soft_scores=saved, s=-1.0)


def test_soft_task_forward_uses_the_tasks_widths_after_growth():
    layers, ledger = _dense_ledger()
    with torch.no_grad():
        for _, layer in layers:
            layer.scores.normal_()
    saved = {n: layer.scores.detach().clone() for n, layer in layers}
    counts = ledger.commit_task(0)
    x = torch.randn(2, 4)
    out0 = ledger.task_forward("fc2", ledger.task_forward("fc1", x, 0, soft_scores=saved["fc1"], s=400.0), 0,
                               soft_scores=saved["fc2"], s=400.0)
    ledger.grow(ledger.expansion_plan(counts), init=torch.nn.init.normal_)
    assert ledger.task_mask_shapes("fc1") == [(6,)] and layers[0][1].scores.shape[0] > 6
    again = ledger.task_forward("fc2", ledger.task_forward("fc1", x, 0, soft_scores=saved["fc1"], s=400.0), 0,
                                soft_scores=saved["fc2"], s=400.0)
    assert torch.equal(again, out0), "growth adds units the old task never sees, soft gate or not"


# ---------------------------------------------------------------------------------------------------------
# HAT's schedule of s and its clamp of the scores (dgm_kernels.schedules)


def test_hat_scale_runs_from_one_over_s_max_to_s_max():
    S = 400.0
    assert dk.hat_scale(0, 10, S) == 1 / S
    assert dk.hat_scale(10, 10, S) == S
    for i in range(11):  # the formula, in the order the library promises (dgm's schedules rely on it)
        assert dk.hat_scale(i, 10, S) == (S - 1.0 / S) * (i / 10) + 1.0 / S
    values = [dk.hat_scale(i, 7, S) for i in range(8)]
    assert values == sorted(values) and len(set(values)) == 8
    for bad in [(-1, 10, S), (11, 10, S), (0, 0, S), (1.5, 10, S), (True, 10, S), (0, 10, 0.0), (0, 10, -3.0),
                (0, 10, float("inf")), (0, 10, "400")]:
        with pytest.raises(ValueError):
            dk.hat_scale(*bad)


def test_dgm_schedules_are_the_librarys_rule():
    """dgm.plasticity computes every schedule with dk.hat_scale: the same floats as the formula it had."""
    from dgm.plasticity import scale_at

    def old_rule(top, frac):
        return (top - 1.0 / top) * frac + 1.0 / top

    for S in (1e4, 1e5, 400.0):
        for epochs, batches in ((1, 3), (3, 7)):
            for ep in range(epochs):
                for i in range(batches):
                    top = old_rule(S, ep / epochs)
                    assert scale_at("hat", S, ep, epochs, i, batches) == (old_rule(S, i / batches), S)
                    assert scale_at("task", S, ep, epochs, i, batches) == (
                        old_rule(S, (ep * batches + i) / (epochs * batches)), S)
                    assert scale_at("dgma", S, ep, epochs, i, batches) == (top, top)
                    assert scale_at("dgmw", S, ep, epochs, i, batches) == (old_rule(top, i / batches), top)


def test_clamp_scores_bounds_every_layers_scores_in_place():
    model = torch.nn.Sequential(dnn.GatedLinear(3, 4, backend="reference"), torch.nn.ReLU(),
                                dnn.MaskedLinear(4, 2, backend="reference"))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.scores.normal_(0.0, 10.0)
    before = [model[0].scores.detach().clone(), model[2].scores.detach().clone()]
    assert max(b.abs().max() for b in before) > dk.schedules.HAT_SCORE_LIMIT
    scores_param = model[0].scores
    dk.clamp_scores_(model)
    assert model[0].scores is scores_param, "in place: an optimizer keeps its parameter"
    for layer, b in zip((model[0], model[2]), before):
        assert torch.equal(layer.scores.detach(), b.clamp(-6.0, 6.0))
    dk.clamp_scores_([("a", model[0])], limit=0.5)  # (name, layer) pairs, MaskLedger's order
    assert model[0].scores.abs().max() <= 0.5 and model[2].scores.abs().max() > 0.5
    dk.clamp_scores_([model[2]], limit=1)
    assert model[2].scores.abs().max() <= 1.0
    with pytest.raises(TypeError, match="masked layers"):
        dk.clamp_scores_([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="limit"):
        dk.clamp_scores_(model, limit=0.0)


def test_hat_training_loop_with_the_library():
    """A HAT step as the library offers it: annealed s, compensation, clamp; the gates move and stay bounded."""
    layer = dnn.GatedLinear(4, 6, input_masked=False, backend="reference")
    layer.s_max = 400.0
    with torch.no_grad():
        layer.scores.normal_()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    x, target = torch.randn(8, 4), torch.randn(8, 6)
    for i in range(5):
        layer.s = dk.hat_scale(i, 5, layer.s_max)
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dk.clamp_scores_(layer)
        assert layer.scores.abs().max() <= 6.0
