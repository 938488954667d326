"""The ImageNet-50 generator: a stem and up-sampling residual blocks whose inner widths grow (see its docstring)."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dgm_kernels import nn as dnn
import dgm_kernels as dk

from ..names import MASKED_METHODS
from .generator import MaskedGenerator, check_generator_args, frozen_bn

# ------------------------------------------------------------------------------------------------------
# ImageNet-50 (SPEC section 2): a residual generator and a ResNet-18 critic


RESIDUAL_BLOCKS = 3
#: masked layers of the residual generator, in forward order (the order of its MaskLedger)
RESIDUAL_LAYER_NAMES = ("stem",) + tuple(f"up{i}_{p}" for i in range(1, RESIDUAL_BLOCKS + 1) for p in ("a", "b"))
#: residual stream width of SPEC section 2 (linear 128 -> 4x4x64)
DEFAULT_STREAM_WIDTH = 64


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResidualGenerator(MaskedGenerator):
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
    later tasks (tests/dgm/test_imagenet_variant.py).

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
        if method not in MASKED_METHODS:
            raise ValueError(f"method must be one of {MASKED_METHODS}, got {method!r}")
        ngf = DEFAULT_STREAM_WIDTH if ngf is None else ngf
        inner_width = ngf if inner_width is None else inner_width
        self.gate_after_bn = check_generator_args(method, nz, n_classes, gate_after_bn, ngf=ngf,
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
            y = _upsample(torch.relu(frozen_bn(bns[2 * i], x)))
            if self.gate_after_bn:
                y = ledger.task_forward(a, y, task, norm=partial(frozen_bn, bns[2 * i + 1]))
            else:
                y = frozen_bn(bns[2 * i + 1], ledger.task_forward(a, y, task))
            x = _upsample(x) + ledger.task_forward(b, torch.relu(y), task)
        return torch.tanh(self.heads[task](torch.relu(frozen_bn(bns[-1], x))))
