"""The masked generators' common base and DGM's DCGAN generator for 32x32 images (the package docstring says how
they are built and why)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import dgm_kernels as dk
from dgm_kernels import nn as dnn

from ..names import MASKED_METHODS

DEFAULT_NGF = {"dgmw": 6, "dgma": 20}
LAYER_NAMES = ("conv1", "conv2", "conv3")


def generator_input(z: torch.Tensor, labels: torch.Tensor | None, nz: int, n_classes: int) -> torch.Tensor:
    """``z`` shaped [N, nz, 1, 1], with the one-hot ``labels`` written over its first ``n_classes`` entries
    (``labels`` None: the noise alone, for an unconditional generator)."""
    if z.dim() == 2:
        z = z[:, :, None, None]
    if z.shape[1:] != (nz, 1, 1):
        raise ValueError(f"z must be [N, {nz}] or [N, {nz}, 1, 1], got {tuple(z.shape)}")
    if labels is None:
        return z
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be [{z.shape[0]}] (one per noise vector), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{int(labels.min())}, {int(labels.max())}]")
    z = z.clone()
    z[:, :n_classes, 0, 0] = F.one_hot(labels, n_classes).to(z.dtype)
    return z


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MaskedGenerator(nn.Module):
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

    @property
    def num_tasks(self) -> int:
        """Finished (committed) tasks."""
        return self.ledger.num_tasks

    def set_backend(self, backend: str | None) -> None:
        for _, layer in self.masked_layers():
            layer.backend = backend
        for head in self.heads:
            head.backend = backend
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
        return generator_input(z, labels, self.nz, self.n_classes)

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


def check_generator_args(method, nz, n_classes, gate_after_bn, **sizes) -> bool:
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


class Generator(MaskedGenerator):
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
        if method not in MASKED_METHODS:
            raise ValueError(f"method must be one of {MASKED_METHODS}, got {method!r}")
        ngf = DEFAULT_NGF[method] if ngf is None else ngf
        self.gate_after_bn = check_generator_args(method, nz, n_classes, gate_after_bn, ngf=ngf, nc=nc)
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
        # dk.nn.ConvTranspose2d: torch's layer with the backend's algorithm (on the CPU, to 1 channel, this
        # library's kernels; docs/performance.md)
        self.heads.append(dnn.ConvTranspose2d(w[-1], self.nc, 4, 2, 1, bias=False, backend=self.ledger.backend)
                          .to(device))

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
                h = self.ledger.task_forward(name, h, task, norm=partial(frozen_bn, bn))
            else:
                h = frozen_bn(bn, self.ledger.task_forward(name, h, task))
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


def frozen_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """A finished task's BatchNorm: always its running statistics, never updated, whatever the module's mode."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
