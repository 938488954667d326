"""The networks of DGM (SPEC section 2): a masked conditional generator and the discriminator/classifier.

Generator (32x32, DCGAN-like)::

    z [N, nz, 1, 1]  (first n_classes entries overwritten by the one-hot label)
      -> conv1: masked ConvTranspose2d(nz, 4 ngf, k4, s1, p0)   4x4    -> BN_t -> ReLU
      -> conv2: masked ConvTranspose2d(4 ngf, 2 ngf, k4, s2, p1) 8x8   -> BN_t -> ReLU
      -> conv3: masked ConvTranspose2d(2 ngf, ngf, k4, s2, p1)  16x16  -> BN_t -> ReLU
      -> head_t: ConvTranspose2d(ngf_t, nc, k4, s2, p1)          32x32  -> tanh

No biases anywhere (as the authors). The masked layers are shared by all tasks and grow; the BatchNorms and the
output layer are per task, unmasked, at the widths the task was trained with. DGMw masks every weight
(:class:`dgm_kernels.nn.MaskedConvTranspose2d`), DGMa gates every output channel
(:class:`dgm_kernels.nn.GatedConvTranspose2d`).

DGMa gate position: the authors gate the convolution's output *before* BatchNorm (``gate_after_bn=False``, used
by the ``paper`` preset): a closed channel then still emits ReLU(beta) of its task's BN, and that constant reaches the
next layer through weights that SPEC section 4's rule leaves free (a weight is frozen only where both its units
are reserved), so a finished task's images can drift when later tasks train those weights. ``gate_after_bn=True``
(the default of this class and of the ``quick`` preset) gates after BN: a closed channel emits exactly 0, and a
finished task's images stay bit-identical.

The task being trained computes with the live layers (scores, s, s_max, mode). A finished task computes with its
stored binary masks and widths through :meth:`dgm_kernels.MaskLedger.task_forward` (or ``task_view`` when the gate
comes after BN), so nothing trained later can change what it generates.

ImageNet-50 (SPEC section 2, ``architecture="resnet"``): :class:`ResidualGenerator` (a linear stem to 4x4x64 and
three up-sampling residual blocks of 3x3 convolutions; only the blocks' inner widths grow, see its docstring for
how a residual network is registered with the chain-shaped :class:`dgm_kernels.MaskLedger`) and
:class:`ResNetDiscriminator` (a CIFAR-style ResNet-18 with a 2048-d feature and the same two heads).
:func:`build_generator`, :func:`build_discriminator` and :func:`build_classifier` pick the networks by architecture.
"""
from __future__ import annotations

from ..names import MASKED_METHODS, RIVALS
from .critics import Classifier, Discriminator, ResNetClassifier, ResNetDiscriminator
from .generator import DEFAULT_NGF, LAYER_NAMES, Generator, MaskedGenerator, count_parameters, frozen_bn
from .plain import PLAIN_NGF, PlainGenerator
from .residual import DEFAULT_STREAM_WIDTH, RESIDUAL_BLOCKS, RESIDUAL_LAYER_NAMES, ResidualGenerator

__all__ = ["Generator", "Discriminator", "Classifier", "ResidualGenerator", "ResNetDiscriminator", "ResNetClassifier",
           "MaskedGenerator", "PlainGenerator", "PLAIN_NGF", "MASKED_METHODS", "ARCHITECTURES", "build_generator",
           "build_discriminator", "build_classifier",
           "count_parameters", "frozen_bn", "DEFAULT_NGF", "LAYER_NAMES", "DEFAULT_STREAM_WIDTH", "RESIDUAL_BLOCKS",
           "RESIDUAL_LAYER_NAMES", "TRUNK_WIDTHS"]

# ------------------------------------------------------------------------------------------------------
# choosing the networks by architecture

#: ``dcgan``: SPEC section 2's MNIST/SVHN/CIFAR networks; ``resnet``: its ImageNet-50 networks
ARCHITECTURES = ("dcgan", "resnet")
#: how many critic / classifier widths each architecture takes
TRUNK_WIDTHS = {"dcgan": 3, "resnet": 4}


def _check_architecture(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def build_generator(architecture: str, method: str, *, nz: int = 128, ngf: int | None = None,
                    inner_width: int | None = None, nc: int, n_classes: int, mask_mode: str = "anneal",
                    gate_after_bn: bool | None = None, backend: str | None = None):
    """The generator of ``architecture`` (``inner_width`` applies to ``resnet`` only) for ``method``: a masked one for
    DGMw / DGMa, the plain DCGAN generator for the rivals (conditional but for DGR; ``dcgan`` only)."""
    _check_architecture(architecture)
    if method in RIVALS:
        if architecture != "dcgan" or inner_width is not None:
            raise ValueError(f"method {method!r} has the 'dcgan' generator only, got architecture {architecture!r}"
                             + (" with inner_width" if inner_width is not None else ""))
        return PlainGenerator(nz=nz, ngf=PLAIN_NGF if ngf is None else ngf, nc=nc, n_classes=n_classes,
                              conditional=method != "dgr", backend=backend)
    if method not in MASKED_METHODS:
        raise ValueError(f"method must be one of {MASKED_METHODS + RIVALS}, got {method!r}")
    kw = dict(nz=nz, ngf=ngf, nc=nc, n_classes=n_classes, mask_mode=mask_mode, gate_after_bn=gate_after_bn,
              backend=backend)
    if architecture == "dcgan":
        if inner_width is not None:
            raise ValueError("inner_width applies to the 'resnet' generator only, got it with 'dcgan'")
        return Generator(method, **kw)
    return ResidualGenerator(method, inner_width=inner_width, **kw)


def build_discriminator(architecture: str, nc: int, classes: int = 0, widths=None):
    """The critic (with its auxiliary classifier head) of ``architecture``; ``widths`` None: the paper's."""
    _check_architecture(architecture)
    cls = Discriminator if architecture == "dcgan" else ResNetDiscriminator
    return cls(nc, classes) if widths is None else cls(nc, classes, widths)


def build_classifier(architecture: str, nc: int, classes: int = 0, widths=None, batchnorm: bool = True):
    """The separate classifier of ``architecture``; ``widths`` None: the paper's critic widths.

    ``batchnorm=False`` (``dcgan`` only) drops its BatchNorm layers: trained mostly on replayed images, their
    running statistics are the generator's, and real test images are then normalised with the wrong ones.
    """
    _check_architecture(architecture)
    if architecture == "dcgan":
        return Classifier(nc, classes, *(() if widths is None else (widths,)), batchnorm=batchnorm)
    if not batchnorm:
        raise ValueError(f"batchnorm=False is supported by the 'dcgan' classifier only, got architecture {architecture!r}")
    return ResNetClassifier(nc, classes) if widths is None else ResNetClassifier(nc, classes, widths)
