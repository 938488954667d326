"""The critics (WGAN critic + auxiliary classifier head) and the separate classifiers: DCGAN-like and ResNet-18."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dgm_kernels as dk

# ------------------------------------------------------------------------------------------------------
class _Trunk(nn.Sequential):
    """Conv(nc->c1,k5,s2,p2)-LReLU, Conv(c1->c2)-BN-LReLU, Conv(c2->c3)-BN-LReLU, flatten (c3 * 4 * 4).

    The convolutions are ``dgm_kernels.nn.Conv2d`` (``torch.nn.Conv2d`` with the backend's algorithm: on the CPU
    the first layer's backward on a 1-channel image runs on the library's kernels; docs/performance.md)."""

    def __init__(self, nc: int, widths=(32, 64, 128), batchnorm: bool = True):
        c1, c2, c3 = widths
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        super().__init__(
            dk.nn.Conv2d(nc, c1, 5, 2, 2), nn.LeakyReLU(0.2),
            dk.nn.Conv2d(c1, c2, 5, 2, 2), norm(c2), nn.LeakyReLU(0.2),
            dk.nn.Conv2d(c2, c3, 5, 2, 2), norm(c3), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.features = c3 * 16


class _GrowingHead(nn.Module):
    """A linear classifier over the classes seen so far; ``grow(n)`` keeps the old rows."""

    def __init__(self, features: int, classes: int = 0):
        super().__init__()
        self.features = features
        self.linear = nn.Linear(features, max(classes, 1))
        self.classes = classes

    def grow(self, classes: int) -> None:
        if classes < self.classes:
            raise ValueError(f"a classifier head cannot shrink from {self.classes} to {classes} classes")
        if classes == self.classes:
            return
        old = self.linear
        new = nn.Linear(self.features, classes).to(old.weight.device, old.weight.dtype)
        if self.classes:
            with torch.no_grad():
                new.weight[: self.classes] = old.weight[: self.classes]
                new.bias[: self.classes] = old.bias[: self.classes]
        self.linear, self.classes = new, classes

    def forward(self, h):
        return self.linear(h)[:, : self.classes]


class _TwoHeaded(nn.Module):
    """A feature trunk with a growing classifier head and, for a critic, a WGAN critic head."""

    def __init__(self, trunk: nn.Module, classes: int, critic: bool):
        super().__init__()
        self.trunk = trunk
        if critic:
            self.critic_head = nn.Linear(self.trunk.features, 1)
        self.aux_head = _GrowingHead(self.trunk.features, classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux_head(self.trunk(x))

    def grow_classes(self, classes: int) -> None:
        self.aux_head.grow(classes)

    @property
    def classes(self) -> int:
        return self.aux_head.classes


class Discriminator(_TwoHeaded):
    """D of SPEC section 2: a conv trunk (2048 features), a WGAN critic head and an auxiliary classifier head.

    ``widths`` (default 32/64/128, the paper's) may be narrowed for fast presets.
    """

    def __init__(self, nc: int = 1, classes: int = 0, widths=(32, 64, 128)):
        super().__init__(_Trunk(nc, widths), classes, critic=True)

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.trunk(x)).squeeze(1)


class Classifier(_TwoHeaded):
    """A separate classifier (same trunk design as D, its own weights and head), for the stable presets."""

    def __init__(self, nc: int = 1, classes: int = 0, widths=(32, 64, 128), batchnorm: bool = True):
        super().__init__(_Trunk(nc, widths, batchnorm), classes, critic=False)


# ------------------------------------------------------------------------------------------------------
# the ImageNet-50 critic and classifier

class _BasicBlock(nn.Module):
    """ResNet's basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus the shortcut (1x1 conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNetTrunk(nn.Module):
    """CIFAR-style ResNet-18 features of a 32x32 image.

    conv3x3(nc -> w1)-BN-ReLU at 32x32, four stages of two basic blocks of widths w1..w4 with strides 1, 2, 2, 2
    (32, 16, 8, 4 pixels), 2x2 average pooling of the 4x4 map, flatten: ``4 * w4`` features, i.e. the 2048-d
    feature of SPEC section 2 for the standard widths 64/128/256/512 (CIFAR ResNets usually pool to 1x1, 512-d).
    """

    def __init__(self, nc: int, widths=(64, 128, 256, 512)):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be four positive ints (the ResNet-18 stages), got {widths}")
        self.stem = nn.Sequential(nn.Conv2d(nc, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for w, stride in zip(widths, (1, 2, 2, 2)):
            stages.append(nn.Sequential(_BasicBlock(cin, w, stride), _BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.features = widths[-1] * 4

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"the ResNet-18 trunk takes 32x32 images, got {tuple(x.shape)}")
        return F.avg_pool2d(self.stages(self.stem(x)), 2).flatten(1)


class ResNetDiscriminator(_TwoHeaded):
    """The ImageNet-50 critic of SPEC section 2: a CIFAR-style ResNet-18 (2048-d feature) with a WGAN critic head
    and an auxiliary classifier head. ``widths``: the four stage widths (default 64/128/256/512)."""

    def __init__(self, nc: int = 3, classes: int = 0, widths=(64, 128, 256, 512)):
        super().__init__(_ResNetTrunk(nc, widths), classes, critic=True)

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.trunk(x)).squeeze(1)


class ResNetClassifier(_TwoHeaded):
    """A separate ResNet-18 classifier (the ImageNet-50 variant of :class:`Classifier`)."""

    def __init__(self, nc: int = 3, classes: int = 0, widths=(64, 128, 256, 512)):
        super().__init__(_ResNetTrunk(nc, widths), classes, critic=False)
