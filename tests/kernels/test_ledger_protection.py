"""What the ledger must protect beyond DGM's own use of it: one optimizer kept across tasks with or without growth,
biases of per-weight layers, and a layer after a flatten (HAT, PackNet and Piggyback never grow)."""
from __future__ import annotations

import pytest
import torch

import dgm_kernels as dk
from dgm_kernels import nn as dnn
from dgm_kernels.ledger import LedgerError
from dgm_kernels.bits import unit_block_pattern

from helpers import backend_params, masked_optimizer

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()
OPTIMIZERS = ("sgd-momentum", "adam", "adamw")


class TwoLayer(torch.nn.Module):
    """conv(3 -> 6) -> ReLU -> conv(6 -> 4), both with biases, per-weight (dgmw) or gated (dgma)."""

    def __init__(self, method, backend):
        super().__init__()
        if method == "dgmw":
            self.a = dnn.MaskedConv2d(3, 6, 3, padding=1, bias=True, mode="ste", backend=backend)
            self.b = dnn.MaskedConv2d(6, 4, 3, padding=1, bias=True, mode="ste", backend=backend)
        else:
            self.a = dnn.GatedConv2d(3, 6, 3, padding=1, bias=True, input_masked=False, mode="ste", backend=backend)
            self.b = dnn.GatedConv2d(6, 4, 3, padding=1, bias=True, mode="ste", backend=backend)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    def layers(self):
        return [("a", self.a), ("b", self.b)]


def _old_output(ledger, x, task):
    return ledger.task_forward("b", torch.relu(ledger.task_forward("a", x, task)), task)


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # each task keeps some entries and leaves others free
        for _, layer in model.layers():
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=g) * 0.1 + 0.02)
    target = torch.randn(4, 4, 5, 5, generator=g)
    for _ in range(steps):
        x = torch.randn(4, 3, 5, 5, generator=g)
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("grow", [False, True], ids=["no-growth", "growth"])
@pytest.mark.parametrize("method", ["dgmw", "dgma"])
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_attached_optimizer_keeps_old_tasks_bit_identical(backend, device, optimizer_name, method, grow):
    """One optimizer attached once and kept for every task (as HAT, PackNet and Piggyback do), biases on:
    commit, begin and grow must reach the optimizer, or Adam's moments move the committed weights."""
    if device != "cpu":
        pytest.skip("the CPU run covers the invariant; the GPU parity suite covers the kernels")
    model = TwoLayer(method, backend)
    ledger = dk.MaskLedger(model.layers(), backend=backend)
    opt = masked_optimizer(optimizer_name, model.parameters(), backend, adam_lr=0.02)
    ledger.attach(opt)
    x0 = torch.randn(3, 3, 5, 5)
    steps = 4 if backend == "triton" else 10

    _train(model, opt, steps, seed=0)
    counts = ledger.commit_task(0)
    assert sum(c[0] for c in counts.values()) > 0
    out0 = _old_output(ledger, x0, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for task in (1, 2):
        if grow:
            ledger.grow({"a": 2})  # b gains 2 inputs, its outputs stay the targets
        else:
            ledger.begin_task()
        _train(model, opt, steps, seed=task)
        ledger.commit_task(task)
    assert torch.equal(_old_output(ledger, x0, 0), out0), "task 0's output must be bit-identical"
    moved = [n for n, p in model.named_parameters()
             if n.endswith(("weight", "bias")) and
             not torch.equal(p.detach()[tuple(slice(0, d) for d in before[n].shape)], before[n])]
    assert moved, "the free entries must keep training"
    assert ledger.attached_optimizers() == [opt]


def test_optimizer_follows_commit_begin_and_load_state_dict():
    model = TwoLayer("dgmw", "reference")
    ledger = dk.MaskLedger(model.layers())
    opt = masked_optimizer("adam", model.parameters(), "reference", adam_lr=0.02)
    ledger.attach(opt)
    assert not dk.unpack_bits(opt.frozen_of(model.a.weight), model.a.weight.shape).any()
    _train(model, opt, 3, seed=0)
    ledger.commit_task(0)
    reserved = ledger.reserved_mask("a")
    assert reserved.any()
    assert torch.equal(dk.unpack_bits(opt.frozen_of(model.a.weight), model.a.weight.shape), reserved)
    # a per-weight layer has no unit gate: task 0 adds every bias of its width, so all of them freeze
    assert dk.unpack_bits(opt.frozen_of(model.a.bias), (6,)).all()
    assert dk.unpack_bits(model.a.frozen_bias, (6,)).all()
    saved = ledger.state_dict()

    fresh = TwoLayer("dgmw", "reference")
    fresh_ledger = dk.MaskLedger(fresh.layers())
    fresh_opt = masked_optimizer("sgd-momentum", fresh.parameters(), "reference", adam_lr=0.02)
    fresh_ledger.attach(fresh_opt)
    fresh_ledger.load_state_dict(saved)
    assert torch.equal(fresh_opt.frozen_of(fresh.a.weight), ledger.reserved("a"))
    ledger.detach(opt)
    assert ledger.attached_optimizers() == []


def test_bias_of_a_per_weight_layer_gets_no_gradient_where_frozen():
    layer = dnn.MaskedLinear(5, 4, bias=True)
    layer.set_frozen(torch.zeros(4, 5, dtype=torch.bool), torch.tensor([True, False, True, False]))
    layer(torch.randn(3, 5)).sum().backward()
    assert torch.equal(layer.bias.grad == 0, torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match="frozen_bias must be None"):
        dnn.MaskedLinear(5, 4, bias=False).set_frozen(torch.zeros(4, 5, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------
# a layer after a flatten


class FlattenNet(torch.nn.Module):
    """gated conv(2 -> 4) on 3x3 -> flatten [4, 3, 3] -> gated 1x1 conv(36 -> 5): a linear layer after a flatten."""

    def __init__(self, in_masked=True, width=36):
        super().__init__()
        self.conv = dnn.GatedConv2d(2, 4, 3, padding=1, bias=True, input_masked=False, mode="ste")
        self.fc = dnn.GatedConv2d(width, 5, 1, bias=True, input_masked=in_masked, mode="ste")

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.flatten(1)[:, :, None, None])

    def layers(self):
        return [("conv", self.conv), ("fc", self.fc)]


def test_input_units_after_a_flatten_are_the_channels_repeated():
    net = FlattenNet()
    ledger = dk.MaskLedger(net.layers())
    opt = masked_optimizer("sgd-momentum", net.parameters(), "reference", adam_lr=0.02)
    ledger.attach(opt)
    with torch.no_grad():
        net.conv.scores.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
        net.fc.scores.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0]))
    ledger.commit_task(0)
    channels = torch.tensor([True, False, True, False])
    fin = channels.repeat_interleave(9)
    assert torch.equal(dk.unpack_bits(net.fc.frozen_in, (36,)), fin)
    fout = torch.tensor([True, True, False, False, True])
    block = unit_block_pattern(net.fc.weight.shape, fout, fin, False, 1)[:, :, None, None].expand(net.fc.weight.shape)
    assert torch.equal(dk.unpack_bits(opt.frozen_of(net.fc.weight), net.fc.weight.shape), block)

    # old output bit-identical after training the next task with the same optimizer
    x = torch.randn(3, 2, 3, 3)
    old = ledger.task_forward("fc", torch.relu(ledger.task_forward("conv", x, 0)).flatten(1)[:, :, None, None], 0)
    ledger.grow({"conv": 2, "fc": 1})
    assert net.fc.weight.shape == (6, 54, 1, 1), "2 new channels of 3x3 positions are 18 new inputs"
    for _ in range(5):
        loss = net(torch.randn(4, 2, 3, 3)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    again = ledger.task_forward("fc", torch.relu(ledger.task_forward("conv", x, 0)).flatten(1)[:, :, None, None], 0)
    assert torch.equal(again, old)


def test_per_weight_layer_after_a_flatten_grows_by_positions():
    conv = dnn.MaskedConv2d(1, 3, 3, padding=1, bias=False)
    fc = dnn.MaskedLinear(3 * 4 * 4, 2, bias=False)
    ledger = dk.MaskLedger([("conv", conv), ("fc", fc)])
    ledger.grow({"conv": 2, "fc": 0})
    assert fc.weight.shape == (2, 5 * 16)


def test_other_width_mismatches_are_refused():
    with pytest.raises(LedgerError, match=r"input width must be .* output width \(4\) or a multiple .* got 37"):
        dk.MaskLedger(FlattenNet(width=37).layers())
    # a layer whose input is not masked may read anything, but then it cannot grow with its predecessor
    net = FlattenNet(in_masked=False, width=37)
    ledger = dk.MaskLedger(net.layers())
    with pytest.raises(LedgerError, match="cannot grow its input"):
        ledger.grow({"conv": 1})
    assert net.conv.weight.shape[0] == 4, "a refused grow changes nothing"


# ---------------------------------------------------------------------------------------------------------
# layers own their growth; one old-task forward with the normalisation before the gate


@pytest.mark.parametrize("make", [
    lambda: dnn.MaskedLinear(5, 4, bias=True),
    lambda: dnn.MaskedConv2d(3, 4, 3, bias=True),
    lambda: dnn.MaskedConvTranspose2d(3, 4, 4, 2, 1, bias=True),
    lambda: dnn.GatedConv2d(3, 4, 3, bias=True),
    lambda: dnn.GatedConvTranspose2d(3, 4, 4, 2, 1, bias=True),
], ids=["linear", "conv", "convT", "gated-conv", "gated-convT"])
def test_a_layer_grows_itself_old_block_in_place(make):
    layer = make()
    kind_attrs = (layer.mask_kind, layer.transposed, layer.linear)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    frozen_all = torch.ones(layer.mask_shape(), dtype=torch.bool)
    if layer.mask_kind == dnn.WEIGHT:
        layer.set_frozen(frozen_all, torch.ones(4, dtype=torch.bool))
    else:
        layer.set_frozen(frozen_all, torch.ones(3, dtype=torch.bool))
    changes = layer.grow(2, 3)
    assert (layer.in_width, layer.out_width) == ((7 if layer.linear else 5), 7)
    old = tuple(slice(0, d) for d in w0.shape)
    assert torch.equal(layer.weight.detach()[old], w0) and torch.equal(layer.bias.detach()[:4], b0)
    assert layer.scores.shape == layer.mask_shape() and not layer.scores.any()
    assert [c[1] for c in changes] == [layer.weight, layer.bias, layer.scores]
    assert (layer.mask_kind, layer.transposed, layer.linear) == kind_attrs
    # the frozen state keeps its old entries, the new ones are free
    if layer.mask_kind == dnn.WEIGHT:
        frozen = dk.unpack_bits(layer.frozen, layer.weight.shape)
        assert frozen[old].all() and frozen.sum() == w0.numel()
        assert dk.unpack_bits(layer.frozen_bias, (7,)).tolist() == [True] * 4 + [False] * 3
    else:
        assert dk.unpack_bits(layer.frozen_out, (7,)).tolist() == [True] * 4 + [False] * 3
        assert dk.unpack_bits(layer.frozen_in, (5,)).tolist() == [True] * 3 + [False] * 2
    x = torch.randn(2, 7) if layer.linear else torch.randn(2, 5, 6, 6)
    assert layer(x).shape[1] == 7
    with pytest.raises(ValueError, match="extra_in must be an int >= 0"):
        layer.grow(-1, 0)


def test_grouped_layers_refuse_to_grow():
    with pytest.raises(ValueError, match="groups=2"):
        dnn.GatedConv2d(4, 4, 3, groups=2).grow(0, 2)


@pytest.mark.parametrize("transposed", [False, True])
def test_gate_after_norm_is_norm_then_gate_live_and_finished(transposed):
    cls = dnn.GatedConvTranspose2d if transposed else dnn.GatedConv2d
    layer = cls(3, 4, 3, padding=1, bias=False, input_masked=False, mode="ste")
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.bias.uniform_(0.5, 1.0)  # a closed unit would emit ReLU(beta) > 0 if the gate came before the norm
        layer.scores.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    x = torch.randn(2, 3, 5, 5)
    y = layer(x, norm=bn)
    conv = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
    expect = bn(conv(x, layer.weight, None, 1, 1)) * torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, -1, 1, 1)
    torch.testing.assert_close(y, expect)
    assert (y[:, 1] == 0).all() and (y[:, 3] == 0).all()
    ledger = dk.MaskLedger([("l", layer)])
    ledger.commit_task(0)
    torch.testing.assert_close(ledger.task_forward("l", x, 0, norm=bn), expect)
    with pytest.raises(TypeError, match="norm must be None or a callable"):
        layer(x, norm=3)
