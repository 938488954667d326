"""DGM's per-task training loop (SPEC section 5), with replay, evaluation, checkpoints and resume.

One task, in the order of the authors' code (steps 1 and 2: :func:`dgm.steps.prepare_task`; step 3:
:meth:`dgm.steps.TaskStep.iteration`, the classifier passes of ``after`` here; this module runs the tasks one after
the other and writes the run directory):

1. new modules for the task: the generator's BatchNorms and output layer at its current widths; the classifier head
   grows to every class seen so far; D is re-initialised (``reinit_discriminator``); fresh Adam optimizers (the
   generator's is :class:`dgm_kernels.optim.MaskedAdam`, told by the ledger which entries are frozen: they stay
   bit-identical);
2. for t > 0: a fixed replay set, generated once with the stored binary masks of the finished tasks (eval mode):
   for every past class as many images as the current task has real images per class;
3. per batch of real images: (a) classifier steps on the real batch plus the replay at the same indices of every
   past class, shuffled and cut into batches of the real batch's size (``interleaved``; or, ``after``, passes over
   the same real + replay set once the GAN has trained); (b) a WGAN-GP critic step on the current task only;
   (c) a generator step: -mean D(G(z)) + lambda_eff R (HAT-compensated mask gradients, frozen entries skipped).
   The generator never trains on replay: the masks alone protect the old classes;
4. end of task: binarise and store the masks, grow the generator (free capacity constant), evaluate on the real
   test data of every seen task, write a sample grid, results and an atomic checkpoint.

The networks follow ``config.architecture`` (SPEC section 2): the DCGAN generator and conv critic (MNIST, SVHN,
CIFAR-10), or the residual generator and ResNet-18 critic (``resnet``, ImageNet-50); the loop is the same.

Determinism: everything random in task t draws from generators seeded by (seed, t) at the task's start
(:func:`dgm.steps.seed_everything`), so a run resumed from the checkpoint after task t - 1 gives the same result as
an uninterrupted one.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dgm_kernels as dk
from dgm_kernels.backends import auto_backend_for

from . import evaluate
from .distributed import DistributedError, World, current_world, state_digests
from .checkpoint import (CHECKPOINT_NAME, FORMAT, VERSION, build_models, generator_state, load_checkpoint,
                         net_state, new_generator, save_atomic, write_json_atomic)
from .data import SYNTHETIC, class_incremental_split, synthetic_tasks, to_model_range
from .plasticity import scale_at
from .presets import ConfigError, RunConfig
from .replay import sample_grid_images
from .names import RIVALS
from .rivals import prepare_rival_task
from .steps import classifier_step, new_classifier, new_critic, prepare_task, task_seeds

__all__ = ["train", "train_task", "load_tasks", "RunDirError", "resolve_device", "resolved_backend", "grid_noise",
           "CONFIG_NAME", "RESULTS_NAME"]

log = logging.getLogger("dgm")
CONFIG_NAME, RESULTS_NAME = "config.json", "results.json"


class RunDirError(ValueError):
    """The output directory cannot take this run (it holds another run, or there is nothing to resume)."""


# ------------------------------------------------------------------------------------------------------
# data


def load_tasks(config: RunConfig):
    """The run's class-incremental tasks (a dgm.data TaskSequence)."""
    if config.dataset == SYNTHETIC:
        return synthetic_tasks(config.seed, num_tasks=config.num_tasks, max_train_per_class=config.max_train_per_class,
                               max_test_per_class=config.max_test_per_class)
    return class_incremental_split(
        config.dataset, class_order=config.class_order, val_fraction=config.val_fraction, seed=config.seed,
        num_tasks=config.num_tasks, data_dir=config.data_dir, max_train_per_class=config.max_train_per_class,
        max_test_per_class=config.max_test_per_class)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible")
    return device


def resolved_backend(config: RunConfig, device: torch.device) -> str:
    """The concrete backend a run uses (``auto`` resolved for the device); a clear error if it cannot run."""
    name = auto_backend_for(device) if config.backend == "auto" else config.backend
    why = dk.backends.unavailable_reason(name, device)
    if why is not None:
        raise ConfigError(f"backend {config.backend!r} cannot run on {device.type}: {why}")
    return name


# ------------------------------------------------------------------------------------------------------
# sample grids


def grid_noise(config: RunConfig, n_classes: int, device) -> torch.Tensor:
    """The fixed noise of the sample grids: [n_classes, samples_per_class, nz], the same for every task."""
    g = torch.Generator().manual_seed(task_seeds(config.seed, 10**6)[0])
    return torch.randn(n_classes, config.samples_per_class, config.nz, generator=g).to(device)


# ------------------------------------------------------------------------------------------------------
# the run directory


def _prepare_run_dir(out: Path, config: RunConfig, resume: bool):
    """Check the directory; returns the checkpoint state to resume from, or None."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt_path = out / CONFIG_NAME, out / CHECKPOINT_NAME
    if not resume:
        if cfg_path.exists() or ckpt_path.exists():
            raise RunDirError(f"output directory {out} already holds a run ({CONFIG_NAME} / {CHECKPOINT_NAME}); "
                              "pass --resume to continue it, or choose another --out")
        return None
    if cfg_path.exists():
        saved = RunConfig.from_dict(json.loads(cfg_path.read_text()))
        if saved.result_key() != config.result_key():
            diff = sorted(k for k, v in config.result_key().items() if saved.result_key().get(k) != v)
            raise RunDirError(f"cannot resume {out}: its run was configured differently in {diff} "
                              f"(saved: {[saved.result_key()[k] for k in diff]}, now: "
                              f"{[config.result_key()[k] for k in diff]})")
    if not ckpt_path.exists():
        log.info("resume: %s holds no checkpoint yet; starting at task 0", out)
        return None
    return load_checkpoint(ckpt_path)


def _setup_logging(out: Path, world: World) -> logging.Handler | None:
    """Rank 0 (or the single process) logs progress to stderr and RUN/train.log; the other ranks warnings only."""
    log.setLevel(logging.INFO if world.is_main else logging.WARNING)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        stream = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {world.rank}] " if world.distributed else ""
        stream.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
        log.addHandler(stream)
    if not world.is_main:
        return None
    fh = logging.FileHandler(out / "train.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(fh)
    return fh


def _progress(iterable=None, quiet: bool = False, **kw):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: the log lines say the same
        return iterable if iterable is not None else range(kw.get("total", 0))
    return tqdm(iterable, disable=True if quiet else None, dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------------------
# the run


def train(config: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, tasks=None, hooks=None,
          world: World | None = None) -> dict:
    """Train (or continue, ``resume``) a DGM run into ``out_dir``; returns the results dict (results.json).

    ``tasks``: a dgm.data TaskSequence to use instead of loading ``config.dataset`` (tests).
    ``hooks``: optional ``{"iteration": f(task, epoch, batch)}``, called before every GAN iteration (tests use it to
    simulate a kill).
    ``world``: the processes training together (default: the initialised process group, if any, see
    :func:`dgm.distributed.start`; else one process). Every rank calls ``train`` with the same arguments; rank 0
    writes the run directory, every rank reads the checkpoint to resume from.
    """
    config = config.validate()
    world = current_world() if world is None else world
    if world.distributed and config.method in RIVALS:
        raise ConfigError(f"method {config.method!r} trains on one process only; several processes train dgmw and "
                          "dgma (train it without torchrun)")
    if world.distributed and config.compile:
        raise ConfigError("compile is not supported with several processes (torch.compile would have to trace the "
                          "BatchNorms' collectives); train without --compile under torchrun")
    out = Path(out_dir)
    error, state = None, None
    try:
        state = _prepare_run_dir(out, config, resume)
    except Exception as exc:  # every rank must stop, not only the one that met the problem
        error = exc
    world.agree(error)
    handler = _setup_logging(out, world)
    threads = torch.get_num_threads()
    progress = {"task": int(state["tasks_done"]) if state else 0}
    try:
        with dk.use_backend(config.backend):
            return _run(config, out, state, tasks, hooks or {}, world, progress)
    except (DistributedError, ConfigError, RunDirError):
        raise
    except Exception as exc:
        if world.distributed and _lost_peer(exc):
            t = progress["task"]
            raise DistributedError(
                f"rank {world.rank} of {world.size}: the other processes stopped answering during task {t} "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); a peer "
                f"process died or hangs. {_resume_hint(out, t)}") from exc
        raise
    finally:
        torch.set_num_threads(threads)  # config.threads applies to the run only
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank is gone (or timed out)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    # gloo raises plain RuntimeErrors naming itself (its timeouts too: "gloo/transport/... Timed out waiting")
    text = str(exc).lower()
    return any(k in text for k in ("gloo", "nccl", "connection closed by peer", "connection reset by peer"))


def _resume_hint(out: Path, task: int) -> str:
    done = f"The checkpoint after task {task - 1}" if task > 0 else "No task had finished, so no checkpoint"
    return (f"{done} in {out} is intact; continue with the same torchrun command plus --out {out} --resume")


def _run(config: RunConfig, out: Path, state, tasks, hooks, world: World, progress: dict) -> dict:
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per process
    backend = resolved_backend(config, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if tasks is None:
        # rank 0 first: it fetches and caches the data set, the other ranks then read the cache instead of
        # downloading it again at the same time (and every rank stops if rank 0 could not get it)
        error = None
        if world.is_main:
            try:
                tasks = load_tasks(config)
            except Exception as exc:  # noqa: BLE001 -- re-raised on every rank by agree
                error = exc
        world.agree(error)
        if tasks is None:
            tasks = load_tasks(config)
    num_tasks = len(tasks)
    record = tasks.record.to_dict() if hasattr(tasks, "record") else {}
    tasks = [t.to(device) for t in tasks]
    n_classes = sum(len(t.positions) for t in tasks)
    class_names = record.get("class_names")
    if world.is_main:
        write_json_atomic(out / CONFIG_NAME, config.to_dict())
        (out / "samples").mkdir(exist_ok=True)

    if state is None:
        torch.manual_seed(task_seeds(config.seed, 10**6 + 1)[0])  # the initial networks
        G = new_generator(config, n_classes, device)
        D = new_critic(config, device)
        C = new_classifier(config, device) if config.classifier == "separate" else None
        start, rows, task_seconds, expansions = 0, [], [], []
        initial_size = G.mask_sizes()
    else:
        G, D, C = build_models(state, config, device)
        start = int(state["tasks_done"])
        rows, task_seconds = [list(r) for r in state["accuracy_rows"]], list(state["task_seconds"])
        expansions, initial_size = list(state["expansions"]), int(state["initial_mask_size"])
        log.info("resuming %s after task %d of %d", out, start - 1, num_tasks)
    G.set_backend(config.backend)
    noise = grid_noise(config, n_classes, device)
    log.info("run %s: %s %s (%s networks) preset=%s seed=%d backend=%s (resolved %s) device=%s, %d tasks%s", out,
             config.dataset, config.method, config.architecture, config.preset, config.seed, config.backend, backend,
             device, num_tasks, f", {world.size} processes" if world.distributed else "")

    bar = _progress(total=num_tasks, initial=start, desc="tasks", position=0, quiet=not world.is_main)
    for t in range(start, num_tasks):
        progress["task"] = t
        t0 = time.perf_counter()
        D, C, row = train_task(config, t, tasks, G, D, C, initial_size, device, hooks, world)
        expansions.append(G.commit_and_expand())
        if world.distributed:  # every rank must have taken the same commit and growth decisions
            world.check_same(state_digests({"generator": generator_state(G), "critic": net_state(D),
                                            "classifier": net_state(C)}), f"after task {t}")
        rows.append(row + [math.nan] * (num_tasks - len(row)))
        if world.is_main:
            grid = sample_grid_images(G, tasks, t, noise)
            evaluate.save_grid(grid, sum(len(tasks[j].positions) for j in range(t + 1)),
                               out / "samples" / f"task_{t:02d}.png")
        task_seconds.append(time.perf_counter() - t0)
        results = _results(config, backend, record, rows, task_seconds, expansions, G, num_tasks, world)
        if world.is_main:
            _write_outputs(out, results, rows, task_seconds, class_names)
            save_atomic({
                "format": FORMAT, "version": VERSION, "config": config.to_dict(), "tasks_done": t + 1,
                "generator": generator_state(G), "discriminator": net_state(D), "classifier": net_state(C),
                "initial_mask_size": initial_size, "accuracy_rows": rows, "task_seconds": task_seconds,
                "expansions": expansions, "task_positions": [list(map(int, tk.positions)) for tk in tasks],
            }, out / CHECKPOINT_NAME)
        world.barrier()  # the checkpoint is on disk before any rank starts the next task
        A = results["average_accuracy"][t]
        log.info("task %d done in %.1fs: A_%d = %.2f%%, R[t,:] = %s, widths %s", t, task_seconds[-1], t + 1, A,
                 " ".join(f"{v:.1f}" for v in row), expansions[-1]["widths"])
        if hasattr(bar, "update"):
            bar.update(1)
            bar.set_postfix(A=f"{A:.1f}")
    if hasattr(bar, "close"):
        bar.close()
    results = _results(config, backend, record, rows, task_seconds, expansions, G, num_tasks, world)
    results["complete"] = len(rows) == num_tasks
    if world.is_main:
        _write_outputs(out, results, rows, task_seconds, class_names)
    if rows:
        log.info("summary (%s):\n%s", out, evaluate.summary_table(np.array(rows, dtype=np.float64), task_seconds))
    return results


def _results(config, backend, record, rows, task_seconds, expansions, G, num_tasks, world: World) -> dict:
    R = np.array(rows, dtype=np.float64) if rows else np.zeros((0, num_tasks))
    res = {"complete": False, **evaluate.metrics(R)} if rows else {"complete": False}
    A = res.get("average_accuracy", [])
    named = {f"A{(t + 1) * record.get('classes_per_task', 1)}": a for t, a in enumerate(A)}
    res.update({
        "A_named": named,
        "final_average_accuracy": A[-1] if A else None,
        "wall_seconds": round(float(sum(task_seconds)), 2),
        "task_seconds": [round(s, 2) for s in task_seconds],
        "backend": backend,
        "world_size": world.size,
        "tasks_done": len(rows),
        "generator": {
            "widths_per_task": [list(G.task_widths(t)) for t in range(G.num_tasks)],
            "parameters_per_task": [G.task_parameter_count(t) for t in range(G.num_tasks)],
            "expansions": expansions,
            "mask_bookkeeping_bytes": 0 if G.ledger is None else G.ledger.memory_bytes(),
        },
        "metric_note": ("accuracy after the last epoch of each task on real test data; A_t = unweighted mean of "
                        "per-task accuracies" + ("; LEAKY: classifier selected on real validation data of past "
                                                 "classes (select_on_val)" if config.select_on_val else "")),
        "config": {**config.to_dict(), "class_order": record.get("class_order", config.class_order)},
        "data": record,
    })
    return res


def _write_outputs(out: Path, results: dict, rows, task_seconds, class_names) -> None:
    write_json_atomic(out / RESULTS_NAME, results)
    with open(out / "accuracy_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_task"] + [f"task_{k}" for k in range(len(rows[0]) if rows else 0)])
        for t, row in enumerate(rows):
            w.writerow([t] + ["" if (v is None or (isinstance(v, float) and math.isnan(v))) else f"{v:.4f}" for v in row])
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_task", "average_accuracy", "forgetting", "backward_transfer", "seconds"])
        for t in range(len(rows)):
            w.writerow([t, results["average_accuracy"][t], results["forgetting"][t], results["backward_transfer"][t],
                        round(task_seconds[t], 2)])
    if rows:
        R = np.array(rows, dtype=np.float64)
        evaluate.plot_accuracy(R, out / "accuracy.png", title=f"{results['config']['dataset']} "
                               f"{results['config']['method']} ({results['config']['preset']}, seed "
                               f"{results['config']['seed']})", class_names=class_names)


# ------------------------------------------------------------------------------------------------------
# one task (its steps: dgm.steps)


def train_task(config: RunConfig, t: int, tasks, G, D, C, initial_size: int, device, hooks, world: World | None = None):
    """Train task ``t`` (steps 1 to 3) and evaluate its classifier on the real test data of tasks 0 .. t.

    Returns (D, C, accuracy row): the critic and separate classifier to keep for the next task. The end of the task
    (masks committed, generator grown, outputs written) is the caller's. ``world``: the processes sharing every
    batch (default one).
    """
    world = World() if world is None else world
    if config.method in RIVALS:
        step, D, C = prepare_rival_task(config, t, tasks, G, D, C, device, world)
    else:
        step, D, C = prepare_task(config, t, tasks, G, D, C, initial_size, device, world)
    clf, gen, lam = step.clf, step.gen, step.lam
    seen = sum(len(tasks[j].positions) for j in range(t + 1))
    real = tasks[t].train
    N = len(real)
    B = config.batch_size
    batches = max(1, math.ceil(N / B))
    best = None  # (val accuracy, classifier state) for the leaky select_on_val option

    epoch_bar = _progress(range(config.epochs), desc=f"task {t}", position=1, leave=False, quiet=not world.is_main)
    for ep in epoch_bar:
        t_ep = time.perf_counter()
        sums = dict(d=0.0, gp=0.0, w=0.0, g=0.0, reg=0.0, c=0.0)
        c_steps = 0
        perm = torch.randperm(N, generator=gen)
        for i in range(batches):
            if "iteration" in hooks:
                hooks["iteration"](t, ep, i)
            idx = perm[i * B:(i + 1) * B]
            x = to_model_range(real.images[idx.to(device)])
            pos = real.positions[idx.to(device)]
            s, s_max = scale_at(config.s_schedule, config.s_max, ep, config.epochs, i, batches)
            out = step.iteration(x, pos, idx, s, s_max)
            c_steps += out["c_steps"]
            for key in sums:
                sums[key] += out[key]
        if config.select_on_val and config.classifier_schedule == "interleaved":
            best = _keep_best(best, clf, tasks, t, seen, world)
        log.info("task %d epoch %d/%d: D %.3f (W %.3f, GP %.3f) G %.3f R %.4f (lambda_eff %.4f) C %s s %.4g "
                 "s_max %.4g  %.1fs", t, ep + 1, config.epochs, sums["d"] / batches, sums["w"] / batches,
                 sums["gp"] / batches, sums["g"] / batches, sums["reg"] / batches, lam,
                 f"{sums['c'] / c_steps:.4f}" if c_steps else "-", s, s_max, time.perf_counter() - t_ep)
    if config.classifier_schedule == "after":
        _train_classifier_after(config, clf, step.opt_c, real, step.replay_x, step.replay_y, gen, device, t, tasks,
                                seen, select=config.select_on_val,
                                classify=None if step.forwards is None else step.forwards.classify, world=world)
    elif best is not None:
        clf.load_state_dict(best[1])
    clf.eval()
    row = evaluate.accuracy_per_task(clf.classify, [tasks[j].test for j in range(t + 1)], seen, world=world)
    clf.train()
    return D, C, row


def _keep_best(best, clf, tasks, t, seen, world: World):
    """LEAKY option: the classifier state with the best accuracy on the real validation data of all seen tasks."""
    clf.eval()
    acc = float(np.mean(evaluate.accuracy_per_task(clf.classify, [tasks[j].val for j in range(t + 1)], seen,
                                                   world=world)))
    clf.train()
    if best is None or acc > best[0]:
        return acc, {k: v.detach().clone() for k, v in clf.state_dict().items()}
    return best


def _train_classifier_after(config, clf, opt, real, replay_x, replay_y, gen, device, t, tasks, seen, select,
                            classify=None, world: World | None = None):
    """``after`` schedule: passes over the task's real images plus the fixed replay set, shuffled."""
    world = World() if world is None else world
    x_all = to_model_range(real.images)
    y_all = real.positions
    if replay_x is not None:
        x_all, y_all = torch.cat([x_all, replay_x]), torch.cat([y_all, replay_y])
    n, bs = x_all.shape[0], config.classifier_batch_size
    best = None
    for ep in range(config.classifier_epochs):
        t_ep = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        total, steps = 0.0, 0
        for start in range(0, n, bs):
            sel = order[start:start + bs]
            total += classifier_step(clf, opt, x_all[sel], y_all[sel], config.classifier_shift, gen, classify,
                                     world.shard(len(sel)))
            steps += 1
        if select:
            best = _keep_best(best, clf, tasks, t, seen, world)
        log.info("task %d classifier pass %d/%d over %d images (%d replayed): CE %.4f  %.1fs", t, ep + 1,
                 config.classifier_epochs, n, 0 if replay_x is None else replay_x.shape[0], total / max(steps, 1),
                 time.perf_counter() - t_ep)
    if best is not None:
        clf.load_state_dict(best[1])
