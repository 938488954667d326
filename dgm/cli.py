"""The ``dgm`` command line: train, eval, sample, info, compare.

Examples::

    dgm train                                     # the quick MNIST DGMw experiment into runs/quick-mnist-dgmw-seed0
    dgm train --dataset mnist --method dgma --preset paper --backend cpu --out runs/paper-dgma --seed 1
    dgm train --out runs/paper-dgma --resume      # continue an interrupted run (same final result)
    torchrun --nproc_per_node=4 -m dgm train --preset paper --device cuda   # data-parallel (docs/distributed.md)
    dgm eval runs/quick-mnist-dgmw-seed0          # re-evaluate the saved classifier on the real test data
    dgm sample runs/quick-mnist-dgmw-seed0 --task 3
    dgm info runs/quick-mnist-dgmw-seed0          # config, widths and parameters per task, reserved fractions
    dgm compare --dataset mnist --protocol 5x2 --seeds 0,1,2 --jobs 2 --threads 1   # DGM against Avalanche's baselines
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "config_overrides"]


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return v


def build_parser() -> argparse.ArgumentParser:
    from .names import BACKENDS, DATASET_NAMES, METHODS
    from .presets import PRESETS

    p = argparse.ArgumentParser(prog="dgm", description="Dynamic Generative Memory (CVPR 2019): class-incremental "
                                "learning with a masked generator that replays past classes.")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train a run (default: the quick MNIST DGMw experiment)")
    t.add_argument("--dataset", help=f"one of {', '.join(DATASET_NAMES)} (default mnist)")
    t.add_argument("--method", help=f"one of {', '.join(METHODS)} (per-weight masks, per-channel gates; "
                   "default dgmw)")
    t.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default quick)")
    t.add_argument("--backend", help=f"dgm_kernels backend: one of {', '.join(BACKENDS)} (default auto)")
    t.add_argument("--out", help="run directory (default runs/<preset>-<dataset>-<method>-seed<seed>)")
    t.add_argument("--seed", type=_positive_int)
    t.add_argument("--epochs", type=_positive_int, help="epochs per task (overrides the preset)")
    t.add_argument("--num-tasks", type=_positive_int, help="train only the first tasks")
    t.add_argument("--max-train-per-class", type=_positive_int, help="cap the real training images per class")
    t.add_argument("--mask-mode", choices=("anneal", "ste"))
    t.add_argument("--data-dir", help="data cache directory (default $DGM_DATA_DIR or ~/.cache/dgm)")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    t.add_argument("--threads", type=_positive_int, help="torch CPU threads (1 is fastest on a busy machine)")
    t.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the GAN iteration's forwards (CUDA graphs on a GPU; see docs/performance.md)")
    t.add_argument("--val-fraction", type=float, help="share of each class's training images held out")
    t.add_argument("--select-on-val", action="store_true", default=None,
                   help="LEAKY: keep the classifier of the epoch with the best accuracy on real validation data "
                        "of all seen classes (the authors' reporting; off by default)")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override any config field, e.g. --set lambda_sparsity=0.05 --set classifier_epochs=3")
    t.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished task")
    t.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before the job stops with an error "
                        "(default 600)")

    e = sub.add_parser("eval", help="re-evaluate a run's classifier on the real test data")
    e.add_argument("run")
    e.add_argument("--data-dir")
    e.add_argument("--device", default="cpu")
    e.add_argument("--generated", action="store_true",
                   help="also the generated-sample metric: a reference classifier trained once on all real training "
                        "images (cached) classifies generated images of every class seen (MeRGAN's metric)")
    e.add_argument("--n-per-class", type=_positive_int, default=1000,
                   help="generated images per class for --generated (default 1000)")

    s = sub.add_parser("sample", help="generate a sample grid of one task's classes with the run's generator")
    s.add_argument("run")
    s.add_argument("--task", type=_positive_int, required=True)
    s.add_argument("--n", type=_positive_int, default=16, help="images per class (default 16)")
    s.add_argument("--seed", type=_positive_int, default=0)
    s.add_argument("--out", help="PNG path (default RUN/samples/sample_task_<T>.png)")

    c = sub.add_parser("compare", help="DGM, its generative-replay rivals and Avalanche's baselines under one protocol (needs the extra "
                       "'avalanche'; docs/compare.md)")
    c.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASET_NAMES)} (default mnist)")
    c.add_argument("--protocol", default="10x1", help="10x1 (DGM's: 10 tasks of one class) or 5x2 (default 10x1)")
    c.add_argument("--methods", default=None,
                   help="comma-separated method names (default: all; docs/compare.md lists them, and so does the "
                        "error for an unknown one)")
    c.add_argument("--preset", default="quick", help="the DGM preset whose classifier and epochs every method uses "
                   "(default quick; it needs a separate classifier)")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    c.add_argument("--out", help="output directory (default compare/<dataset>-<protocol>-<preset>)")
    c.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of each class's training images held out for the hyperparameter search (default 0.1)")
    c.add_argument("--max-train-per-class", type=_positive_int, help="cap the training images per class (default: "
                   "the preset's)")
    c.add_argument("--max-test-per-class", type=_positive_int)
    c.add_argument("--num-tasks", type=_positive_int, help="only the first tasks")
    c.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a config field for every method, e.g. --set classifier_epochs=3")
    c.add_argument("--grid", action="append", default=[], metavar="METHOD.PARAM=V1,V2,...",
                   help="replace a hyperparameter grid, e.g. --grid ewc.ewc_lambda=1e3,1e5 (docs/compare.md)")
    c.add_argument("--data-dir")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=_positive_int, help="torch CPU threads of each run")
    c.add_argument("--generated-per-class", type=int, default=500,
                   help="generated images per class for the generated-sample column of the generative methods, "
                        "measured after every task (default 500; 0: no column)")
    c.add_argument("--jobs", type=_positive_int, default=1, help="runs at once (default 1; with 2 on 2 cores, "
                   "--threads 1)")
    c.add_argument("--restore", metavar="RESULTS_JSON",
                   help="first put the runs of this comparison's results.json (same settings) into --out, so that "
                        "only what it lacks is run: a comparison continued from its committed results")

    i = sub.add_parser("info", help="config, widths and parameters per task, reserved fraction per layer")
    i.add_argument("run")
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


def config_overrides(args) -> tuple[dict, dict]:
    """(the options' overrides, None meaning "not given"; the --set values, applied as given, null included)."""
    ov = dict(seed=args.seed, epochs=args.epochs, num_tasks=args.num_tasks,
              max_train_per_class=args.max_train_per_class, mask_mode=args.mask_mode, data_dir=args.data_dir,
              device=args.device, threads=args.threads, val_fraction=args.val_fraction,
              select_on_val=args.select_on_val, backend=args.backend, compile=args.compile)
    return ov, _set_values(args.set)


def cmd_train(args) -> int:
    from .presets import RunConfig, make_config
    from .train import CONFIG_NAME, RunDirError, train

    ov, explicit = config_overrides(args)
    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None:
            raise RunDirError("--resume needs --out RUN (the run directory to continue)")
        if (out / CONFIG_NAME).exists():
            saved = json.loads((out / CONFIG_NAME).read_text())
            for key, value in (("dataset", args.dataset), ("method", args.method), ("preset", args.preset)):
                if value is not None:
                    ov[key] = value
            saved.update({k: v for k, v in ov.items() if v is not None})
            saved.update(explicit)
            config = RunConfig.from_dict(saved)
        else:
            config = make_config(args.dataset or "mnist", args.method or "dgmw", args.preset or "quick",
                                 explicit=explicit, **ov)
    else:
        config = make_config(args.dataset or "mnist", args.method or "dgmw", args.preset or "quick",
                             explicit=explicit, **ov)
        if out is None:
            out = Path("runs") / f"{config.preset}-{config.dataset}-{config.method}-seed{config.seed}"
    world = _start_world(config.device, args.dist_timeout)
    try:
        results = train(config, out, resume=args.resume, world=world)
    finally:
        _stop_world(world)
    if world.is_main:
        A = results.get("average_accuracy") or []
        print(f"run {out}: {results['tasks_done']} tasks, A_t = {', '.join(f'{a:.2f}' for a in A)}; "
              f"{results['wall_seconds']:.1f} s; backend {results['backend']}"
              + (f"; {world.size} processes" if world.distributed else ""))
    return 0


def _start_world(device: str, timeout):
    """Under torchrun (WORLD_SIZE > 1): join the process group; a SIGTERM (torchrun stopping the job because another
    process failed) then ends this process with a clear message instead of a bare traceback."""
    import signal

    from .distributed import DEFAULT_TIMEOUT_S, DistributedError, start
    from .presets import ConfigError

    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {timeout}")
    world = start(device, DEFAULT_TIMEOUT_S if timeout is None else timeout)
    if world.distributed:
        def stopped(signum, frame):
            raise DistributedError(f"rank {world.rank} of {world.size}: stopped by signal {signum} (torchrun stops "
                                   "every process when one of them fails); the last finished task's checkpoint is "
                                   "intact: continue with the same command plus --resume")
        signal.signal(signal.SIGTERM, stopped)
    return world


def _stop_world(world) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 -- the group may already be broken by the failure being reported
            pass


def _load_run(run):
    from .checkpoint import build_models, load_checkpoint
    from .presets import RunConfig

    state = load_checkpoint(run)
    config = RunConfig.from_dict(dict(state["config"]))
    return state, config, build_models


def cmd_eval(args) -> int:
    import numpy as np
    import torch

    from . import evaluate
    from .train import load_tasks, resolve_device

    state, config, build_models = _load_run(args.run)
    if args.data_dir:
        config.data_dir = args.data_dir
    device = resolve_device(args.device)
    g, d, c = build_models(state, config, device)
    clf = c if config.classifier == "separate" else d
    done = int(state["tasks_done"])
    tasks = load_tasks(config)
    seen = sum(len(tasks[j].positions) for j in range(done))
    clf.eval()
    with torch.no_grad():
        row = evaluate.accuracy_per_task(clf.classify, [tasks[j].test.to(device) for j in range(done)], seen)
    rows = np.array(state["accuracy_rows"], dtype=np.float64)
    print(evaluate.summary_table(rows, list(state["task_seconds"])))
    print(f"\nre-evaluated after task {done - 1}: R = {' '.join(f'{v:.2f}' for v in row)}; "
          f"A_{done} = {float(np.mean(row)):.2f} (saved: {float(np.nanmean(rows[-1][:done])):.2f})")
    if args.generated:
        _eval_generated(args, g, clf, config, tasks[:done], device)
    return 0


def _eval_generated(args, g, clf, config, tasks, device) -> None:
    from .checkpoint import write_json_atomic
    from .generated import reference_classifier, run_generated_accuracy
    from .presets import ConfigError

    if args.n_per_class < 1:
        raise ConfigError(f"--n-per-class must be >= 1, got {args.n_per_class}")
    ref, info = reference_classifier(config.dataset, data_dir=config.data_dir, device=device)
    scores = run_generated_accuracy(g.to(device), clf, tasks, ref, args.n_per_class, config.seed, device)
    result = {"metric": "accuracy of a reference classifier (trained on all real training images) on generated "
                        "images of each task's classes, the run's final generator", **scores,
              "n_per_class": args.n_per_class, "reference": info}
    path = Path(args.run) / "generated_accuracy.json"
    write_json_atomic(path, result)
    print(f"\ngenerated-sample accuracy (reference classifier: {info['test_accuracy']:.2f} % on the real test images, "
          f"{info['epochs']} epochs, {info['path']}):")
    if "labelled_by" in scores:
        print(f"  the generator is unconditional (DGR's): its images are labelled by {scores['labelled_by']}, as its "
              "replay is")
        print("  share of the images per task: " + " ".join(f"{v:.1f}" for v in scores["share_per_task"]))
    print("  per task: " + " ".join("-" if a is None else f"{a:.2f}" for a in scores["per_task"]))
    print(f"  mean over the {len(tasks)} tasks' images: {result['mean']:.2f} ({args.n_per_class} images per class); "
          f"written to {path}")


def cmd_sample(args) -> int:
    import torch

    from .evaluate import save_grid

    state, config, build_models = _load_run(args.run)
    g, _, _ = build_models(state, config, "cpu")
    done = int(state["tasks_done"])
    if not 0 <= args.task < done:
        from .presets import ConfigError

        raise ConfigError(f"--task must be in [0, {done - 1}] (the run has finished {done} tasks), got {args.task}")
    # every class seen up to the task (README), each generated by the task that learned it: the replay a later
    # task trains on, with its own masks and widths
    gen = torch.Generator().manual_seed(args.seed)
    g.eval()
    images, rows = [], 0
    with torch.no_grad():
        for task in range(args.task + 1):
            for p in (int(p) for p in state["task_positions"][task]):
                z = torch.randn(args.n, g.nz, generator=gen)
                images.append(g(z, torch.full((args.n,), p, dtype=torch.int64), task=task))
                rows += 1
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"sample_task_{args.task:02d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(images), rows, out)
    if getattr(g, "conditional", True):
        how = "each with the masks of its own task" if g.ledger is not None else "one network for all"
        print(f"wrote {out} ({rows} class(es) seen up to task {args.task} x {args.n} images, {how})")
    else:
        print(f"wrote {out} ({rows} rows x {args.n} images of the unconditional generator ({config.method}): no row is "
              "a class)")
    return 0


def cmd_info(args) -> int:
    from .models import count_parameters

    from .plasticity import float_scores_bytes

    state, config, build_models = _load_run(args.run)
    g, d, c = build_models(state, config, "cpu")
    done = int(state["tasks_done"])
    layers = []
    masked = g.ledger is not None  # the rivals' generator has no masks (dgm.models.plain)
    for name, layer in (g.masked_layers() if masked else ()):
        reserved = g.ledger.reserved_mask(name)
        layers.append({"layer": name, "weight_shape": list(layer.weight.shape),
                       "reserved_fraction": round(float(reserved.float().mean()), 4),
                       "widths_per_task": [list(w) for w in g.ledger.widths(name)]})
    info = {
        "run": str(args.run), "tasks_done": done, "config": config.to_dict(),
        "generator_widths_now": list(g.widths()),
        "tasks": [{"task": t, "widths": list(g.task_widths(t)), "parameters": g.task_parameter_count(t),
                   "A": None if t >= len(state["accuracy_rows"]) else
                   round(sum(state["accuracy_rows"][t][: t + 1]) / (t + 1), 2)} for t in range(done)],
        "layers": layers,
        "generator_parameters_stored": count_parameters(g),
        "mask_bookkeeping_bytes": g.ledger.memory_bytes() if masked else 0,
        "float_scores_bytes_of_the_original_code": float_scores_bytes(g.ledger) if masked else 0,
        "critic_parameters": count_parameters(d) if d is not None else 0,
        "classifier_parameters": count_parameters(c) if c is not None else None,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = config.to_dict()
    print(f"run {args.run}: {done} task(s) done")
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    print("\ntask | widths (conv1/conv2/conv3) | parameters |   A_t")
    for row in info["tasks"]:
        print(f"{row['task']:4d} | {'/'.join(map(str, row['widths'])):26s} | {row['parameters']:10d} | "
              f"{'' if row['A'] is None else format(row['A'], '6.2f')}")
    if not masked:
        print(f"\n{config.method}: one unmasked generator for every task (no masks, no ledger); "
              f"{info['generator_parameters_stored']} parameters")
        return 0
    print("\nlayer | weight shape     | reserved fraction")
    for ly in layers:
        print(f"{ly['layer']:5s} | {str(ly['weight_shape']):16s} | {ly['reserved_fraction']:.4f}")
    print(f"\nmask bookkeeping: {info['mask_bookkeeping_bytes']} bytes as bits "
          f"(one float32 score per weight per task would take {info['float_scores_bytes_of_the_original_code']})")
    return 0


def _set_values(items) -> dict:
    """The --set FIELD=JSON values (a bare string where the value is not JSON)."""
    from .presets import ConfigError

    explicit = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set must be FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        explicit[key.strip().replace("-", "_")] = value
    return explicit


def _grid_values(items) -> dict:
    """The --grid METHOD.PARAM=V1,V2 values as {method: {param: [floats]}}."""
    from .presets import ConfigError

    grids: dict = {}
    for item in items:
        head, _, raw = item.partition("=")
        method, _, name = head.partition(".")
        try:
            values = [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            values = None
        if not method or not name or not values:
            raise ConfigError(f"--grid must be METHOD.PARAM=V1,V2,... with numbers, got {item!r}")
        grids.setdefault(method.strip(), {})[name.strip()] = values
    return grids


def cmd_compare(args) -> int:
    import signal

    from .presets import ConfigError

    try:  # the optional extra, imported only here so that `import dgm` never needs it
        from .avalanche.compare import COMPARE_METHODS, CompareError, CompareSpec, restore, run_compare
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    spec = CompareSpec(dataset=args.dataset, protocol=args.protocol, preset=args.preset,
                       methods=args.methods if args.methods is not None else list(COMPARE_METHODS),
                       seeds=args.seeds, val_fraction=args.val_fraction, max_train_per_class=args.max_train_per_class,
                       max_test_per_class=args.max_test_per_class, num_tasks=args.num_tasks,
                       overrides=_set_values(args.set), grids=_grid_values(args.grid), data_dir=args.data_dir,
                       device=args.device, threads=args.threads, jobs=args.jobs,
                       generated_per_class=args.generated_per_class).validate()
    out = Path(args.out or f"compare/{spec.dataset}-{spec.protocol}-{spec.preset}")

    def terminated(signum, frame):  # a scheduler's SIGTERM ends the runs in flight as Ctrl-C does
        raise KeyboardInterrupt

    print(f"dgm compare: {len(spec.methods)} method(s) x {len(spec.seeds)} seed(s) into {out} (logs in {out}/logs)")
    if args.restore:
        finals, searches = restore(spec, args.restore, out)
        print(f"dgm compare: restored {finals} run(s) and {searches} search run(s) from {args.restore}")
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        run_compare(spec, out)
    except CompareError as exc:
        print(f"dgm compare: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {out}/results.json, {out}/table.md, {out}/accuracy.png\n")
    print((out / "table.md").read_text())
    return 0


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .distributed import DistributedError
    from .presets import ConfigError
    from .train import RunDirError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `dgm` alone: show the help
        parser.print_help()
        return 0
    handlers = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "info": cmd_info, "compare": cmd_compare}
    try:
        from dgm.data import DataError
    except ImportError:  # pragma: no cover
        DataError = ConfigError  # noqa: N806
    try:
        return handlers[args.command](args)
    except (ConfigError, RunDirError, CheckpointError, DataError) as exc:
        print(f"dgm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"dgm {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        hint = ("the same command continues it (finished runs are kept)" if args.command == "compare" else
                "a run continues with `dgm train --out RUN --resume`")
        print(f"dgm {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
