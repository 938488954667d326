"""Piggyback (Mallya, Davis and Lazebnik, ECCV 2018) on split MNIST with dgm_kernels: one frozen backbone, a
binary mask per task learned over its weights, one head per task.

    python examples/piggyback_split_mnist.py
    python examples/piggyback_split_mnist.py --synthetic --epochs 1   # no MNIST needed (a smoke run)

Piggyback never changes a pretrained network: for each new task it learns a real-valued score per weight,
binarised in the forward (weight used where the score passes a threshold) and trained through the binarisation
with a straight-through estimator; only the binary mask (1 bit per weight) and a head are kept per task. Here the
backbone is trained on the first task (Piggyback's is pretrained on ImageNet), and the four later tasks learn masks.

With the library: ``MaskedLinear`` in ``"ste"`` mode is the binarised mask with its straight-through gradient
(threshold 0; the scores start at ``init`` > 0, every weight used, as Piggyback's 1e-2 above its 5e-3 threshold);
committing the first task with every score positive reserves every weight, so the ledger freezes the whole
backbone; each later task's mask is committed as bits and replayed by ``ledger.task_forward``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import dgm_kernels as dk
from dgm_kernels import nn as dnn
from split_mnist import add_common_arguments, load_tasks  # the examples' folder: on the path when a port runs as a script


@dataclass
class Config:
    hidden: int = 400
    backbone_epochs: int = 2  # training of the backbone on the first task
    epochs: int = 2           # mask training, per later task
    batch_size: int = 64
    lr: float = 1e-3          # Adam on the backbone
    mask_lr: float = 1e-3     # Adam on the scores and the head (Piggyback: 1e-4 on VGG over 30+ epochs)
    init: float = 5e-3        # the scores' start: Piggyback's 1e-2 minus its threshold 5e-3
    s: float = 4.0            # the straight-through slope s sigmoid'(s e) is s / 4 = 1 at the threshold, as
                              # Piggyback's identity (it decays away from it)
    backend: str = "reference"


class PiggybackMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, tasks: int, classes_per_task: int, backend="reference"):
        super().__init__()
        self.fc1 = dnn.MaskedLinear(in_features, hidden, mode="ste", backend=backend)
        self.fc2 = dnn.MaskedLinear(hidden, hidden, mode="ste", backend=backend)
        self.heads = nn.ModuleList(nn.Linear(hidden, classes_per_task) for _ in range(tasks))

    def masked(self):
        return [("fc1", self.fc1), ("fc2", self.fc2)]

    def forward(self, x, task):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.heads[task](h)


class Piggyback:
    def __init__(self, model: PiggybackMLP, config: Config):
        self.model, self.config = model, config
        self.ledger = dk.MaskLedger(model.masked(), backend=config.backend)
        for _, layer in model.masked():
            layer.s = config.s

    def _train(self, task, x, y, params, lr, epochs, generator) -> list[float]:
        cfg, model = self.config, self.model
        # after the first task the backbone is in no optimizer, and the layers, frozen by the ledger, give it no
        # gradient: a plain Adam over the scores and the head cannot touch it
        opt = torch.optim.Adam(params, lr=lr)
        model.train()
        losses = []
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx], task), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    def train_task(self, task: int, x, y, generator) -> list[float]:
        cfg, layers = self.config, [layer for _, layer in self.model.masked()]
        head = list(self.model.heads[task].parameters())
        # every score positive: every weight used (the backbone task's mask is all ones)
        self.ledger.begin_task(init=lambda e: e.fill_(cfg.init))
        if task == 0:
            for layer in layers:
                layer.scores.requires_grad_(False)
            params = [p for layer in layers for p in (layer.weight, layer.bias)] + head
            losses = self._train(task, x, y, params, cfg.lr, cfg.backbone_epochs, generator)
        else:
            for layer in layers:  # only the mask and the head learn; the backbone is frozen by the ledger
                layer.scores.requires_grad_(True)
            losses = self._train(task, x, y, [layer.scores for layer in layers] + head, cfg.mask_lr, cfg.epochs,
                                 generator)
        self.ledger.commit_task(task)
        return losses

    @torch.no_grad()
    def predict(self, x, task: int) -> torch.Tensor:
        h = x.flatten(1)
        for name, _ in self.model.masked():
            h = F.relu(self.ledger.task_forward(name, h, task))
        return self.model.heads[task](h)

    def used_fraction(self, task: int) -> dict[str, float]:
        return {n: self.ledger.task_view(n, task).mask.float().mean().item() for n, _ in self.model.masked()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, Config.epochs, Config.hidden)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = Config(hidden=args.hidden, epochs=args.epochs)
    tasks = load_tasks(args.synthetic, args.max_train_per_class)
    model = PiggybackMLP(tasks[0][0][0].numel(), cfg.hidden, len(tasks), 2, backend=cfg.backend)
    method = Piggyback(model, cfg)
    g = torch.Generator().manual_seed(args.seed)
    start, first_logits = time.perf_counter(), None
    for t, (x, y, xt, yt) in enumerate(tasks):
        tic = time.perf_counter()
        method.train_task(t, x, y, g)
        if t == 0:
            first_logits = method.predict(tasks[0][2], 0)
            backbone = [layer.weight.detach().clone() for _, layer in model.masked()]
        accs = [float((method.predict(tasks[k][2], k).argmax(1) == tasks[k][3]).float().mean()) for k in range(t + 1)]
        used = method.used_fraction(t)
        print(f"task {t}: {time.perf_counter() - tic:.1f} s, weights used " +
              ", ".join(f"{n} {100 * f:.1f} %" for n, f in used.items())
              + f"; accuracy of tasks 0..{t}: " + " ".join(f"{100 * a:.2f}" for a in accs), flush=True)
    drift = (method.predict(tasks[0][2], 0) - first_logits).abs().max().item()
    unchanged = all(torch.equal(b, layer.weight) for b, (_, layer) in zip(backbone, model.masked()))
    summary = dict(method="piggyback", config=asdict(cfg), accuracy_after_last=[round(100 * a, 2) for a in accs],
                   mean_accuracy=round(100 * sum(accs) / len(accs), 2), seconds=round(time.perf_counter() - start, 1),
                   mask_bytes=method.ledger.memory_bytes(), backbone_unchanged=unchanged, task0_logit_drift=drift)
    print(f"mean accuracy after the last task: {summary['mean_accuracy']:.2f} %; backbone bit-identical: {unchanged}; "
          f"masks and widths: {summary['mask_bytes']} bytes; {summary['seconds']} s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
