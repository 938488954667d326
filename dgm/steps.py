"""The pieces of one DGM task (SPEC section 5), shared by the training loop (:mod:`dgm.train`), the end-to-end
benchmarks (``benchmarks/e2e.py``, ``benchmarks/breakdown.py``) and ``scripts/classifier_study.py``.

- seeding: everything random in task t draws from generators seeded by (seed, t) (:func:`seed_everything`), so a
  run resumed after task t - 1 repeats an uninterrupted one;
- new networks of the configured architecture: :func:`new_critic`, :func:`new_classifier` (the generator:
  :func:`dgm.checkpoint.new_generator`, which a checkpoint also restores through);
- one step of each kind: :func:`critic_step` (WGAN-GP), :func:`generator_step` (adversarial loss plus the sparsity
  regulariser), :func:`classifier_step` (cross-entropy, optionally on :func:`random_shift`-ed images);
- :func:`prepare_task` (steps 1 and 2 of a task) and :class:`TaskStep` (one GAN iteration, step 3);
- ``config.compile``: :class:`CompiledForwards`, the forward functions of one task's networks under torch.compile.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import dgm_kernels as dk

from .distributed import World, convert_batchnorm
from .models import build_classifier, build_discriminator
from .names import image_channels
from .plasticity import sparsity_loss, sparsity_weight
from .presets import RunConfig
from .replay import generate_replay

__all__ = ["task_seeds", "seed_everything", "new_critic", "new_classifier", "critic_step", "frozen_params",
           "generator_step", "random_shift", "classifier_step", "TaskStep", "prepare_task", "task_critic_and_classifier", "CompiledForwards",
           "compile_mode"]


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


def _params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _batch_mean(v: torch.Tensor, shard) -> torch.Tensor:
    """The batch mean of ``v``; with several processes, this rank's share of the global batch's mean."""
    return v.mean() if shard is None else shard.mean(v)


def _global_draw(draw, n: int, shard) -> torch.Tensor:
    """``draw(n)`` for the whole batch of ``n`` rows, and this rank's rows of it (every rank draws the same numbers
    as one process would, so the run does not depend on the number of processes)."""
    drawn = draw(n)
    return drawn if shard is None else shard.take(drawn)


def critic_step(D, opt_d, x_real, fake, lambda_gp, critic=None, shard=None, aux=None, real_weights=None):
    """WGAN-GP: -mean D(x) + mean D(G(z)) + lambda_gp * E[(||grad D(x_hat)|| - 1)^2] (+ ``aux(x_real)``).

    ``critic``: the function computing D(x) for the two Wasserstein terms (default ``D.critic``; ``config.compile``:
    its compiled form). The gradient penalty always runs ``D.critic`` eagerly: it is differentiated twice, and a
    graph compiled by torch.compile (AOTAutograd) has no double backward.

    ``shard`` (several processes, :class:`dgm.distributed.Shard`): ``x_real`` and ``fake`` are this rank's rows of
    the global batch; the losses are its shares of the global means, the gradients are summed over the ranks
    before the step, and the returned losses are the global batch's.

    ``aux``: the auxiliary-classifier (AC-GAN) term of the real images, a function of them (see
    :meth:`TaskStep.aux_loss`); the returned loss includes it.

    ``real_weights`` (one process only): a weight per real row, summing to 1, in place of the uniform mean, for the
    real term and for the gradient penalty of the interpolate made from that row: the real batch is then a mixture
    whose parts weigh as the weights say, whatever their row counts (DGR's class-balanced replay, :mod:`dgm.rivals`).
    """
    critic = D.critic if critic is None else critic
    if real_weights is not None:
        if shard is not None:
            raise ValueError("critic_step: real_weights is for one process only (shard given)")
        if real_weights.shape != (x_real.shape[0],):
            raise ValueError(f"critic_step: real_weights must have shape ({x_real.shape[0]},) (one per real row), "
                             f"got {tuple(real_weights.shape)}")
    def real_mean(v):
        return _batch_mean(v, shard) if real_weights is None else (v.flatten() * real_weights).sum()
    opt_d.zero_grad(set_to_none=True)
    d_real = real_mean(critic(x_real))
    d_fake = _batch_mean(critic(fake), shard)
    alpha = _global_draw(lambda n: torch.rand(n, 1, 1, 1, device=x_real.device),
                         x_real.shape[0] if shard is None else shard.total, shard)
    x_hat = (alpha * x_real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(D.critic(x_hat).sum(), x_hat, create_graph=True)
    gp = real_mean((grad.flatten(1).norm(dim=1) - 1).square())
    loss = d_fake - d_real + lambda_gp * gp
    if aux is not None:
        loss = loss + aux(x_real)
    loss.backward()
    if shard is not None:
        values = shard.world.sum_gradients(_params(opt_d), (loss.detach(), gp.detach(), (d_real - d_fake).detach()))
        opt_d.step()
        return tuple(values)
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


def generator_step(G, D, opt_g, z, labels, reserved, lam, forwards=None, shard=None, aux=None):
    """-mean D(G(z)) + lambda_eff R (+ ``aux(G(z))``); the masked layers compensate the scores' gradient (HAT) and
    block frozen weights, the masked optimizer leaves every frozen entry bit-identical. Returns (adversarial loss,
    R); the adversarial loss includes the ``aux`` term.

    ``forwards``: a :class:`CompiledForwards` (``config.compile``) computing G(z), D(x) and R instead.
    ``shard``: as for :func:`critic_step` (``z``, ``labels``: this rank's rows).
    ``aux``: the auxiliary-classifier (AC-GAN) term of the generated images, a function of them."""
    with frozen_params(D):
        fake = G(z, labels) if forwards is None else forwards.generate(z, labels)
        adv = -_batch_mean(D.critic(fake) if forwards is None else forwards.critic(fake), shard)
        if aux is not None:
            adv = adv + aux(fake)
    if G.ledger is None:  # an unmasked generator (dgm.rivals): nothing to regularise
        reg = adv.new_zeros(())
    else:
        reg = sparsity_loss(G, reserved) if forwards is None else forwards.regulariser(G, reserved)
    opt_g.zero_grad(set_to_none=True)
    if shard is not None:
        # R is the same on every rank: its gradient is counted once, on rank 0, in the sum over the ranks
        share = 1.0 if shard.world.is_main else 0.0
        (adv + lam * share * reg).backward()
        adv_v, reg_v = shard.world.sum_gradients(_params(opt_g), (adv.detach(), share * reg.detach()))
        opt_g.step()
        return adv_v, reg_v
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


def classifier_step(net, opt, x, y, shift: int = 0, gen: torch.Generator | None = None, classify=None, shard=None):
    """One cross-entropy step; ``shift`` > 0: on randomly translated copies of ``x`` (``classifier_shift``).
    ``classify``: the logits function (default ``net.classify``; ``config.compile``: its compiled form).
    ``shard`` (several processes): ``x``, ``y`` are the global batch, of which this rank trains on its rows (the
    shifts are drawn for the whole batch, as one process draws them); gradients summed over the ranks."""
    x = random_shift(x, shift, gen)
    if shard is not None:
        x, y = shard.take(x), shard.take(y)
    opt.zero_grad(set_to_none=True)
    logits = (net.classify if classify is None else classify)(x)
    if shard is None:
        loss = F.cross_entropy(logits, y)
    else:
        loss = F.cross_entropy(logits, y, reduction="sum") / shard.total
    loss.backward()
    if shard is not None:
        value, = shard.world.sum_gradients(_params(opt), (loss.detach(),))
        opt.step()
        return value
    opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------------
# config.compile


def compile_mode(device) -> str:
    """torch.compile's mode for ``device``: CUDA graphs on a GPU (the iteration is launch-bound there: a few hundred
    small kernels), the default (Inductor's fused kernels) on the CPU, where there are no launches to save."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


class CompiledForwards:
    """``config.compile``: the forward functions of one task's networks under ``torch.compile``.

    What is compiled: the live generator's forward (:meth:`forward_live`; the label check of ``make_input`` stays
    eager), the critic's forward for the Wasserstein terms of the critic step and the adversarial term of the
    generator step, the sparsity regulariser's masks and terms, and the classifier's logits. What stays eager: the
    autograd calls (``backward``, the gradient penalty's ``autograd.grad(create_graph=True)``: AOTAutograd compiles
    a forward and its backward, with no double backward, so the penalty's critic forward is eager too), the
    optimizer steps, and everything outside the GAN iteration (replay, evaluation, growth).

    The annealing scale: the masked layers keep ``s`` and ``s_max`` as Python floats, which dynamo would make
    constants of the graph: a new s every iteration would recompile every iteration. Inside :meth:`scales`, a backend
    with ``tensor_scales`` (``cpu``, ``cuda``) sees them as 0-dim float64 tensors holding the same values, inputs of
    the graph, so a task compiles once (the widths change between tasks, and so do the networks). Other backends
    keep the floats (and recompile per value up to dynamo's limit). Outside the compiled calls the layers hold their
    floats, so everything else, the checkpoint included, is as in an eager run.
    """

    def __init__(self, G, D, clf, backend: str | None, device):
        device = torch.device(device)
        mode = compile_mode(device)
        self.cuda = device.type == "cuda"
        self._live = torch.compile(G.forward_live, mode=mode)
        self._make_input = G.make_input
        self.critic = torch.compile(D.critic, mode=mode)
        self.classify = torch.compile(clf.classify, mode=mode)
        self.regulariser = torch.compile(sparsity_loss, mode=mode)
        self.tensor_scales = dk.backends.resolve(backend, device).tensor_scales
        self._s = torch.zeros((), dtype=torch.float64)
        self._s_max = torch.zeros((), dtype=torch.float64)

    def generate(self, z, labels):
        return self._live(self._make_input(z, labels))

    @contextlib.contextmanager
    def scales(self, G):
        """The masked layers of ``G`` hold their current s and s_max as tensors inside the block (see the class)."""
        layers = [layer for _, layer in G.masked_layers()]
        if not self.tensor_scales:
            yield
            return
        saved = [(layer.s, layer.s_max) for layer in layers]
        s, s_max = saved[0]
        self._s.fill_(s)
        if s_max is not None:
            self._s_max.fill_(s_max)
        for layer in layers:
            layer.s, layer.s_max = self._s, None if s_max is None else self._s_max
        try:
            yield
        finally:
            for layer, (s, s_max) in zip(layers, saved):
                layer.s, layer.s_max = s, s_max


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
    forwards: CompiledForwards | None = None  # config.compile
    world: World = field(default_factory=World)  # the processes sharing every batch (dgm.distributed)
    # the AC-GAN term (config.aux_critic_weight / aux_generator_weight): the task's class positions, and each
    # seen position's index among them; None when the term is off or the task has one class (it would be 0)
    aux_positions: torch.Tensor | None = None
    aux_local: torch.Tensor | None = None

    def aux_loss(self, x: torch.Tensor, pos: torch.Tensor, shard=None) -> torch.Tensor:
        """Cross-entropy of D's auxiliary head, among the current task's classes, against the classes ``pos`` that
        ``x`` is (real) or was generated as (fake): the share of the global batch mean when ``shard`` is given."""
        logits = self.D.classify(x).index_select(1, self.aux_positions)
        return _batch_mean(F.cross_entropy(logits, self.aux_local[pos], reduction="none"), shard)

    @property
    def replayed_classes(self) -> int:
        return 0 if self.replay_x is None else self.replay_x.shape[0] // self.per_class

    def iteration(self, x: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, s: float, s_max: float) -> dict:
        """One GAN iteration on the real batch ``x`` (model range) of classes ``pos``, drawn at rows ``idx``.
        With several processes, ``x``, ``pos`` and ``idx`` are the global batch on every rank; each rank computes
        with its share of it (:meth:`dgm.distributed.World.shard`).

        (a) ``interleaved``: classifier steps on the batch plus the replay at the same indices of every past class;
        (b) a WGAN-GP critic step; (c) a generator step with the sparsity regulariser (frozen entries blocked).
        Returns the losses as Python floats: ``d, gp, w, g, reg`` and ``c`` (sum), ``c_steps``.
        """
        config, G, forwards = self.config, self.G, self.forwards
        G.set_schedule(s, s_max if config.hat_compensation else None)
        if forwards is None:
            return self._iteration(x, pos, idx)
        if forwards.cuda:
            # CUDA graphs: the outputs of the last iteration's replays may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with forwards.scales(G):
            return self._iteration(x, pos, idx)

    def classifier_steps(self, x, pos, idx) -> dict:
        """(a) of :meth:`iteration` (``interleaved`` schedule only): classifier steps on the real batch plus the
        replay at the same indices of every past class. Returns ``c`` (the losses' sum) and ``c_steps``."""
        config, clf, forwards, world = self.config, self.clf, self.forwards, self.world
        device = x.device
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
                out["c"] += classifier_step(clf, self.opt_c, cx[sel], cy[sel], config.classifier_shift, self.gen,
                                            None if forwards is None else forwards.classify, world.shard(len(sel)))
                out["c_steps"] += 1
        return out

    def _iteration(self, x, pos, idx) -> dict:
        config, G, D, forwards, world = self.config, self.G, self.D, self.forwards, self.world
        device = x.device
        shard = world.shard(x.shape[0])  # None for one process
        out = self.classifier_steps(x, pos, idx)
        draw_z = lambda n: torch.randn(n, G.nz, device=device)  # noqa: E731
        batch = x.shape[0]  # the global batch: every rank draws its noise
        z = _global_draw(draw_z, batch, shard)
        if shard is not None:
            x, pos = shard.take(x), shard.take(pos)
        with torch.no_grad():
            fake = G(z, pos) if forwards is None else forwards.generate(z, pos)
        aux_d = aux_g = None
        if self.aux_positions is not None:
            aux_d = lambda xs: config.aux_critic_weight * self.aux_loss(xs, pos, shard)  # noqa: E731
            aux_g = lambda xs: config.aux_generator_weight * self.aux_loss(xs, pos, shard)  # noqa: E731
        out["d"], out["gp"], out["w"] = critic_step(D, self.opt_d, x, fake, config.lambda_gp,
                                                    None if forwards is None else forwards.critic, shard, aux_d)
        z = _global_draw(draw_z, batch, shard)
        out["g"], out["reg"] = generator_step(G, D, self.opt_g, z, pos, self.reserved, self.lam, forwards, shard,
                                              aux_g)
        return out


def task_critic_and_classifier(config: RunConfig, t: int, seen: int, D, C, device, auxiliary: bool):
    """The critic and the classifier of task ``t`` (re-initialised as configured, heads grown to the ``seen``
    classes; D's auxiliary head too when the AC-GAN term is on). Returns (D, C, the network that classifies)."""
    if config.reinit_discriminator or t == 0:
        D = new_critic(config, device)
    if auxiliary:
        D.grow_classes(seen)
    if config.classifier == "shared":
        D.grow_classes(seen)
        return D, C, D
    if C is None or config.reinit_classifier:
        C = new_classifier(config, device)
    C.grow_classes(seen)
    return D, C, C


def prepare_task(config: RunConfig, t: int, tasks, G, D, C, initial_size: int, device,
                 world: World | None = None) -> tuple[TaskStep, object, object]:
    """Steps 1 and 2 of a task (the list in :mod:`dgm.train`): seeds, new task modules, critic / classifier
    (re-initialised as configured), fresh optimizers, the fixed replay set. Returns (step, D, C) with D and C the
    networks to keep for the next task.

    ``world`` (several processes): the BatchNorms compute their statistics over all ranks, and the replay set is
    generated in shares and gathered."""
    world = World() if world is None else world
    gen = seed_everything(config.seed, t)
    task = tasks[t]
    seen = sum(len(tasks[j].positions) for j in range(t + 1))
    k = len(task.positions)
    G.add_task_modules(device)
    G.train()
    # the AC-GAN term: without it nothing in DGM's losses ties a task's images to their label, and a task of several
    # classes is generated as one mixture (docs/results.md, "DGM against the baselines"); with one class it is 0
    auxiliary = k > 1 and (config.aux_critic_weight > 0 or config.aux_generator_weight > 0)
    D, C, clf = task_critic_and_classifier(config, t, seen, D, C, device, auxiliary)
    if world.distributed:
        for net in (G, D, C):
            convert_batchnorm(net)
    betas = tuple(config.betas)
    opt_g = dk.optim.MaskedAdam(G.task_parameters(t), lr=config.lr_g, betas=betas, backend=config.backend)
    G.ledger.attach(opt_g)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr_d, betas=betas)
    opt_c = opt_d if clf is D else torch.optim.Adam(C.parameters(), lr=config.lr_c, betas=betas)

    N = len(task.train)
    per_class = config.replay_per_class or math.ceil(N / k)
    replay_x, replay_y = generate_replay(G, tasks, t, per_class, device, world=world)
    reserved = None if t == 0 else [G.ledger.reserved_mask(n) for n, _ in G.masked_layers()]
    lam = sparsity_weight(config.lambda_sparsity, G.mask_sizes(), initial_size)
    forwards = None
    if config.compile:
        # the networks' widths changed since the last task, and the critic (and maybe the classifier) is new: the
        # last task's compiled code is of no use, and keeping it would spend dynamo's recompile limit (8 per
        # function), after which the later tasks of a 10-task run would silently run eagerly
        torch._dynamo.reset()
        forwards = CompiledForwards(G, D, clf, config.backend, device)
    step = TaskStep(config, t, G, D, clf, opt_g, opt_d, opt_c, replay_x, replay_y, per_class, reserved, lam, gen,
                    forwards, world)
    if auxiliary:
        step.aux_positions = torch.tensor(task.positions, device=device)
        step.aux_local = torch.full((seen,), -1, dtype=torch.long, device=device)
        step.aux_local[step.aux_positions] = torch.arange(k, device=device)
    return step, D, C
