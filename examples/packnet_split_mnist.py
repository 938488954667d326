"""PackNet (Mallya and Lazebnik, CVPR 2018) on split MNIST with dgm_kernels: 5 tasks of two digits, one head per task.

    python examples/packnet_split_mnist.py              # keep 50 % of each layer's free weights per task
    python examples/packnet_split_mnist.py --keep 0.25 --epochs 2
    python examples/packnet_split_mnist.py --synthetic --epochs 1   # no MNIST needed (a smoke run)

PackNet packs several tasks into one network by pruning. For each task: train every weight that no earlier task
owns (the owned ones are used, but frozen); prune the task's weights by magnitude, per layer, to a fraction
``keep`` of the weights that were free; retrain what is kept; commit the task's binary mask (its kept weights plus
every earlier task's) and hand the pruned weights to the next task. At test time task t runs with its own mask.

With the library: ``MaskedLinear`` layers in ``"ste"`` mode hold the mask as scores of +1 (used) / -1 (pruned),
never trained; ``MaskLedger.commit_task`` stores each task's mask as bits and freezes what it reserved (the biases
with the first task, as PackNet does); ``MaskedAdam`` attached to the ledger leaves frozen weights bit-identical;
``ledger.task_forward`` runs a task with its stored bits.
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
    epochs: int = 2           # training of the free weights, per task
    retrain_epochs: int = 1   # after pruning
    keep: float = 0.5         # fraction of each layer's free weights the task keeps (PackNet prunes 50-75 %)
    batch_size: int = 64
    lr: float = 1e-3          # Adam (PackNet's VGG used SGD; an MLP on MNIST trains faster with Adam)
    backend: str = "reference"


class PackNetMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, tasks: int, classes_per_task: int, backend="reference"):
        super().__init__()
        self.fc1 = dnn.MaskedLinear(in_features, hidden, mode="ste", backend=backend)
        self.fc2 = dnn.MaskedLinear(hidden, hidden, mode="ste", backend=backend)
        self.heads = nn.ModuleList(nn.Linear(hidden, classes_per_task) for _ in range(tasks))
        for _, layer in self.masked():
            layer.scores.requires_grad_(False)  # the masks come from pruning, not from gradients

    def masked(self):
        return [("fc1", self.fc1), ("fc2", self.fc2)]

    def forward(self, x, task):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.heads[task](h)


class PackNet:
    def __init__(self, model: PackNetMLP, config: Config):
        self.model, self.config = model, config
        self.ledger = dk.MaskLedger(model.masked(), backend=config.backend)

    def _epochs(self, task, x, y, epochs, generator) -> list[float]:
        cfg, model = self.config, self.model
        params = [p for _, layer in model.masked() for p in (layer.weight, layer.bias)]
        opt = dk.optim.MaskedAdam(params + list(model.heads[task].parameters()), lr=cfg.lr, backend=cfg.backend)
        self.ledger.attach(opt)  # the weights earlier tasks own stay bit-identical
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

    def prune(self) -> dict[str, float]:
        """Per layer: of the weights no earlier task owns, keep the ``keep`` fraction of largest magnitude (mask +1)
        and hand the rest to later tasks (mask -1). Returns the fraction of the layer the task keeps anew."""
        kept = {}
        with torch.no_grad():
            for name, layer in self.model.masked():
                free = ~self.ledger.reserved_mask(name)
                magnitude = layer.weight.abs()[free]
                n_keep = int(round(self.config.keep * magnitude.numel()))
                keep = torch.zeros_like(free)
                if n_keep:
                    # ties at the threshold are broken by topk's order: exactly n_keep weights are kept
                    top = torch.topk(magnitude, n_keep).indices
                    chosen = torch.zeros(magnitude.numel(), dtype=torch.bool)
                    chosen[top] = True
                    keep[free] = chosen
                layer.scores.copy_(torch.where(free & ~keep, -1.0, 1.0))
                kept[name] = n_keep / free.numel()
        return kept

    def train_task(self, task: int, x, y, generator) -> dict:
        cfg = self.config
        # every weight in use while training: the earlier tasks' (frozen) and the free ones
        self.ledger.begin_task(init=lambda e: e.fill_(1.0))
        losses = self._epochs(task, x, y, cfg.epochs, generator)
        kept = self.prune()
        losses += self._epochs(task, x, y, cfg.retrain_epochs, generator)
        self.ledger.commit_task(task)
        return dict(losses=losses, kept=kept)

    @torch.no_grad()
    def predict(self, x, task: int) -> torch.Tensor:
        h = x.flatten(1)
        for name, _ in self.model.masked():
            h = F.relu(self.ledger.task_forward(name, h, task))  # the task's mask as stored, in bits
        return self.model.heads[task](h)

    def free_fraction(self) -> dict[str, float]:
        return {n: 1 - self.ledger.reserved_mask(n).float().mean().item() for n, _ in self.model.masked()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=float, default=Config.keep)
    add_common_arguments(p, Config.epochs, Config.hidden)
    args = p.parse_args(argv)
    if not 0 < args.keep <= 1:
        p.error(f"--keep must be in (0, 1], got {args.keep}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = Config(hidden=args.hidden, epochs=args.epochs, keep=args.keep)
    tasks = load_tasks(args.synthetic, args.max_train_per_class)
    model = PackNetMLP(tasks[0][0][0].numel(), cfg.hidden, len(tasks), 2, backend=cfg.backend)
    method = PackNet(model, cfg)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    first_logits = None
    for t, (x, y, xt, yt) in enumerate(tasks):
        tic = time.perf_counter()
        info = method.train_task(t, x, y, g)
        if t == 0:
            first_logits = method.predict(tasks[0][2], 0)
        accs = [float((method.predict(tasks[k][2], k).argmax(1) == tasks[k][3]).float().mean()) for k in range(t + 1)]
        print(f"task {t}: {time.perf_counter() - tic:.1f} s, kept anew "
              + ", ".join(f"{n} {100 * f:.1f} %" for n, f in info["kept"].items())
              + "; accuracy of tasks 0..{}: ".format(t) + " ".join(f"{100 * a:.2f}" for a in accs), flush=True)
    drift = (method.predict(tasks[0][2], 0) - first_logits).abs().max().item()
    summary = dict(method="packnet", config=asdict(cfg), accuracy_after_last=[round(100 * a, 2) for a in accs],
                   mean_accuracy=round(100 * sum(accs) / len(accs), 2), seconds=round(time.perf_counter() - start, 1),
                   free_after_last={n: round(f, 4) for n, f in method.free_fraction().items()},
                   mask_bytes=method.ledger.memory_bytes(), task0_logit_drift=drift)
    print(f"mean accuracy after the last task: {summary['mean_accuracy']:.2f} %; task 0's logits changed by at most "
          f"{drift:.3g}; {summary['seconds']} s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
