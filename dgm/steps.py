"""The pieces of one DGM task (SPEC section 5), shared by the training loop (:mod:`dgm.train`), the end-to-end
benchmarks (``benchmarks/e2e.py``, ``benchmarks/breakdown.py``) and ``scripts/classifier_study.py``.

- seeding: everything random in task t draws from generators seeded by (seed, t) (:func:`seed_everything`), so a
  run resumed after task t - 1 repeats an uninterrupted one;
- new networks of the configured architecture: :func:`new_critic`, :func:`new_classifier` (the generator:
  :func:`dgm.checkpoint.new_generator`, which a checkpoint also restores through);
- one step of each kind: :func:`critic_step` (WGAN-GP), :func:`generator_step` (adversarial loss plus the sparsity
  regulariser), :func:`classifier_step` (cross-entropy, optionally on :func:`random_shift`-ed images);
- :func:`prepare_task` (steps 1 and 2 of a task) and :class:`TaskStep` (one GAN iteration, step 3).
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import dgm_kernels as dk

from .models import build_classifier, build_discriminator
from .names import image_channels
from .plasticity import sparsity_loss, sparsity_weight
from .presets import RunConfig
from .replay import generate_replay

__all__ = ["task_seeds", "seed_everything", "new_critic", "new_classifier", "critic_step", "frozen_params",
           "generator_step", "random_shift", "classifier_step", "TaskStep", "prepare_task"]


# ------------------------------------------------------------------------------------------------------
# the networks of the configured architecture (SPEC section 2: ``dcgan`` for MNIST/SVHN/CIFAR, ``resnet`` for
# ImageNet-50)


def new_critic(config: RunConfig, device):
    """A freshly initialised critic (no class outputs yet: :meth:`grow_classes` adds them)."""
    nc = image_channels(config.dataset)
    return build_discriminator(config.architecture, nc, 0, config.critic_widths).to(device)


def new_classifier(config: RunConfig, device):
    """A freshly initialised separate classifier (``classifier`` ``separate``), without class outputs yet."""
    return build_classifier(config.architecture, image_channels(config.dataset), 0, config.classifier_widths,
                            batchnorm=config.classifier_batchnorm).to(device)


# ------------------------------------------------------------------------------------------------------
# seeding


def task_seeds(seed: int, task: int) -> tuple[int, int]:
    """Two independent seeds of task ``task`` of the run seeded ``seed``: (global generators, the task's own CPU
    generator)."""
    # task ids >= 10**6 name the run's other random streams (initial networks, grid noise)
    a, b = np.random.SeedSequence([int(seed), int(task), 0x44474D]).generate_state(2)
    return int(a), int(b)


def seed_everything(seed: int, task: int) -> torch.Generator:
    """Seed torch/numpy/random from (seed, task); returns the CPU generator of the task's batch order."""
    a, b = task_seeds(seed, task)
    torch.manual_seed(a)
    np.random.seed(a % 2**32)
    random.seed(a)
    return torch.Generator().manual_seed(b)


# ------------------------------------------------------------------------------------------------------
# one step of each kind


def critic_step(D, opt_d, x_real, fake, lambda_gp):
    """WGAN-GP: -mean D(x) + mean D(G(z)) + lambda_gp * E[(||grad D(x_hat)|| - 1)^2]."""
    opt_d.zero_grad(set_to_none=True)
    d_real = D.critic(x_real).mean()
    d_fake = D.critic(fake).mean()
    alpha = torch.rand(x_real.shape[0], 1, 1, 1, device=x_real.device)
    x_hat = (alpha * x_real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D.critic(x_hat).sum(), x_hat, create_graph=True)
    gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    loss = d_fake - d_real + lambda_gp * gp
    loss.backward()
    opt_d.step()
    return float(loss.detach()), float(gp.detach()), float((d_real - d_fake).detach())


@contextlib.contextmanager
def frozen_params(module):
    """No weight gradients for ``module`` inside the block (the generator step needs D's input gradient only)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def generator_step(G, D, opt_g, z, labels, reserved, lam):
    """-mean D(G(z)) + lambda_eff R; the masked layers compensate the scores' gradient (HAT) and block frozen
    weights, the masked optimizer leaves every frozen entry bit-identical. Returns (adversarial loss, R)."""
    with frozen_params(D):
        adv = -D.critic(G(z, labels)).mean()
    reg = sparsity_loss(G, reserved)
    opt_g.zero_grad(set_to_none=True)
    (adv + lam * reg).backward()
    opt_g.step()
    return float(adv.detach()), float(reg.detach())


def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` [B, C, H, W] moved by its own random offset of -pixels .. pixels in each direction; the
    border is padded by replication (the background, on MNIST-like data). Offsets are drawn from the CPU ``gen``."""
    if pixels == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    d = torch.randint(0, 2 * pixels + 1, (2, B), generator=gen).to(x.device)
    rows = (d[0][:, None] + torch.arange(H, device=x.device))[:, :, None]
    cols = (d[1][:, None] + torch.arange(W, device=x.device))[:, None, :]
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def classifier_step(net, opt, x, y, shift: int = 0, gen: torch.Generator | None = None):
    """One cross-entropy step; ``shift`` > 0: on randomly translated copies of ``x`` (``classifier_shift``)."""
    x = random_shift(x, shift, gen)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net.classify(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------------
# one task


@dataclass
class TaskStep:
    """Everything one GAN iteration of task ``t`` works with (see :func:`prepare_task` and :meth:`iteration`).

    The training loop and the end-to-end benchmarks (``benchmarks/e2e.py``) run the same :meth:`iteration`.
    """

    config: RunConfig
    t: int
    G: torch.nn.Module
    D: torch.nn.Module
    clf: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    opt_c: torch.optim.Optimizer
    replay_x: torch.Tensor | None
    replay_y: torch.Tensor | None
    per_class: int
    reserved: list | None
    lam: float
    gen: torch.Generator  # the task's CPU generator (batch order, classifier shuffles)

    @property
    def replayed_classes(self) -> int:
        return 0 if self.replay_x is None else self.replay_x.shape[0] // self.per_class

    def iteration(self, x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, s: float, s_max: float) -> dict:
        """One GAN iteration on the real batch ``x`` (model range) of classes ``pos``, drawn at rows ``idx``.

        (a) ``interleaved``: classifier steps on the batch plus the replay at the same indices of every past class;
        (b) a WGAN-GP critic step; (c) a generator step with the sparsity regulariser (frozen entries blocked).
        Returns the losses as Python floats: ``d, gp, w, g, reg`` and ``c`` (sum), ``c_steps``.
        """
        config, G, D, clf = self.config, self.G, self.D, self.clf
        device = x.device
        G.set_schedule(s, s_max if config.hat_compensation else None)
        out = dict(c=0.0, c_steps=0)
        P = self.replayed_classes
        if config.classifier_schedule == "interleaved":
            xs, ys = [x], [pos]
            if P:
                ridx = (idx % self.per_class).to(device)
                rows_ = (torch.arange(P, device=device)[:, None] * self.per_class + ridx[None, :]).reshape(-1)
                xs.append(self.replay_x[rows_])
                ys.append(self.replay_y[rows_])
            cx, cy = torch.cat(xs), torch.cat(ys)
            order = torch.randperm(cx.shape[0], generator=self.gen).to(device)
            for start in range(0, cx.shape[0], x.shape[0]):
                sel = order[start:start + x.shape[0]]
                out["c"] += classifier_step(clf, self.opt_c, cx[sel], cy[sel], config.classifier_shift, self.gen)
                out["c_steps"] += 1
        z = torch.randn(x.shape[0], G.nz, device=device)
        with torch.no_grad():
            fake = G(z, pos)
        out["d"], out["gp"], out["w"] = critic_step(D, self.opt_d, x, fake, config.lambda_gp)
        z = torch.randn(x.shape[0], G.nz, device=device)
        out["g"], out["reg"] = generator_step(G, D, self.opt_g, z, pos, self.reserved, self.lam)
        return out


def prepare_task(config: RunConfig, t: int, tasks, G, D, C, initial_size: int, device) -> tuple[TaskStep, object, object]:
    """Steps 1 and 2 of a task (the list in :mod:`dgm.train`): seeds, new task modules, critic / classifier
    (re-initialised as configured), fresh optimizers, the fixed replay set. Returns (step, D, C) with D and C the
    networks to keep for the next task."""
    gen = seed_everything(config.seed, t)
    task = tasks[t]
    seen = sum(len(tasks[j].positions) for j in range(t + 1))
    k = len(task.positions)
    G.add_task_modules(device)
    G.train()
    if config.reinit_discriminator or t == 0:
        D = new_critic(config, device)
    if config.classifier == "shared":
        D.grow_classes(seen)
        clf = D
    else:
        if C is None or config.reinit_classifier:
            C = new_classifier(config, device)
        C.grow_classes(seen)
        clf = C
    betas = tuple(config.betas)
    opt_g = dk.optim.MaskedAdam(G.task_parameters(t), lr=config.lr_g, betas=betas, backend=config.backend)
    G.ledger.attach(opt_g)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr_d, betas=betas)
    opt_c = opt_d if clf is D else torch.optim.Adam(C.parameters(), lr=config.lr_c, betas=betas)

    N = len(task.train)
    per_class = config.replay_per_class or math.ceil(N / k)
    replay_x, replay_y = generate_replay(G, tasks, t, per_class, device)
    reserved = None if t == 0 else [G.ledger.reserved_mask(n) for n, _ in G.masked_layers()]
    lam = sparsity_weight(config.lambda_sparsity, G.mask_sizes(), initial_size)
    step = TaskStep(config, t, G, D, clf, opt_g, opt_d, opt_c, replay_x, replay_y, per_class, reserved, lam, gen)
    return step, D, C
