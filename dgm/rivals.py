"""The generative-replay rivals of SPEC section 7, trained by DGM's loop (:func:`dgm.train.train_task`) with an
unmasked generator (:class:`dgm.models.PlainGenerator`): what keeps an old class is replay from the generator as it
was when the task began (``previous``, a frozen copy), not masks.

- ``dgr`` (deep generative replay, Shin et al. 2017): an unconditional WGAN-GP generator. The critic's real batch is
  the task's real images plus as many images of the previous generator, weighted (``critic_step``'s
  ``real_weights``) so that the old classes together weigh P / k times the task's (each old class as much as a new
  one): a mixture of the same proportions at every task for a constant cost per step, where a batch holding as many
  rows per old class as the task has per class would grow with the task count, and DGR's cost with it (the quick
  presets keep the rivals in DGM's time budget). The classifier's replay is the previous generator's images
  labelled by the previous classifier (its argmax over the old classes).
- ``mergan-jtr`` (memory replay GAN, joint training with replay, Wu et al. 2018): a conditional generator with the
  AC-GAN term over every class seen so far. Besides the task's real images, every old class is replayed by the
  previous generator and treated as real: the critic learns D(new image) - D(replayed image) and the auxiliary
  head learns the replayed images' classes; the generator is trained on every class.
- ``mergan-ra`` (replay alignment): the critic sees the current task only; for the same noise and old class, the
  generator's image is pulled towards the previous generator's (half the summed squared difference, times
  ``lambda_ra``, divided by the number of old classes, as in the authors' code).

Weights: each old class counts as much as each class of the current task (the old classes' terms are means over
the replayed rows times P / k, for P old and k new classes); with one class per task that is MeRGAN's sum over the
old classes. The classifier (the solver) trains exactly as DGM's of the same preset, on the task's real images
plus a fixed replay set drawn from the previous generator at the task's start.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .presets import ConfigError, RunConfig
from .replay import generate_replay
from .steps import TaskStep, critic_step, generator_step, seed_everything, task_critic_and_classifier

__all__ = ["prepare_rival_task", "RivalStep", "alignment_loss", "label_replay"]


def alignment_loss(generator, previous, z: torch.Tensor, labels: torch.Tensor, old_classes: int) -> torch.Tensor:
    """MeRGAN's replay alignment: half the summed squared difference between ``generator``'s and ``previous``'s
    images of the same noise and (old) labels, divided by the number of old classes. Differentiable in
    ``generator`` only; zero when the two generators are equal."""
    with torch.no_grad():
        target = previous(z, labels)
    return (generator(z, labels) - target).square().sum() / (2 * old_classes)


@torch.no_grad()
def label_replay(classifier, images: torch.Tensor, old_positions: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """DGR's labels of replayed images: the previous classifier's most likely class among the old ones."""
    was_training = classifier.training
    classifier.eval()
    out = []
    for start in range(0, images.shape[0], batch):
        logits = classifier.classify(images[start:start + batch]).index_select(1, old_positions)
        out.append(old_positions[logits.argmax(1)])
    classifier.train(was_training)
    return torch.cat(out)


@dataclass
class RivalStep(TaskStep):
    """One GAN iteration of a rival (see the module); the classifier steps are DGM's."""

    previous: torch.nn.Module | None = None  # the generator as the task began (None at task 0)
    old_positions: torch.Tensor | None = None  # the classes of the earlier tasks
    new_classes: int = 1
    calls: int = 0  # real batches seen this task: the generator steps every config.critic_iterations-th

    def _old_batch(self, n: int, device):
        """Noise and old labels for ``n`` replayed rows, the old classes in turn (as many rows each, to one)."""
        P = len(self.old_positions)
        labels = self.old_positions[torch.arange(n, device=device) % P]
        return torch.randn(n, self.G.nz, device=device), labels

    def _old_classes_batch(self, batch: int, device):
        """MeRGAN's replay: ``batch // P`` rows of each of the P old classes (at least one each)."""
        P = len(self.old_positions)
        return self._old_batch(max(P, batch // P * P), device)

    def _iteration(self, x, pos, idx) -> dict:
        config, G, D = self.config, self.G, self.D
        method, device, B = config.method, x.device, x.shape[0]
        out = self.classifier_steps(x, pos, idx)
        P = 0 if self.previous is None else len(self.old_positions)
        w_old = P / self.new_classes  # an old class weighs as much as a new one
        aux_on = self.aux_positions is not None

        real, weights = x, None
        if method == "dgr" and P:
            with torch.no_grad():
                z_old, y_old = self._old_batch(B, device)
                real = torch.cat([x, self.previous(z_old, y_old)])
            new_share = 1 / (1 + w_old)  # the task's part of the mixture; the old classes' is w_old times it
            weights = torch.cat([x.new_full((B,), new_share / B), x.new_full((B,), (1 - new_share) / B)])
        labels = pos if real.shape[0] == B else torch.cat([pos, y_old])
        with torch.no_grad():
            fake = G(torch.randn(real.shape[0], G.nz, device=device), labels)

        replay = None
        if method == "mergan-jtr" and P:
            with torch.no_grad():
                z_r, y_r = self._old_classes_batch(B, device)
                replay = (z_r, y_r, self.previous(z_r, y_r), G(z_r, y_r))

        def critic_extra(x_real):
            extra = x_real.new_zeros(())
            if aux_on:
                extra = extra + config.aux_critic_weight * self.aux_loss(x_real[:B], pos)
            if replay is not None:
                z_r, y_r, x_prev, x_new = replay
                extra = extra + w_old * (D.critic(x_new).mean() - D.critic(x_prev).mean())
                if aux_on:
                    extra = extra + w_old * config.aux_critic_weight * self.aux_loss(x_prev, y_r)
            return extra

        out["d"], out["gp"], out["w"] = critic_step(D, self.opt_d, real, fake, config.lambda_gp, aux=critic_extra,
                                                   real_weights=weights)
        self.calls += 1
        out["g"], out["reg"] = 0.0, 0.0
        if self.calls % config.critic_iterations:
            return out

        z = torch.randn(real.shape[0], G.nz, device=device)
        if method != "dgr" and P:
            z_g, y_g = self._old_classes_batch(B, device)

        def generator_extra(images):
            extra = images.new_zeros(())
            if aux_on:
                extra = extra + config.aux_generator_weight * self.aux_loss(images[:B], pos)
            if method == "mergan-jtr" and P:
                x_new = G(z_g, y_g)
                extra = extra - w_old * D.critic(x_new).mean()
                if aux_on:
                    extra = extra + w_old * config.aux_generator_weight * self.aux_loss(x_new, y_g)
            if method == "mergan-ra" and P:
                extra = extra + config.lambda_ra * alignment_loss(G, self.previous, z_g, y_g, P)
            return extra

        out["g"], _ = generator_step(G, D, self.opt_g, z, labels, None, 0.0, aux=generator_extra)
        return out


def prepare_rival_task(config: RunConfig, t: int, tasks, G, D, C, device, world=None):
    """Steps 1 and 2 of a rival's task (as :func:`dgm.steps.prepare_task` for DGM): seeds, the previous generator
    (a frozen copy), the classifier's replay set (labelled by the previous classifier for DGR), critic and classifier
    (re-initialised as configured), fresh optimizers. Returns (step, D, C)."""
    if world is not None and world.distributed:
        raise ConfigError(f"method {config.method!r} trains on one process only (several processes: dgmw, dgma)")
    gen = seed_everything(config.seed, t)
    task = tasks[t]
    seen = sum(len(tasks[j].positions) for j in range(t + 1))
    k = len(task.positions)
    old = torch.tensor([p for j in range(t) for p in tasks[j].positions], dtype=torch.long, device=device)
    G.add_task_modules(device)
    previous = None
    if t > 0:
        previous = copy.deepcopy(G).eval()
        for p in previous.parameters():
            p.requires_grad_(False)

    N = len(task.train)
    per_class = config.replay_per_class or math.ceil(N / k)
    replay_x, replay_y = generate_replay(G, tasks, t, per_class, device)
    if config.method == "dgr" and replay_x is not None:
        # labelled by the classifier of the last task, before anything below re-initialises it
        replay_y = label_replay(D if config.classifier == "shared" else C, replay_x, old)

    auxiliary = config.method != "dgr" and (config.aux_critic_weight > 0 or config.aux_generator_weight > 0)
    D, C, clf = task_critic_and_classifier(config, t, seen, D, C, device, auxiliary)
    G.train()
    betas = tuple(config.betas)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr_d, betas=betas)
    opt_c = opt_d if clf is D else torch.optim.Adam(C.parameters(), lr=config.lr_c, betas=betas)
    step = RivalStep(config, t, G, D, clf, opt_g, opt_d, opt_c, replay_x, replay_y, per_class, None, 0.0, gen,
                     previous=previous, old_positions=old, new_classes=k)
    if auxiliary:  # MeRGAN's auxiliary head tells every class seen so far apart
        step.aux_positions = torch.arange(seen, device=device)
        step.aux_local = torch.arange(seen, device=device)
    return step, D, C
