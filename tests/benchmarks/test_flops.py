"""The FLOP counting of the roofline (benchmarks/flops.py) against hand-counted convolutions and matrix products."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.flops import count_flops, rate_row


def _conv_flops(B, cin, cout, k, ho, wo):
    return 2 * B * cout * ho * wo * cin * k * k


def test_conv_forward_and_both_backward_products():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    w = torch.randn(8, 3, 5, 5, requires_grad=True)
    one = _conv_flops(4, 3, 8, 5, 8, 8)
    total, per_op = count_flops(lambda: F.conv2d(x, w, stride=2, padding=2))
    assert total == one and per_op == {"convolution": one}
    # backward: the input gradient and the weight gradient, each as much arithmetic as the forward
    total, per_op = count_flops(lambda: F.conv2d(x, w, stride=2, padding=2).sum().backward())
    assert per_op == {"convolution": one, "convolution_backward": 2 * one}


def test_the_gradient_penalty_double_backward_is_counted():
    # FlopCounterMode's module tracking fails inside autograd.grad(create_graph=True); the plain mode counts it
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, 2, 2), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 1))
    x = torch.randn(2, 1, 16, 16, requires_grad=True)

    def penalty():
        g, = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        g.square().sum().backward()

    total, per_op = count_flops(penalty)
    conv = _conv_flops(2, 1, 4, 5, 8, 8)
    # forward conv, input-gradient conv, then through that: the double backward's two more products
    assert per_op["convolution"] >= conv and per_op["convolution_backward"] >= 2 * conv
    assert total > count_flops(lambda: net(x).sum().backward())[0]
    assert per_op["addmm"] == 2 * 2 * 256 * 1


def test_matrix_products_and_ops_outside_the_table():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert count_flops(torch.mm, a, b) == (2 * 5 * 7 * 3, {"mm": 2 * 5 * 7 * 3})
    assert count_flops(lambda: (a * 2).relu().sum()) == (0, {})


def test_rate_row():
    r = rate_row(2e9, 0.5, 8e9)
    assert r["gflop_per_s"] == pytest.approx(4.0) and r["matmul_fraction"] == pytest.approx(0.5)
    assert rate_row(1, 1.0, None)["matmul_fraction"] is None
