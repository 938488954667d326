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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dgm_kernels as dk
from dgm_kernels import nn as dnn

__all__ = ["Generator", "Discriminator", "Classifier", "METHODS", "count_parameters"]

METHODS = ("dgmw", "dgma")
#: ngf (the width of the last masked layer; the others are 2x and 4x) of each method (SPEC section 2)
DEFAULT_NGF = {"dgmw": 6, "dgma": 20}
LAYER_NAMES = ("conv1", "conv2", "conv3")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Generator(nn.Module):
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

    def __init__(self, method: str = "dgmw", *, nz: int = 128, ngf: int | None = None, nc: int = 1,
                 n_classes: int = 10, mask_mode: str = "anneal", gate_after_bn: bool | None = None,
                 backend: str | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        ngf = DEFAULT_NGF[method] if ngf is None else ngf
        for name, value in (("nz", nz), ("ngf", ngf), ("nc", nc), ("n_classes", n_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_classes > nz:
            raise ValueError(f"n_classes ({n_classes}) must be <= nz ({nz}): the label overwrites z[:, :n_classes]")
        if gate_after_bn is None:
            gate_after_bn = method == "dgma"
        if gate_after_bn and method != "dgma":
            raise ValueError("gate_after_bn applies to method='dgma' only (DGMw masks weights, not channels)")
        self.method, self.nz, self.ngf, self.nc, self.n_classes = method, nz, ngf, nc, n_classes
        self.gate_after_bn = bool(gate_after_bn)
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
    def masked_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, getattr(self, n)) for n in LAYER_NAMES]

    def widths(self) -> tuple[int, ...]:
        """Current output widths of the masked layers."""
        return tuple(getattr(self, n).out_channels for n in LAYER_NAMES)

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

    def add_task_modules(self, device=None, widths=None) -> None:
        """BatchNorms and output layer for the next task, at the current widths (freshly initialised).

        ``widths``: other widths (to rebuild a finished task's modules when loading a checkpoint).
        """
        w = self.widths() if widths is None else tuple(int(c) for c in widths)
        self.bns.append(nn.ModuleList([nn.BatchNorm2d(c) for c in w]).to(device))
        self.heads.append(nn.ConvTranspose2d(w[-1], self.nc, 4, 2, 1, bias=False).to(device))

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
        for (name, layer), bn in zip(self.masked_layers(), self.bns[task]):
            if self.method == "dgma" and self.gate_after_bn:
                h = self._gate_after_bn_live(layer, h, bn)
            else:
                h = bn(layer(h))
            h = torch.relu(h)
        return torch.tanh(self.heads[task](h))

    def _gate_after_bn_live(self, layer, h, bn):
        # the convolution with an always-open gate (still blocking the frozen weights' gradient), BN, then the gate
        ones = torch.ones_like(layer.scores)
        y = dk.gated_conv_transpose2d(h, layer.weight, ones, 1.0, layer.frozen_out, layer.frozen_in,
                                      stride=layer.stride, padding=layer.padding, mode="ste", backend=layer.backend)
        m = dk.mask(layer.scores, layer.s, mode=layer.mode, s_max=layer.s_max, backend=layer.backend)
        return bn(y) * m.view(1, -1, 1, 1)

    @torch.no_grad()
    def _forward_finished(self, h, task):
        for (name, layer), bn in zip(self.masked_layers(), self.bns[task]):
            if self.method == "dgma" and self.gate_after_bn:
                view = self.ledger.task_view(name, task)
                y = F.conv_transpose2d(h, view.weight, None, layer.stride, layer.padding)
                h = _frozen_bn(bn, y) * view.mask.to(y.dtype).view(1, -1, 1, 1)
            else:
                h = _frozen_bn(bn, self.ledger.task_forward(name, h, task))
            h = torch.relu(h)
        return torch.tanh(self.heads[task](h))

    # --------------------------------------------------------------------------------------------------
    def commit_and_expand(self) -> dict:
        """End of a task: binarise and store its masks, grow the layers to keep the free capacity constant.

        Returns ``{"new_reserved": {layer: n}, "plan": {layer: channels gained}, "widths": new widths}``.
        """
        task = self.ledger.num_tasks
        counts = self.ledger.commit_task(task)
        plan = self.ledger.expansion_plan(counts)
        self.ledger.grow(plan)
        return {"new_reserved": {n: int(c[0]) for n, c in counts.items()}, "plan": dict(plan),
                "widths": list(self.widths())}

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


class Discriminator(nn.Module):
    """D of SPEC section 2: a conv trunk (2048 features), a WGAN critic head and an auxiliary classifier head.

    ``widths`` (default 32/64/128, the paper's) may be narrowed for fast presets.
    """

    def __init__(self, nc: int = 1, classes: int = 0, widths=(32, 64, 128)):
        super().__init__()
        self.trunk = _Trunk(nc, widths)
        self.critic_head = nn.Linear(self.trunk.features, 1)
        self.aux_head = _GrowingHead(self.trunk.features, classes)

    def critic(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.trunk(x)).squeeze(1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux_head(self.trunk(x))

    def grow_classes(self, classes: int) -> None:
        self.aux_head.grow(classes)

    @property
    def classes(self) -> int:
        return self.aux_head.classes


class Classifier(nn.Module):
    """A separate classifier (same trunk design as D, its own weights and head), for the stable presets."""

    def __init__(self, nc: int = 1, classes: int = 0, widths=(32, 64, 128)):
        super().__init__()
        self.trunk = _Trunk(nc, widths)
        self.aux_head = _GrowingHead(self.trunk.features, classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux_head(self.trunk(x))

    def grow_classes(self, classes: int) -> None:
        self.aux_head.grow(classes)

    @property
    def classes(self) -> int:
        return self.aux_head.classes

