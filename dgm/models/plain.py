"""The generator of the generative-replay rivals (DGR, MeRGAN): DGM's DCGAN stack without masks.

One network for every task: it does not grow, has no ledger, and its BatchNorms and output layer are shared by all
tasks (what keeps an old class is replay into the next task's training, :mod:`dgm.rivals`, not masks). The
interface is the masked generators' where the training loop, the checkpoint and the replay code meet it
(``forward(z, labels, task)``, ``add_task_modules``, ``commit_and_expand``, ``widths``, ``num_heads``,
``num_tasks``, ``task_widths``, ``task_parameter_count``); ``task`` is accepted and ignored, since every task is the
same network.
"""
from __future__ import annotations

import torch
from torch import nn

from dgm_kernels import nn as dnn

from .generator import LAYER_NAMES, check_generator_args, generator_input

__all__ = ["PlainGenerator", "PLAIN_NGF"]

#: the rivals' default width (80/40/20 channels): DGMa's initial width in SPEC section 2, and about the size DGMw's
#: generator reaches after 10 MNIST tasks (docs/results.md), so that the comparison is not one of capacity
PLAIN_NGF = 20


class PlainGenerator(nn.Module):
    """DGM's 32x32 DCGAN generator (SPEC section 2) without masks.

    Args:
        nz: noise size; ngf: width of the third layer (the first two have 4x and 2x); nc: image channels;
        n_classes: classes of the whole data set; conditional: the one-hot label overwrites ``z[:, :n_classes]``
            as in DGM (MeRGAN), or the label is ignored (DGR's unconditional generator);
        backend: dgm_kernels backend of the output layer (its CPU kernel for one output channel).
    """

    ledger = None  # no masks to keep
    layer_names = LAYER_NAMES

    def __init__(self, *, nz: int = 128, ngf: int = PLAIN_NGF, nc: int = 1, n_classes: int = 10,
                 conditional: bool = True, backend: str | None = None):
        super().__init__()
        check_generator_args("dgmw", nz, n_classes, None, ngf=ngf, nc=nc)
        self.nz, self.ngf, self.nc, self.n_classes, self.conditional = nz, ngf, nc, n_classes, bool(conditional)
        w = (4 * ngf, 2 * ngf, ngf)
        specs = ((nz, w[0], 1, 0), (w[0], w[1], 2, 1), (w[1], w[2], 2, 1))
        for name, (cin, cout, stride, pad) in zip(LAYER_NAMES, specs):
            self.add_module(name, nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False))
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in w])
        self.head = dnn.ConvTranspose2d(w[-1], nc, 4, 2, 1, bias=False, backend=backend)
        # tasks finished (a buffer, so that a checkpoint's state dict restores it)
        self.register_buffer("tasks_finished", torch.zeros((), dtype=torch.int64))
        self._tasks = 0  # tasks begun (add_task_modules); a checkpoint rebuilds it by calling that once per task

    # --------------------------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self._tasks

    @property
    def num_tasks(self) -> int:
        return int(self.tasks_finished)

    def widths(self) -> tuple[int, ...]:
        return tuple(getattr(self, n).out_channels for n in LAYER_NAMES)

    def task_widths(self, task: int) -> tuple[int, ...]:
        return self.widths()

    def task_parameter_count(self, task: int) -> int:
        return sum(p.numel() for p in self.parameters())

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return list(self.parameters())

    def mask_sizes(self) -> int:
        return 0  # no mask entries

    def set_backend(self, backend: str | None) -> None:
        self.head.backend = backend

    def set_schedule(self, s: float, s_max: float | None) -> None:
        """Nothing to anneal (no masks); present so that the training loop treats every generator alike."""

    def add_task_modules(self, device=None, widths=None) -> None:
        """A new task trains the same network: only the count of tasks begun changes."""
        if widths is not None and tuple(int(c) for c in widths) != self.widths():
            raise ValueError(f"the plain generator does not grow: widths {self.widths()}, asked {tuple(widths)}")
        self._tasks += 1

    def grow_to(self, widths) -> None:
        if tuple(int(c) for c in widths) != self.widths():
            raise ValueError(f"the plain generator does not grow: widths {self.widths()}, asked {tuple(widths)}")

    def commit_and_expand(self) -> dict:
        """End of a task: nothing to commit or grow; the same record as a masked generator's, empty."""
        self.tasks_finished += 1
        return {"new_reserved": {}, "plan": {}, "widths": list(self.widths())}

    # --------------------------------------------------------------------------------------------------
    def make_input(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return generator_input(z, labels if self.conditional else None, self.nz, self.n_classes)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Images of classes ``labels`` (ignored when unconditional); ``task`` is ignored (one network)."""
        if labels.shape[:1] != z.shape[:1]:
            raise ValueError(f"labels must be [{z.shape[0]}] (one per noise vector), got {tuple(labels.shape)}")
        return self.forward_live(self.make_input(z, labels))

    def forward_live(self, h: torch.Tensor) -> torch.Tensor:
        for name, bn in zip(LAYER_NAMES, self.bns):
            h = torch.relu(bn(getattr(self, name)(h)))
        return torch.tanh(self.head(h))
