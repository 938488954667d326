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

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import dgm_kernels as dk
from dgm_kernels import nn as dnn

from .names import METHODS

__all__ = ["Generator", "Discriminator", "Classifier", "ResidualGenerator", "ResNetDiscriminator", "ResNetClassifier",
           "METHODS", "ARCHITECTURES", "build_generator", "build_discriminator", "build_classifier", "count_parameters"]

#: ngf (the width of the last masked layer; the others are 2x and 4x) of each method (SPEC section 2)
DEFAULT_NGF = {"dgmw": 6, "dgma": 20}
LAYER_NAMES = ("conv1", "conv2", "conv3")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _MaskedGenerator(nn.Module):
    """What the DCGAN and the residual generators share: the conditional input, the schedule, the masks, the ledger.

    A subclass builds its masked layers (``masked_layers()``, in forward order), ``self.ledger``, ``self.bns`` and
    ``self.heads``, and implements ``_forward_live``, ``_forward_finished``, ``widths``, ``add_task_modules``,
    ``expansion_plan`` and ``task_parameter_count``.
    """

    layer_names: tuple[str, ...] = ()

    def masked_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, getattr(self, n)) for n in self.layer_names]

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def set_backend(self, backend: str | None) -> None:
        for _, layer in self.masked_layers():
            layer.backend = backend
        self.ledger.backend = backend

    def set_schedule(self, s: float, s_max: float | None) -> None:
        """The annealing scale and the HAT compensation of the task being trained."""
        for _, layer in self.masked_layers():
            layer.s, layer.s_max = float(s), None if s_max is None else float(s_max)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """What training task ``task`` updates: the shared masked layers (weights and scores), BN_t, head_t."""
        params = [p for _, layer in self.masked_layers() for p in layer.parameters()]
        return params + list(self.bns[task].parameters()) + list(self.heads[task].parameters())

    def current_masks(self) -> list[torch.Tensor]:
        """The masks m(e) the live layers apply now, differentiable in the scores (for the regulariser)."""
        return [dk.mask(l.scores, l.s, mode=l.mode, s_max=l.s_max, backend=l.backend) for _, l in self.masked_layers()]

    def mask_sizes(self) -> int:
        """Number of mask entries (weights for DGMw, channels for DGMa) over the masked layers."""
        return sum(l.scores.numel() for _, l in self.masked_layers())

    # --------------------------------------------------------------------------------------------------
    def make_input(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise with the one-hot label written over its first n_classes entries, shaped [N, nz, 1, 1]."""
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.shape[1:] != (self.nz, 1, 1):
            raise ValueError(f"z must be [N, {self.nz}] or [N, {self.nz}, 1, 1], got {tuple(z.shape)}")
        if labels.shape != (z.shape[0],):
            raise ValueError(f"labels must be [{z.shape[0]}] (one per noise vector), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"labels must lie in [0, {self.n_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        z = z.clone()
        z[:, : self.n_classes, 0, 0] = F.one_hot(labels, self.n_classes).to(z.dtype)
        return z

    def forward(self, z: torch.Tensor, labels: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Images of classes ``labels`` (positions in the class order) generated as ``task`` does.

        ``task=None``: the task being trained (live scores, current widths). A finished task (one the ledger has
        committed) computes with its stored binary masks and widths, without gradient.
        """
        h = self.make_input(z, labels)
        if task is None:
            task = self.num_heads - 1
            if task < 0:
                raise RuntimeError("the generator has no task modules yet: call add_task_modules() first")
        if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < self.num_heads:
            raise ValueError(f"task must be an int in [0, {self.num_heads}), got {task!r}")
        if task < self.ledger.num_tasks:
            return self._forward_finished(h, task)
        return self._forward_live(h, task)

    def forward_live(self, h: torch.Tensor) -> torch.Tensor:
        """The task being trained, from :meth:`make_input`'s output: what ``config.compile`` compiles (the label
        check of ``make_input`` reads tensor values, which would split the compiled graph)."""
        return self._forward_live(h, self.num_heads - 1)

    # --------------------------------------------------------------------------------------------------
    def commit_and_expand(self) -> dict:
        """End of a task: binarise and store its masks, grow the layers (see the class's expansion rule).

        Returns ``{"new_reserved": {layer: n}, "plan": {layer: channels gained}, "widths": new widths}``.
        """
        task = self.ledger.num_tasks
        counts = self.ledger.commit_task(task)
        plan = self.expansion_plan(counts)
        self.ledger.grow(plan)
        return {"new_reserved": {n: int(c[0]) for n, c in counts.items()}, "plan": dict(plan),
                "widths": list(self.widths())}

    def expansion_plan(self, counts: dict) -> dict[str, int]:
        return self.ledger.expansion_plan(counts)


def _check_generator_args(method, nz, n_classes, gate_after_bn, **sizes) -> bool:
    """Validate a generator's sizes; returns where the DGMa gate sits (after BN unless said otherwise)."""
    for name, value in (("nz", nz), *sizes.items(), ("n_classes", n_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if n_classes > nz:
        raise ValueError(f"n_classes ({n_classes}) must be <= nz ({nz}): the label overwrites z[:, :n_classes]")
    if gate_after_bn is None:
        gate_after_bn = method == "dgma"
    if gate_after_bn and method != "dgma":
        raise ValueError("gate_after_bn applies to method='dgma' only (DGMw masks weights, not channels)")
    return bool(gate_after_bn)


class Generator(_MaskedGenerator):
    """DGM's masked conditional generator for 32x32 images (see the module docstring).

    Args:
        method: ``"dgmw"`` (per-weight masks) or ``"dgma"`` (per-channel gates).
        nz: noise size (128 in DGM).
        ngf: width of the third masked layer (the first two have 4x and 2x); default 6 (DGMw) / 20 (DGMa).
        nc: image channels.
        n_classes: classes of the whole data set (the one-hot label overwrites ``z[:, :n_classes]``).
        mask_mode: ``"anneal"`` (m = sigmoid(s e), faithful) or ``"ste"`` (hard forward, straight-through).
        gate_after_bn: DGMa only: gate after BatchNorm (default) instead of before (the authors' way; see the
            module docstring). None: True for DGMa, False for DGMw.
        backend: dgm_kernels backend of the masked layers (None: the process default).
    """

    layer_names = LAYER_NAMES

    def __init__(self, method: str = "dgmw", *, nz: int = 128, ngf: int | None = None, nc: int = 1,
                 n_classes: int = 10, mask_mode: str = "anneal", gate_after_bn: bool | None = None,
                 backend: str | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        ngf = DEFAULT_NGF[method] if ngf is None else ngf
        self.gate_after_bn = _check_generator_args(method, nz, n_classes, gate_after_bn, ngf=ngf, nc=nc)
        self.method, self.nz, self.ngf, self.nc, self.n_classes = method, nz, ngf, nc, n_classes
        widths = (4 * ngf, 2 * ngf, ngf)
        specs = ((nz, widths[0], 1, 0), (widths[0], widths[1], 2, 1), (widths[1], widths[2], 2, 1))
        for i, (name, (cin, cout, stride, pad)) in enumerate(zip(LAYER_NAMES, specs)):
            if method == "dgmw":
                layer = dnn.MaskedConvTranspose2d(cin, cout, 4, stride, pad, bias=False, mode=mask_mode, backend=backend)
            else:
                # the noise is not masked: the first layer's weights are frozen by their output unit alone
                layer = dnn.GatedConvTranspose2d(cin, cout, 4, stride, pad, bias=False, input_masked=i > 0,
                                                 mode=mask_mode, backend=backend)
            self.add_module(name, layer)
        self.bns = nn.ModuleList()  # bns[t]: ModuleList of one BatchNorm2d per masked layer, task t's widths
        self.heads = nn.ModuleList()  # heads[t]: task t's output layer
        self.ledger = dk.MaskLedger(self.masked_layers(), backend=backend)

    # --------------------------------------------------------------------------------------------------
    def widths(self) -> tuple[int, ...]:
        """Current output widths of the masked layers."""
        return tuple(getattr(self, n).out_channels for n in LAYER_NAMES)

    def add_task_modules(self, device=None, widths=None) -> None:
        """BatchNorms and output layer for the next task, at the current widths (freshly initialised).

        ``widths``: other widths (to rebuild a finished task's modules when loading a checkpoint).
        """
        w = self.widths() if widths is None else tuple(int(c) for c in widths)
        self.bns.append(nn.ModuleList([nn.BatchNorm2d(c) for c in w]).to(device))
        self.heads.append(nn.ConvTranspose2d(w[-1], self.nc, 4, 2, 1, bias=False).to(device))

    # --------------------------------------------------------------------------------------------------
    def _forward_live(self, h, task):
        for (name, layer), bn in zip(self.masked_layers(), self.bns[task]):
            if self.method == "dgma" and self.gate_after_bn:
                h = layer(h, norm=bn)
            else:
                h = bn(layer(h))
            h = torch.relu(h)
        return torch.tanh(self.heads[task](h))

    @torch.no_grad()
    def _forward_finished(self, h, task):
        for name, bn in zip(LAYER_NAMES, self.bns[task]):
            if self.method == "dgma" and self.gate_after_bn:
                h = self.ledger.task_forward(name, h, task, norm=partial(_frozen_bn, bn))
            else:
                h = _frozen_bn(bn, self.ledger.task_forward(name, h, task))
            h = torch.relu(h)
        return torch.tanh(self.heads[task](h))

    # --------------------------------------------------------------------------------------------------
    def grow_to(self, widths) -> None:
        """Grow the (fresh) masked layers to ``widths`` (to load a checkpoint of a grown generator)."""
        plan = {n: int(w) - c for n, w, c in zip(LAYER_NAMES, widths, self.widths())}
        if any(v < 0 for v in plan.values()):
            raise ValueError(f"cannot shrink the generator from widths {self.widths()} to {tuple(widths)}")
        self.ledger.grow(plan)

    def task_widths(self, task: int) -> tuple[int, ...]:
        """Output widths of the masked layers for task ``task`` (finished or current)."""
        if task < self.ledger.num_tasks:
            return tuple(self.ledger.widths(n)[task][1] for n in LAYER_NAMES)
        return self.widths()

    def task_parameter_count(self, task: int) -> int:
        """Parameters task ``task`` computes with: its slice of the masked weights, its BN and its head."""
        w = self.task_widths(task)
        ins = (self.nz,) + w[:-1]
        masked = sum(i * o * 16 for i, o in zip(ins, w))
        bn = 2 * sum(w)
        head = w[-1] * self.nc * 16
        return masked + bn + head


def _frozen_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """A finished task's BatchNorm: always its running statistics, never updated, whatever the module's mode."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

# ------------------------------------------------------------------------------------------------------
class _Trunk(nn.Sequential):
    """Conv(nc->c1,k5,s2,p2)-LReLU, Conv(c1->c2)-BN-LReLU, Conv(c2->c3)-BN-LReLU, flatten (c3 * 4 * 4)."""

    def __init__(self, nc: int, widths=(32, 64, 128), batchnorm: bool = True):
        c1, c2, c3 = widths
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        super().__init__(
            nn.Conv2d(nc, c1, 5, 2, 2), nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, 5, 2, 2), norm(c2), nn.LeakyReLU(0.2),
            nn.Conv2d(c2, c3, 5, 2, 2), norm(c3), nn.LeakyReLU(0.2),
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
# ImageNet-50 (SPEC section 2): a residual generator and a ResNet-18 critic


RESIDUAL_BLOCKS = 3
#: masked layers of the residual generator, in forward order (the order of its MaskLedger)
RESIDUAL_LAYER_NAMES = ("stem",) + tuple(f"up{i}_{p}" for i in range(1, RESIDUAL_BLOCKS + 1) for p in ("a", "b"))
#: residual stream width of SPEC section 2 (linear 128 -> 4x4x64)
DEFAULT_STREAM_WIDTH = 64


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResidualGenerator(_MaskedGenerator):
    """DGM's masked conditional generator for ImageNet-50 (SPEC section 2): residual, 3x3 convolutions, 32x32.

    ::

        z [N, nz, 1, 1]  (first n_classes entries overwritten by the one-hot label)
          -> stem: masked ConvTranspose2d(nz, C, k4) on the 1x1 input       4x4xC  (= a bias-free linear nz -> 4x4xC)
          -> 3 x up-sampling residual block l (pre-activation):
                 x -> BN_t -> ReLU -> up2 -> up{l}_a: masked Conv2d(C, H_l, 3x3) -> BN_t -> ReLU
                   -> up{l}_b: masked Conv2d(H_l, C, 3x3)  (+)  up2(x)          8x8, 16x16, 32x32
          -> BN_t -> ReLU -> head_t: Conv2d(C, nc, 3x3) -> tanh                  32x32xnc

    C (``ngf``, default 64) is the width of the residual stream, H_l (``inner_width``, default C) the inner width of
    block l; up2 is nearest-neighbour 2x up-sampling, so the shortcut has no parameters. No biases (as the DCGAN
    generator). As there, the BatchNorms (7 per task) and the output layer are per task and unmasked.

    **Masking and growth.** :class:`dgm_kernels.MaskLedger` grows a *chain*: when layer l gains channels, layer
    l + 1's input grows alike. A residual network is not a chain: the stream's width C is read by every block and
    by the shortcut sums. Design: the stream keeps its width; only the inner width H_l of each block grows. The
    ledger holds the seven masked layers in forward order, ``stem, up1_a, up1_b, up2_a, up2_b, up3_a, up3_b``, and
    every plan gives 0 to the layers that write the stream (``stem``, ``up*_b``). With such a plan the chain rule
    is exactly right: ``up{l}_a`` gains g_l outputs, the next layer ``up{l}_b`` gains g_l inputs, and the layer
    after it (``up{l+1}_a``, reading the stream) gains none because ``up{l}_b`` gained no output. The expansion
    rule per block (``expansion_plan``):

    - DGMw: a new inner unit adds C * 9 weights to ``up_a`` (a new output row) and as many to ``up_b`` (a new
      input column), so ``g = ceil(max(n_a, n_b) / (9 C))``: the free capacity of both convolutions never
      shrinks (n = entries the finished task newly reserved in the layer).
    - DGMa: ``g = n_a``, DGM's rule for ``up_a``'s units. ``up_b``'s units are stream channels and do not grow;
      a reserved stream channel stays writable by later tasks through its weights from free inner units (DGMa
      freezes a weight only where both its units are reserved).
    - The stem and the stream are masked but never grow: their free capacity shrinks as tasks reserve entries (the
      sparsity regulariser keeps that slow). ``dgm info`` reports the reserved fraction per layer.

    **Freezing.** DGMw: every reserved weight is frozen (the masked optimizer skips it). DGMa: ``stem`` and
    ``up_a`` read an unmasked input (the noise, the stream), so a reserved output unit freezes all its weights;
    ``up_b`` reads the gated inner units (``input_masked``), so its weight is frozen where its inner and its stream
    unit are both reserved. The gates of ``stem`` and ``up_b`` multiply their outputs (no BatchNorm follows them
    directly: they feed the stream); ``up_a``'s gate sits after its BatchNorm when ``gate_after_bn`` (default for
    DGMa: a closed inner unit then emits exactly 0) or before it (the authors' DCGAN position; a closed unit then
    emits ReLU(beta) through weights that may still train, so old tasks may drift, as in :class:`Generator`).

    A finished task computes with its stored binary masks, its inner widths, its BatchNorms (running statistics)
    and its head, through :meth:`dgm_kernels.MaskLedger.task_forward` / ``task_view``: bit-identical images after
    later tasks (tests/test_imagenet_variant.py).

    Args:
        method: ``"dgmw"`` (per-weight masks) or ``"dgma"`` (per-channel gates).
        nz: noise size (128).
        ngf: residual stream width C (default 64).
        inner_width: initial inner width of every block (default C).
        nc: image channels (3).
        n_classes: classes of the whole data set (the one-hot label overwrites ``z[:, :n_classes]``).
        mask_mode, gate_after_bn, backend: as for :class:`Generator`.
    """

    layer_names = RESIDUAL_LAYER_NAMES

    def __init__(self, method: str = "dgmw", *, nz: int = 128, ngf: int | None = None, inner_width: int | None = None,
                 nc: int = 3, n_classes: int = 50, mask_mode: str = "anneal", gate_after_bn: bool | None = None,
                 backend: str | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        ngf = DEFAULT_STREAM_WIDTH if ngf is None else ngf
        inner_width = ngf if inner_width is None else inner_width
        self.gate_after_bn = _check_generator_args(method, nz, n_classes, gate_after_bn, ngf=ngf,
                                                   inner_width=inner_width, nc=nc)
        self.method, self.nz, self.ngf, self.nc, self.n_classes = method, nz, ngf, nc, n_classes
        self.inner_width = inner_width
        kw = dict(bias=False, mode=mask_mode, backend=backend)
        if method == "dgmw":
            self.stem = dnn.MaskedConvTranspose2d(nz, ngf, 4, 1, 0, **kw)
        else:
            self.stem = dnn.GatedConvTranspose2d(nz, ngf, 4, 1, 0, input_masked=False, **kw)
        for a, b in self._block_names():
            if method == "dgmw":
                self.add_module(a, dnn.MaskedConv2d(ngf, inner_width, 3, 1, 1, **kw))
                self.add_module(b, dnn.MaskedConv2d(inner_width, ngf, 3, 1, 1, **kw))
            else:
                # up_a reads the stream (not a gated unit of one layer): its output units alone freeze its weights
                self.add_module(a, dnn.GatedConv2d(ngf, inner_width, 3, 1, 1, input_masked=False, **kw))
                self.add_module(b, dnn.GatedConv2d(inner_width, ngf, 3, 1, 1, input_masked=True, **kw))
        self.bns = nn.ModuleList()  # bns[t]: the 7 BatchNorms of task t (see _task_bn_widths)
        self.heads = nn.ModuleList()  # heads[t]: task t's output layer
        self.ledger = dk.MaskLedger(self.masked_layers(), backend=backend)

    @staticmethod
    def _block_names() -> list[tuple[str, str]]:
        return [(f"up{i}_a", f"up{i}_b") for i in range(1, RESIDUAL_BLOCKS + 1)]

    # --------------------------------------------------------------------------------------------------
    def widths(self) -> tuple[int, ...]:
        """Current inner widths H_1, H_2, H_3 of the residual blocks (what grows; the stream stays ``ngf``)."""
        return tuple(getattr(self, a).out_channels for a, _ in self._block_names())

    def task_widths(self, task: int) -> tuple[int, ...]:
        """Inner widths of the blocks for task ``task`` (finished or current)."""
        if task < self.ledger.num_tasks:
            return tuple(self.ledger.widths(a)[task][1] for a, _ in self._block_names())
        return self.widths()

    def _task_bn_widths(self, inner) -> list[int]:
        c = self.ngf
        return [w for h in inner for w in (c, h)] + [c]

    def add_task_modules(self, device=None, widths=None) -> None:
        """BatchNorms and output layer for the next task, at the current inner widths (freshly initialised).

        ``widths``: other inner widths (to rebuild a finished task's modules when loading a checkpoint).
        """
        w = self.widths() if widths is None else tuple(int(c) for c in widths)
        if len(w) != RESIDUAL_BLOCKS:
            raise ValueError(f"widths must hold {RESIDUAL_BLOCKS} inner widths, got {w}")
        self.bns.append(nn.ModuleList([nn.BatchNorm2d(c) for c in self._task_bn_widths(w)]).to(device))
        self.heads.append(nn.Conv2d(self.ngf, self.nc, 3, 1, 1, bias=False).to(device))

    def grow_to(self, widths) -> None:
        """Grow the (fresh) blocks to inner ``widths`` (to load a checkpoint of a grown generator)."""
        widths = tuple(int(w) for w in widths)
        if len(widths) != RESIDUAL_BLOCKS:
            raise ValueError(f"widths must hold {RESIDUAL_BLOCKS} inner widths, got {widths}")
        plan = {a: w - c for (a, _), w, c in zip(self._block_names(), widths, self.widths())}
        if any(v < 0 for v in plan.values()):
            raise ValueError(f"cannot shrink the generator from inner widths {self.widths()} to {widths}")
        self.ledger.grow(plan)

    def expansion_plan(self, counts: dict) -> dict[str, int]:
        """Channels each masked layer gains: only the blocks' ``up_a`` (their inner width); see the class docstring."""
        def n(name):
            c = counts[name]
            return int(c[0] if isinstance(c, tuple) else c)

        missing = [name for name in self.layer_names if name not in counts]
        if missing:
            raise ValueError(f"counts must hold every masked layer; missing {missing}")
        plan = {name: 0 for name in self.layer_names}
        for a, b in self._block_names():
            if self.method == "dgmw":
                conv = getattr(self, a)
                per_unit = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]  # = up_b's per input unit
                plan[a] = -(-max(n(a), n(b)) // per_unit)
            else:
                plan[a] = n(a)
        return plan

    def task_parameter_count(self, task: int) -> int:
        """Parameters task ``task`` computes with: its slice of the masked weights, its BNs and its head."""
        inner = self.task_widths(task)
        masked = self.nz * self.ngf * 16 + sum(2 * self.ngf * h * 9 for h in inner)
        bn = 2 * sum(self._task_bn_widths(inner))
        return masked + bn + self.ngf * self.nc * 9

    # --------------------------------------------------------------------------------------------------
    def _forward_live(self, h, task):
        bns = self.bns[task]
        x = self.stem(h)
        for i, (a, b) in enumerate(self._block_names()):
            y = _upsample(torch.relu(bns[2 * i](x)))
            conv_a = getattr(self, a)
            y = conv_a(y, norm=bns[2 * i + 1]) if self.gate_after_bn else bns[2 * i + 1](conv_a(y))
            x = _upsample(x) + getattr(self, b)(torch.relu(y))
        return torch.tanh(self.heads[task](torch.relu(bns[-1](x))))

    @torch.no_grad()
    def _forward_finished(self, h, task):
        bns, ledger = self.bns[task], self.ledger
        x = ledger.task_forward("stem", h, task)
        for i, (a, b) in enumerate(self._block_names()):
            y = _upsample(torch.relu(_frozen_bn(bns[2 * i], x)))
            if self.gate_after_bn:
                y = ledger.task_forward(a, y, task, norm=partial(_frozen_bn, bns[2 * i + 1]))
            else:
                y = _frozen_bn(bns[2 * i + 1], ledger.task_forward(a, y, task))
            x = _upsample(x) + ledger.task_forward(b, torch.relu(y), task)
        return torch.tanh(self.heads[task](torch.relu(_frozen_bn(bns[-1], x))))


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
    """The generator of ``architecture`` (``inner_width`` applies to ``resnet`` only)."""
    _check_architecture(architecture)
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
