"""HAT (Serra et al., ICML 2018) on split MNIST with dgm_kernels: 5 tasks of two digits, one head per task.

    python examples/hat_split_mnist.py                  # the library's numerics: old tasks stay bit-identical
    python examples/hat_split_mnist.py --hat-numerics   # HAT's own numerics: soft blocking, its float derivative
    python examples/hat_split_mnist.py --synthetic --epochs 1   # no MNIST needed (a smoke run)

HAT gates each hidden unit with sigmoid(s e_t), one learned embedding e_t per task. Within an epoch s anneals from
1/s_max to s_max (``dk.hat_scale``); the embeddings' gradient is compensated for s (the layers' ``s_max``) and the
embeddings are clamped to [-6, 6] after each step (``dk.clamp_scores_``); a regulariser keeps each task's gates
sparse where earlier tasks left units free (``dk.sparsity_regularizer`` on the masks the forward returns); after a
task, its gates protect the units it uses from later tasks. Where this happens and how, by ``hat_numerics``:

- False (default): the task's binary mask 1[e >= 0] is committed to a ``MaskLedger``; the layers block the
  gradients of reserved units, the masked optimizer leaves them bit-identical, old tasks run with their stored
  bits (``ledger.task_forward``); the mask's gradient is the library's stable one.
- True: HAT's own arithmetic, to reproduce its numbers: the gradients are scaled by 1 - min(M_out, M_in) with M the
  soft cumulative mask max_t sigmoid(s_max e_t) (``dk.soft_block_gradients_``), the regulariser takes that soft M,
  the mask's derivative is HAT's ``s y (1 - y)`` (``layer.derivative = "hat"``), and old tasks run with the soft gate
  sigmoid(s_max e_t) of their saved embeddings; plain SGD. Old tasks then drift a little, as in HAT.
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
    hidden: int = 400          # HAT's MLP has 2 layers of 2000 units; 400 keeps a CPU run within minutes
    epochs: int = 3            # per task; HAT trains up to 200 with early stopping on a validation set
    batch_size: int = 64       # HAT's sbatch
    lr: float = 0.05           # HAT's SGD learning rate (it divides it by 3 on plateaus; fixed here)
    lamb: float = 0.75         # HAT's c, the regulariser's weight
    s_max: float = 400.0       # HAT's s_max
    clip_grad: float = 10000.0  # HAT's gradient-norm clip
    drop_in: float = 0.2       # HAT's MLP dropout on the input ...
    drop_hidden: float = 0.5   # ... and on the hidden units
    hat_numerics: bool = False
    backend: str = "reference"


class HatMLP(nn.Module):
    """HAT's MLP: two gated hidden layers and one head per task (multi-head: the task id is given at test time)."""

    def __init__(self, in_features: int, hidden: int, tasks: int, classes_per_task: int, *, drop_in=0.2,
                 drop_hidden=0.5, backend="reference"):
        super().__init__()
        # the input is not gated: fc1's weights are protected by their output unit alone
        self.fc1 = dnn.GatedLinear(in_features, hidden, input_masked=False, backend=backend)
        self.fc2 = dnn.GatedLinear(hidden, hidden, backend=backend)
        self.heads = nn.ModuleList(nn.Linear(hidden, classes_per_task) for _ in range(tasks))
        self.drop_in, self.drop_hidden = nn.Dropout(drop_in), nn.Dropout(drop_hidden)

    def gated(self):
        return [("fc1", self.fc1), ("fc2", self.fc2)]

    def forward(self, x, task):
        """Training forward: the logits of head ``task`` and the masks the gates applied (for the regulariser).
        relu(y m) = relu(y) m for m > 0, so gating before the ReLU is HAT's gating after it."""
        h = self.drop_in(x.flatten(1))
        h, m1 = self.fc1(h, return_mask=True)
        h = self.drop_hidden(F.relu(h))
        h, m2 = self.fc2(h, return_mask=True)
        h = self.drop_hidden(F.relu(h))
        return self.heads[task](h), [m1, m2]


class HAT:
    """The method around a :class:`HatMLP`: one task's training, the protection after it, prediction of any task."""

    def __init__(self, model: HatMLP, config: Config):
        self.model, self.config = model, config
        self.saved_scores: list[dict[str, torch.Tensor]] = []  # each task's embeddings (the ledger keeps bits)
        self.cumulative = None  # hat_numerics: the soft cumulative mask of each gated layer
        self.ledger = None if config.hat_numerics else dk.MaskLedger(model.gated(), backend=config.backend)
        for _, layer in model.gated():
            layer.s_max = config.s_max
            layer.derivative = "hat" if config.hat_numerics else "stable"

    def begin_task(self, scores: dict[str, torch.Tensor] | None = None) -> None:
        """The new task's embeddings: ``scores`` (per layer) or HAT's initialisation, N(0, 1)."""
        if self.ledger is not None:
            self.ledger.begin_task()  # opens the task (and syncs the frozen state); the values come next
        with torch.no_grad():
            for name, layer in self.model.gated():
                if scores is None:
                    nn.init.normal_(layer.scores)
                else:
                    layer.scores.copy_(scores[name])

    def optimizer(self):
        params = self.model.parameters()
        if self.ledger is None:
            return torch.optim.SGD(params, lr=self.config.lr)
        opt = dk.optim.MaskedSGD(params, lr=self.config.lr, backend=self.config.backend)
        self.ledger.attach(opt)  # reserved entries stay bit-identical under every update
        return opt

    def train_step(self, opt, task: int, x, y, s: float) -> float:
        cfg, model = self.config, self.model
        for _, layer in model.gated():
            layer.s = s
        logits, masks = model(x, task)
        if self.ledger is not None:
            reserved = [self.ledger.reserved_mask(n) for n, _ in model.gated()] if task else None
        else:
            reserved = self.cumulative
        reg = dk.sparsity_regularizer(masks, reserved, soft=cfg.hat_numerics, backend=cfg.backend)
        loss = F.cross_entropy(logits, y) + cfg.lamb * reg
        opt.zero_grad()
        loss.backward()
        if self.cumulative is not None:  # HAT's soft protection of what earlier tasks use
            dk.soft_block_gradients_(model.fc1, self.cumulative[0])
            dk.soft_block_gradients_(model.fc2, self.cumulative[1], self.cumulative[0])
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        dk.clamp_scores_(model)  # HAT's bound on the embeddings, |e| <= 6
        return loss.detach().item()

    def train_task(self, task: int, x, y, generator: torch.Generator, *, scores=None) -> list[float]:
        """Train task ``task`` on ``(x, y)`` (labels local to the task) and protect it; the batches' order comes from
        ``generator``. Returns the losses."""
        cfg = self.config
        self.begin_task(scores)
        opt = self.optimizer()
        self.model.train()
        n, losses = x.shape[0], []
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                # HAT's schedule counts samples: s = (s_max - 1/s_max) start / n + 1/s_max
                losses.append(self.train_step(opt, task, x[idx], y[idx], dk.hat_scale(start, n, cfg.s_max)))
        self.end_task(task)
        return losses

    def end_task(self, task: int) -> None:
        gated = self.model.gated()
        self.saved_scores.append({n: layer.scores.detach().clone() for n, layer in gated})
        if self.ledger is not None:
            self.ledger.commit_task(task)
            return
        with torch.no_grad():
            masks = [dk.mask(layer.scores, self.config.s_max, backend=self.config.backend) for _, layer in gated]
        self.cumulative = masks if self.cumulative is None else [torch.maximum(c, m) for c, m in zip(self.cumulative, masks)]

    @torch.no_grad()
    def predict(self, x, task: int) -> torch.Tensor:
        """The logits of task ``task``, computed as that task does after training (dropout off)."""
        h = x.flatten(1)
        for name, layer in self.model.gated():
            if self.ledger is not None:
                h = self.ledger.task_forward(name, h, task)  # the task's stored bits
            else:  # HAT's test-time gate sigmoid(s_max e_t), on the weights as they are now
                h = dk.gated_linear(h, layer.weight, self.saved_scores[task][name], self.config.s_max,
                                    bias=layer.bias, backend=self.config.backend)
            h = F.relu(h)
        return self.model.heads[task](h)


def accuracy(method, task, x, y) -> float:
    return float((method.predict(x, task).argmax(1) == y).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hat-numerics", action="store_true", help="HAT's own soft blocking and float derivative")
    add_common_arguments(p, Config.epochs, Config.hidden)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = Config(hidden=args.hidden, epochs=args.epochs, hat_numerics=args.hat_numerics)
    tasks = load_tasks(args.synthetic, args.max_train_per_class)
    model = HatMLP(tasks[0][0][0].numel(), cfg.hidden, len(tasks), 2, drop_in=cfg.drop_in,
                   drop_hidden=cfg.drop_hidden, backend=cfg.backend)
    method = HAT(model, cfg)
    g = torch.Generator().manual_seed(args.seed)
    start, first_logits = time.perf_counter(), None
    for t, (x, y, xt, yt) in enumerate(tasks):
        tic = time.perf_counter()
        method.train_task(t, x, y, g)
        if t == 0:
            first_logits = method.predict(tasks[0][2], 0)
        accs = [accuracy(method, k, tasks[k][2], tasks[k][3]) for k in range(t + 1)]
        print(f"task {t}: {time.perf_counter() - tic:.1f} s, accuracy of tasks 0..{t}: "
              + " ".join(f"{100 * a:.2f}" for a in accs), flush=True)
    drift = (method.predict(tasks[0][2], 0) - first_logits).abs().max().item()
    summary = dict(method="hat", config=asdict(cfg), accuracy_after_last=[round(100 * a, 2) for a in accs],
                   mean_accuracy=round(100 * sum(accs) / len(accs), 2), seconds=round(time.perf_counter() - start, 1),
                   task0_logit_drift=drift)
    print(f"mean accuracy after the last task: {summary['mean_accuracy']:.2f} %; task 0's logits changed by at most "
          f"{drift:.3g} since it was trained; {summary['seconds']} s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
