"""Replay a finished run's classifier schedule with other classifier recipes, on the run's own generator.

A task's generator output is frozen once the task is committed (bit-identical afterwards), so the final checkpoint
of a run generates exactly the replay every later task saw (up to the noise drawn). This script re-trains the
``after``-schedule classifier over the run's task sequence with a chosen recipe and reports A_t on the real test
data: minutes instead of a whole GAN run per classifier idea.

    python scripts/classifier_study.py runs/quick-mnist-dgma-seed1 --recipe baseline --recipe shift2

Recipes (``RECIPES``): ``baseline`` (the ``after`` schedule without augmentation), ``shiftN`` (random translation by
up to N pixels, what ``classifier_shift`` does in the pipeline), ``distill`` (plus a distillation loss towards the
previous task's classifier on the old classes, temperature 2), ``cos4`` (4 passes, cosine learning rate),
``reinit4`` (a new classifier every task, 4 passes), ``fake50`` (generated images of the newest class as well, half
as many as its real ones), ``smooth`` (label smoothing 0.1). The replay is drawn afresh, so ``baseline`` matches
the run's own A_t up to the noise drawn, not bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from dgm import evaluate
from dgm.checkpoint import build_models, load_checkpoint
from dgm.data import to_model_range
from dgm.presets import RunConfig
from dgm.replay import generate_replay
from dgm.steps import new_classifier, random_shift, seed_everything
from dgm.train import load_tasks


def run_recipe(config, G, tasks, recipe: dict, seed: int) -> np.ndarray:
    device = torch.device("cpu")
    C = None
    rows = []
    old = None
    for t in range(len(tasks)):
        gen = seed_everything(seed, t)
        seen = sum(len(tasks[j].positions) for j in range(t + 1))
        if C is None or recipe.get("reinit", False):
            C = new_classifier(config, device)
        C.grow_classes(seen)
        opt = torch.optim.Adam(C.parameters(), lr=config.lr_c, betas=tuple(config.betas))
        real = tasks[t].train
        per_class = math.ceil(len(real) / len(tasks[t].positions))
        rx, ry = generate_replay(G, tasks, t, per_class, device)
        x_all, y_all = to_model_range(real.images), real.positions
        if recipe.get("fake_current", 0) and t > 0:
            # generated images of the newest class too (share of the real count), from its own task's generator
            n = int(recipe["fake_current"] * len(real))
            labels = torch.full((n,), int(tasks[t].positions[0]), dtype=torch.int64)
            G.eval()
            with torch.no_grad():
                gx = G(torch.randn(n, G.nz), labels, task=t)
            x_all, y_all = torch.cat([x_all, gx]), torch.cat([y_all, labels])
        if rx is not None:
            x_all, y_all = torch.cat([x_all, rx]), torch.cat([y_all, ry])
        n, bs = x_all.shape[0], config.classifier_batch_size
        epochs = recipe.get("epochs", config.classifier_epochs)
        total_steps = epochs * math.ceil(n / bs)
        step = 0
        for ep in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                sel = order[start:start + bs]
                x, y = x_all[sel], y_all[sel]
                x = random_shift(x, recipe.get("shift", 0), gen)
                if recipe.get("cosine"):
                    for g in opt.param_groups:
                        g["lr"] = config.lr_c * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                opt.zero_grad(set_to_none=True)
                logits = C.classify(x)[:, :seen]
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.get("smooth", 0.0))
                if recipe.get("distill", 0) and old is not None:
                    prev = old[0]
                    with torch.no_grad():
                        tl = old[1].classify(x)[:, :prev]
                    T = 2.0
                    kd = F.kl_div(F.log_softmax(logits[:, :prev] / T, 1), F.softmax(tl / T, 1),
                                  reduction="batchmean") * T * T
                    loss = loss + recipe["distill"] * kd
                loss.backward()
                opt.step()
                step += 1
        C.eval()
        row = evaluate.accuracy_per_task(C.classify, [tasks[j].test for j in range(t + 1)], seen)
        C.train()
        rows.append(row + [math.nan] * (len(tasks) - len(row)))
        if recipe.get("distill", 0):
            old = (seen, copy.deepcopy(C).eval())
    return np.array(rows)


RECIPES = {
    "baseline": {},
    "shift1": {"shift": 1},
    "shift2": {"shift": 2},
    "shift3": {"shift": 3},
    "distill": {"distill": 1.0},
    "distill_shift": {"distill": 1.0, "shift": 2},
    "cos4": {"epochs": 4, "cosine": True},
    "reinit4": {"reinit": True, "epochs": 4},
    "fake50": {"fake_current": 0.5},
    "smooth": {"smooth": 0.1},
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--recipe", action="append", default=None, choices=sorted(RECIPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    state = load_checkpoint(f"{args.run}/checkpoint.pt")
    config = RunConfig.from_dict(state["config"])
    config.backend = "auto"
    G, _, _ = build_models(state, config)
    tasks = load_tasks(config)
    for name in args.recipe or ["baseline"]:
        t0 = time.perf_counter()
        R = run_recipe(config, G, tasks, RECIPES[name], args.seed)
        A = [np.nanmean(R[t, :t + 1]) for t in range(len(R))]
        print(f"{args.run} {name:14s} A_t " + " ".join(f"{a:.2f}" for a in A) + "  last row "
              + " ".join(f"{v:.0f}" for v in R[-1]) + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
