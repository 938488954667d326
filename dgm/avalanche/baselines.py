"""The baselines of ``dgm compare``: Avalanche's own strategies, on the classifier network of DGM's preset.

Nothing here re-implements a method: every baseline is an Avalanche strategy or plugin (``Naive``,
``JointTraining``, ``Cumulative``, ``EWC``, ``SynapticIntelligence``, ``LwF``, ``RWalkPlugin`` on ``Naive``,
``ICaRL``, ``GenerativeReplay`` with Avalanche's ``MlpVAE``). What this module adds is the common ground:

- the **network**: DGM's separate classifier of the preset (:func:`dgm.models.build_classifier`, same widths and
  BatchNorm choice), with one output per class of the benchmark from the start (Avalanche's baselines expect a
  fixed head); iCaRL takes its trunk as the feature extractor and its linear head as the classifier;
- the **input**: images as float in Avalanche's MNIST normalisation (:data:`NORM_MEAN`, :data:`NORM_STD`), because
  Avalanche's VAE decodes into that space (``VAEMLPDecoder`` ends with that ``Normalize``); the network maps them
  back to ``[-1, 1]``, the range DGM's classifier sees (:class:`NormalizedInput`);
- the **training recipe** of DGM's classifier: the configuration's ``classifier_epochs`` passes per experience,
  ``classifier_batch_size``, Adam with ``lr_c`` and ``betas`` (reset at every experience, as Avalanche does and as
  DGM makes a fresh one per task), and the same random translation of every training batch
  (``classifier_shift``, :class:`ShiftPlugin`, :func:`dgm.steps.random_shift`);
- the **evaluation**: like DGM's single head, each method predicts among the classes seen so far
  (:attr:`NormalizedInput.seen`; iCaRL's nearest-mean classifier knows only the seen classes anyway).

:data:`BASELINES` names every method; :data:`GRIDS` holds the hyperparameter grid of the methods that have one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.benchmarks.utils import DataAttribute
from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
from avalanche.models.generator import MlpVAE, VAE_loss
from avalanche.training import (EWC, ICaRL, LwF, Cumulative, GenerativeReplay, JointTraining, Naive,
                                SynapticIntelligence, VAETraining)
from avalanche.training.plugins import GenerativeReplayPlugin, RWalkPlugin, SupervisedPlugin

from dgm.models import build_classifier
from dgm.steps import random_shift

__all__ = ["BASELINES", "GRIDS", "ICARL_EXEMPLARS", "NORM_MEAN", "NORM_STD", "NormalizedInput", "ShiftPlugin",
           "baseline_benchmark", "build_strategy", "bytes_kept"]

#: Avalanche's MNIST normalisation (its VAE's decoder un-normalises into this space): the baselines' input space
NORM_MEAN, NORM_STD = 0.1307, 0.3081
#: iCaRL's published exemplar budget (images in total, all classes together)
ICARL_EXEMPLARS = 2000

#: method -> what it is (the Avalanche class behind it)
BASELINES = {
    "naive": "fine-tuning (Avalanche Naive)",
    "joint": "joint training on all experiences at once, an upper bound (Avalanche JointTraining)",
    "cumulative": "retraining on every experience so far at each experience (Avalanche Cumulative)",
    "ewc": "elastic weight consolidation (Avalanche EWC, separate penalties)",
    "si": "synaptic intelligence (Avalanche SynapticIntelligence)",
    "lwf": "learning without forgetting (Avalanche LwF)",
    "rwalk": "Riemannian walk (Avalanche RWalkPlugin on Naive)",
    "icarl": f"iCaRL with {ICARL_EXEMPLARS} exemplars in total (Avalanche ICaRL, fixed memory)",
    "icarl-dgm": "iCaRL whose exemplars take the bytes DGMw keeps (its generator and mask bits, same seed)",
    "gr-vae": "deep generative replay with Avalanche's MLP VAE (Avalanche GenerativeReplay)",
}

#: method -> {hyperparameter: values}; the product is searched on held-out training images. Starting points: van de
#: Ven et al.'s class-incremental split MNIST (EWC lambda 1e9 with their Fisher, SI c 5000), Avalanche's defaults
#: (RWalk 0.1, LwF temperature 2); the grids span several orders because Avalanche normalises importances its own way.
GRIDS = {
    "ewc": {"ewc_lambda": [1e1, 1e3, 1e5, 1e7, 1e9]},
    "si": {"si_lambda": [1e1, 1e2, 1e3, 5e3, 5e4]},
    "lwf": {"alpha": [0.5, 1.0, 2.0], "temperature": [1.0, 2.0]},
    # below Avalanche's default 0.1 too (on MNIST 5x2 every value from 1e-4 to 1e3 ended at about 10 %)
    "rwalk": {"ewc_lambda": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0]},
}


def grid_points(method: str, grids: dict | None = None) -> list[dict]:
    """Every combination of ``method``'s grid (one empty dict for a method without one); ``grids`` replaces some of
    :data:`GRIDS`' values ({method: {hyperparameter: values}})."""
    points = [{}]
    for name, values in {**GRIDS.get(method, {}), **(grids or {}).get(method, {})}.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


class NormalizedInput(nn.Module):
    """``net.classify`` on images in Avalanche's normalisation (:data:`NORM_MEAN`, :data:`NORM_STD`), mapped back to
    ``[-1, 1]`` first. In eval mode the logits of the classes not seen yet (positions >= :attr:`seen`) are -inf, so
    the prediction is among the seen classes, as DGM's head has outputs for those only."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.seen = num_classes

    @staticmethod
    def to_model_range(x: torch.Tensor) -> torch.Tensor:
        return (x * NORM_STD + NORM_MEAN) * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(self.to_model_range(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net.classify(self.to_model_range(x))
        if not self.training and self.seen < logits.shape[1]:
            logits = logits.clone()
            logits[:, self.seen:] = float("-inf")
        return logits


class _Features(nn.Module):
    """iCaRL's feature extractor: the trunk of a :class:`NormalizedInput`'s network."""

    def __init__(self, model: NormalizedInput):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)


class ShiftPlugin(SupervisedPlugin):
    """Translates every training batch by up to ``pixels`` pixels per image (:func:`dgm.steps.random_shift`), as
    DGM's classifier is trained (``classifier_shift``). Runs in ``before_forward``, after the replay plugins have
    appended their samples, so replayed images are translated too, as in DGM."""

    def __init__(self, pixels: int, seed: int):
        super().__init__()
        self.pixels = pixels
        self.gen = torch.Generator().manual_seed(seed)

    def before_forward(self, strategy, **kwargs):
        if self.pixels and strategy.is_training:
            strategy.mbatch[0] = random_shift(strategy.mbatch[0], self.pixels, self.gen)


def _normalized(subset) -> torch.Tensor:
    return (subset.images.float().div(255) - NORM_MEAN) / NORM_STD


def _dataset(subsets) -> ClassificationDataset:
    images = torch.cat([_normalized(s) for s in subsets])
    targets = torch.cat([s.positions.cpu() for s in subsets])
    return ClassificationDataset(
        [TensorDataset(images, targets)],
        data_attributes=[DataAttribute(targets.tolist(), "targets"),
                         DataAttribute([0] * len(targets), "targets_task_labels", use_in_getitem=True)])


def baseline_benchmark(tasks, evaluate_on: str = "test"):
    """The benchmark the baselines train on: experience t holds task t's training images (Avalanche-normalised
    floats), its evaluation stream ``test_stream`` holds the tasks' ``evaluate_on`` subsets (``test``, or ``val``
    for the hyperparameter search). Built with Avalanche's ``nc_benchmark`` (fixed class order, no remapping):
    iCaRL and LwF need the benchmark object and the task-aware datasets it makes."""
    tasks = list(tasks)
    if evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', got {evaluate_on!r}")
    if evaluate_on == "val" and not all(len(t.val) for t in tasks):
        raise ValueError("the hyperparameter search needs held-out images in every task (val_fraction > 0)")
    order = [int(p) for t in tasks for p in t.positions]
    return nc_benchmark(_dataset([t.train for t in tasks]), _dataset([getattr(t, evaluate_on) for t in tasks]),
                        n_experiences=len(tasks), task_labels=False, shuffle=False, fixed_class_order=order,
                        per_exp_classes={i: len(t.positions) for i, t in enumerate(tasks)})


@dataclass
class Built:
    """A baseline ready to train: its strategy, the network whose ``seen`` the caller updates, and the VAE or None."""

    strategy: object
    model: NormalizedInput
    vae: nn.Module | None = None


def build_strategy(method: str, config, num_classes: int, params: dict, *, image_shape, device, evaluator,
                   seed: int, exemplars: int | None = None) -> Built:
    """The Avalanche strategy of ``method`` (a key of :data:`BASELINES`) with hyperparameters ``params`` (a point of
    :data:`GRIDS`), on a fresh classifier of ``config`` (seeded by the caller) for images of ``image_shape``
    ``(C, H, W)``. ``exemplars``: iCaRL's budget."""
    if method not in BASELINES:
        raise ValueError(f"method must be one of {', '.join(BASELINES)}, got {method!r}")
    net = build_classifier(config.architecture, int(image_shape[0]), num_classes,
                           config.classifier_widths, batchnorm=config.classifier_batchnorm)
    model = NormalizedInput(net, num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr_c, betas=tuple(config.betas))
    common = dict(criterion=nn.CrossEntropyLoss(), train_mb_size=config.classifier_batch_size, train_epochs=config.classifier_epochs,
                  eval_mb_size=1000, device=device, evaluator=evaluator,
                  plugins=[ShiftPlugin(config.classifier_shift, seed)])
    vae = None
    if method == "naive":
        strategy = Naive(model=model, optimizer=opt, **common)
    elif method == "joint":
        strategy = JointTraining(model=model, optimizer=opt, **common)
    elif method == "cumulative":
        strategy = Cumulative(model=model, optimizer=opt, **common)
    elif method == "ewc":
        strategy = EWC(model=model, optimizer=opt, ewc_lambda=params["ewc_lambda"], mode="separate", **common)
    elif method == "si":
        strategy = SynapticIntelligence(model=model, optimizer=opt, si_lambda=params["si_lambda"], **common)
    elif method == "lwf":
        strategy = LwF(model=model, optimizer=opt, alpha=params["alpha"], temperature=params["temperature"], **common)
    elif method == "rwalk":
        common["plugins"].append(RWalkPlugin(ewc_lambda=params["ewc_lambda"]))
        strategy = Naive(model=model, optimizer=opt, **common)
    elif method in ("icarl", "icarl-dgm"):
        if exemplars is None or exemplars < 1:
            raise ValueError(f"{method} needs a positive exemplar budget, got {exemplars!r}")
        common.pop("criterion")  # iCaRL brings its own loss
        strategy = ICaRL(feature_extractor=_Features(model), classifier=net.aux_head, optimizer=opt,
                         memory_size=exemplars, buffer_transform=None, fixed_memory=True, **common)
    else:  # gr-vae: Avalanche's default generator (MlpVAE, 2 latent units, Adam 0.01), sized for these images
        vae = MlpVAE(tuple(image_shape), nhid=2, device=device)
        vae_opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=0.01, weight_decay=1e-4)
        # the VAE trains config.epochs passes per experience: as many as DGM's generator
        generator = VAETraining(model=vae, optimizer=vae_opt, criterion=VAE_loss,
                                train_mb_size=config.batch_size, train_epochs=config.epochs, eval_mb_size=1000,
                                device=device, plugins=[GenerativeReplayPlugin()], evaluator=_quiet_evaluator())
        strategy = GenerativeReplay(model=model, optimizer=opt, generator_strategy=generator, **common)
    return Built(strategy, model, vae)


def _quiet_evaluator():
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(loggers=[])


def tensor_bytes(module: nn.Module, skip=None) -> int:
    """Bytes of the tensors in ``module``'s state dict (those whose name ``skip(name)`` rejects left out)."""
    return sum(t.numel() * t.element_size() for name, t in module.state_dict().items()
               if isinstance(t, torch.Tensor) and not (skip and skip(name)))


def bytes_kept(method: str, built: Built, tasks_seen, image_bytes: int) -> int:
    """What ``method`` keeps between experiences to replay or rehearse, in bytes: exemplars and stored images
    counted as ``uint8`` images (``image_bytes`` each), generators as their float32 state. The regularisation
    methods (EWC, SI, RWalk, LwF) keep parameter copies and importances instead, not counted here (0)."""
    if method in ("icarl", "icarl-dgm"):
        plugin = next(p for p in built.strategy.plugins if hasattr(p, "x_memory"))
        return sum(len(x) for x in plugin.x_memory) * image_bytes
    if method in ("joint", "cumulative"):
        return sum(len(t.train) for t in tasks_seen) * image_bytes
    if method == "gr-vae":
        return tensor_bytes(built.vae)
    return 0


def exemplars_for_bytes(n_bytes: int, image_bytes: int) -> int:
    """The number of ``uint8`` exemplar images that fit in ``n_bytes`` (at least one)."""
    return max(1, math.floor(n_bytes / image_bytes))
