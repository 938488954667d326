"""The WGAN-GP critic step on the cpu backend's convolution kernels (the first layer on a 1-channel image) gives the
reference's losses and parameters, to float32 rounding: the penalty's double backward runs through them."""
import copy

import pytest
import torch

import dgm_kernels as dk
from dgm.models.critics import Classifier, Discriminator
from dgm.steps import classifier_step, critic_step

pytestmark = pytest.mark.skipif(dk.backends.unavailable_reason("cpu") is not None,
                                reason=f"the cpu backend: {dk.backends.unavailable_reason('cpu')}")


def _after_steps(backend, net, steps, nc):
    net = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(1)
    losses = []
    with dk.use_backend(backend):
        for _ in range(steps):
            x = torch.rand(16, nc, 32, 32, generator=g) * 2 - 1
            if isinstance(net, Discriminator):
                fake = torch.rand(16, nc, 32, 32, generator=g) * 2 - 1
                torch.manual_seed(7)  # the penalty's interpolation weights
                losses.append(critic_step(net, opt, x, fake, 10.0))
            else:
                losses.append(classifier_step(net, opt, x, torch.randint(0, 3, (16,), generator=g)))
    return losses, net


@pytest.mark.parametrize("kind", ["critic", "classifier"])
def test_steps_on_the_cpu_kernels_match_the_reference(kind):
    torch.manual_seed(0)
    net = Discriminator(1, 3, (8, 16, 32)) if kind == "critic" else Classifier(1, 3, (8, 16, 32))
    ref_losses, ref = _after_steps("reference", net, 3, 1)
    cpu_losses, cpu = _after_steps("cpu", net, 3, 1)
    torch.testing.assert_close(torch.tensor(cpu_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(cpu.named_parameters(), ref.parameters()):
        if name in ("trunk.2.bias", "trunk.5.bias"):
            # a bias right before BatchNorm: its gradient is 0 up to rounding noise, which Adam scales to steps of
            # the learning rate with the noise's sign: any two summation orders move it differently
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # the parameters moved: the comparison is not between two untouched copies
    assert not torch.equal(next(cpu.parameters()), next(net.parameters()))
