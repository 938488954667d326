"""``dgm compare``: DGM and Avalanche's baselines under one class-incremental protocol, several seeds.

Layout of the output directory ``OUT``::

    OUT/compare.json            what decides the numbers (data set, protocol, preset, overrides, caps, val share)
    OUT/runs/select/M-K=V.json  one hyperparameter-search run (first seed, evaluated on held-out training images)
    OUT/runs/final/M-seedS.json one run of method M with seed S (evaluated on the test images)
    OUT/logs/...                each run's output
    OUT/results.json            everything: per method and seed the accuracy matrix, A_t, forgetting, backward
                                transfer, wall seconds, peak memory, bytes kept (for the generative methods also
                                the generated-sample accuracy after every task); the grids and the choices
    OUT/table.md, OUT/accuracy.png   mean and spread over the seeds

Every run is its own process (``python -m dgm.avalanche.compare --worker SPEC``): its peak memory is its own, a
crash loses only that run, and ``--jobs`` runs several at once. A finished run (its JSON exists, with the same hyperparameters) is never
run again, so an interrupted comparison continues where it stopped with the same command; adding methods or seeds
later runs only the new ones.

The data: every method sees the same tasks (:func:`dgm.avalanche.make_benchmark` with the run's seed): the same
training images per class, ``val_fraction`` of each class's training images held out for the search.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dgm import evaluate
from dgm.checkpoint import write_json_atomic
from dgm.names import MASKED_METHODS as DGM_METHODS
from dgm.names import METHODS as GENERATIVE_METHODS
from dgm.names import RIVALS
from dgm.presets import ConfigError, make_config

from .baselines import BASELINES, GRIDS, ICARL_EXEMPLARS, exemplars_for_bytes, grid_points, tensor_bytes
from .benchmarks import PROTOCOLS

__all__ = ["COMPARE_METHODS", "CompareSpec", "CompareError", "run_compare", "summarize", "restore"]

#: every method ``dgm compare`` runs: DGM's two, its generative-replay rivals (trained by dgm.train), the baselines
COMPARE_METHODS = (*DGM_METHODS, *RIVALS, *BASELINES)
#: what the table says of the methods trained by this project's pipeline (the baselines' are in BASELINES)
PIPELINE_DESCRIPTIONS = {
    "dgmw": "DGM with weight masks (DGMw), this project",
    "dgma": "DGM with channel gates (DGMa), this project",
    "dgr": "deep generative replay (Shin et al. 2017): unconditional generator, replay labelled by the previous "
           "classifier; this project's pipeline",
    "mergan-jtr": "MeRGAN, joint training with replay (Wu et al. 2018); this project's pipeline",
    "mergan-ra": "MeRGAN, replay alignment (Wu et al. 2018); this project's pipeline",
}
SPEC_NAME, RESULTS_NAME, TABLE_NAME, PLOT_NAME = "compare.json", "results.json", "table.md", "accuracy.png"


class CompareError(RuntimeError):
    """A comparison could not run or some of its runs failed (the message names them and their logs)."""


@dataclass
class CompareSpec:
    """One comparison. Fields in :meth:`key` decide the numbers; the others say what to run and how."""

    dataset: str = "mnist"
    protocol: str = "10x1"
    preset: str = "quick"
    methods: list = field(default_factory=lambda: list(COMPARE_METHODS))
    seeds: list = field(default_factory=lambda: [0])
    val_fraction: float = 0.1
    max_train_per_class: int | None = None  # None: the preset's
    max_test_per_class: int | None = None
    num_tasks: int | None = None
    overrides: dict = field(default_factory=dict)  # RunConfig fields for every method (--set)
    # {method: {hyperparameter: values}} replacing GRIDS' (--grid); not in key(): a wider grid may resume a comparison
    # (the runs of points already searched are kept, a final run is redone if the choice changes)
    grids: dict = field(default_factory=dict)
    # generated images per class for the generated-sample metric of the generative methods, after every task (0: not
    # measured); not in key(): it adds a column, it changes no other number
    generated_per_class: int = 500
    data_dir: str | None = None
    device: str = "cpu"
    threads: int | None = None
    jobs: int = 1

    def key(self) -> dict:
        return {k: getattr(self, k) for k in ("dataset", "protocol", "preset", "val_fraction", "max_train_per_class",
                                              "max_test_per_class", "num_tasks", "overrides")}

    def validate(self) -> "CompareSpec":
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in self.methods if m not in COMPARE_METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be a comma-separated list of {', '.join(COMPARE_METHODS)}, got "
                              f"{', '.join(map(repr, unknown)) if unknown else 'none'}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must not repeat a name, got {','.join(self.methods)}")
        if "icarl-dgm" in self.methods and "dgmw" not in self.methods:
            raise ConfigError("method icarl-dgm takes its exemplar budget from DGMw's bytes: add dgmw to methods")
        if isinstance(self.seeds, str):
            try:
                self.seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"seeds must be comma-separated ints >= 0, got {self.seeds!r}") from None
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds) or \
                len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct ints >= 0, got {self.seeds!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ConfigError(f"val_fraction must be in (0, 1) (the hyperparameter search needs held-out images), "
                              f"got {self.val_fraction!r}")
        for method, values in self.grids.items():
            if method not in GRIDS:
                raise ConfigError(f"grid: method must be one of {', '.join(GRIDS)} (the methods with a "
                                  f"hyperparameter search), got {method!r}")
            for name, points in values.items():
                if name not in GRIDS[method]:
                    raise ConfigError(f"grid: {method}'s hyperparameter must be one of {', '.join(GRIDS[method])}, "
                                      f"got {name!r}")
                if not points or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         for v in points):
                    raise ConfigError(f"grid: {method}.{name} must be one or more finite numbers, got {points!r}")
        if isinstance(self.generated_per_class, bool) or not isinstance(self.generated_per_class, int) or \
                self.generated_per_class < 0:
            raise ConfigError(f"generated_per_class must be an int >= 0, got {self.generated_per_class!r}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ConfigError(f"jobs must be an int >= 1, got {self.jobs!r}")
        from dgm.train import resolve_device

        resolve_device(self.device)  # a missing GPU is refused here, not by every run
        for method in {m if m in GENERATIVE_METHODS else "dgmw" for m in self.methods}:
            config = self.config(method, self.seeds[0])  # every field checked before anything runs
            if method in GENERATIVE_METHODS and config.classifier != "separate":
                raise ConfigError(f"dgm compare needs a separate classifier (the quick preset's), got preset "
                                  f"{self.preset!r} whose classifier is {config.classifier!r} (the critic)")
        return self

    def config(self, method: str, seed: int):
        """The RunConfig of ``method`` (DGM's or a rival's; the baselines use DGMw's for the classifier's recipe)."""
        explicit = dict(self.overrides)
        for name in ("max_train_per_class", "max_test_per_class", "num_tasks"):
            if getattr(self, name) is not None:
                explicit[name] = getattr(self, name)
        return make_config(self.dataset, method if method in GENERATIVE_METHODS else "dgmw", self.preset,
                           explicit=explicit, seed=seed, val_fraction=self.val_fraction, device=self.device,
                           threads=self.threads, data_dir=self.data_dir)


# ------------------------------------------------------------------------------------------------------
# one run (in its own process)


def _tasks(spec: CompareSpec, config):
    from .benchmarks import protocol_tasks

    return protocol_tasks(spec.dataset, spec.protocol, seed=config.seed, data_dir=config.data_dir,
                          val_fraction=spec.val_fraction, max_train_per_class=config.max_train_per_class,
                          max_test_per_class=config.max_test_per_class, num_tasks=config.num_tasks)


def _accuracy_row(metrics: dict, n: int) -> list[float]:
    """Per-experience accuracies (%) of experiences 0 .. n-1 from Avalanche's last evaluation metrics."""
    row = []
    for k in range(n):
        names = [m for m in metrics if m.startswith("Top1_Acc_Exp/eval_phase/") and m.endswith(f"Exp{k:03d}")]
        if len(names) != 1:
            raise CompareError(f"Avalanche's metrics hold {len(names)} accuracies of experience {k}: {names}")
        row.append(100.0 * float(metrics[names[0]]))
    return row


def generator_bytes(generator) -> int:
    """What DGM keeps to replay: the generator's weights, BatchNorms and heads (float32) and the bits of every
    task's mask; the real-valued mask scores serve the task being trained only and are not counted."""
    return tensor_bytes(generator, skip=lambda name: name.endswith(".scores"))


def _generated(strategy, tasks, reference, spec: CompareSpec, seed: int, device) -> dict:
    """The generated-sample metric of the strategy's generator now (time not counted in the experience's)."""
    from dgm.generated import run_generated_accuracy

    generator, classifier = strategy.generator, strategy.classifier
    modes = generator.training, classifier.training
    try:
        return run_generated_accuracy(generator, classifier, tasks, reference, spec.generated_per_class, seed, device)
    finally:
        generator.train(modes[0])
        classifier.train(modes[1])


def run_one(spec: CompareSpec, method: str, seed: int, params: dict, phase: str, exemplars: int | None = None) -> dict:
    """Train ``method`` on every experience and evaluate after each; returns the run's record."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from dgm.steps import task_seeds
    from dgm.train import resolve_device

    from .baselines import baseline_benchmark, build_strategy, bytes_kept
    from .benchmarks import benchmark_from_tasks
    from .strategy import DGMStrategy

    config = spec.config(method, seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    tasks = _tasks(spec, config)
    n_classes = sum(len(t.positions) for t in tasks)
    image_shape = tuple(tasks[0].train.images.shape[1:])
    image_bytes = int(np.prod(image_shape))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generative = method in GENERATIVE_METHODS
    reference = None
    if generative and spec.generated_per_class:
        from dgm.generated import reference_classifier

        reference, _ = reference_classifier(spec.dataset, data_dir=config.data_dir, device=device, quiet=True)
    generated = []
    if generative:
        strategy = DGMStrategy(config=config, n_classes=n_classes, device=device, evaluator=evaluator)
        bench = benchmark_from_tasks(tasks)  # uint8 images, as DGMStrategy takes them
        train_stream, eval_stream, built = bench.train_stream, bench.test_stream, None
    else:
        bench = baseline_benchmark(tasks, "val" if phase == "select" else "test")
        torch.manual_seed(task_seeds(seed, 10**6 + 2)[0])  # the network, shuffles and replay draws of this run
        built = build_strategy(method, config, n_classes, params, image_shape=image_shape, device=device,
                               evaluator=evaluator, seed=task_seeds(seed, 10**6 + 3)[0], exemplars=exemplars)
        strategy = built.strategy
        train_stream, eval_stream = bench.train_stream, bench.test_stream
    rows, seconds = [], []
    label = f"{method} seed {seed}" + (f" {params}" if params else "")
    if method == "joint":  # one training on everything: one row, after the last task
        strategy.train(train_stream)
        row = _accuracy_row(strategy.eval(eval_stream), len(tasks))
        seconds.append(time.perf_counter() - start)
        print(f"[{label}] all {len(tasks)} experiences at once: A = {np.mean(row):.2f}", flush=True)
        rows = [row]
    else:
        for t, experience in enumerate(train_stream):
            tick = time.perf_counter()
            strategy.train(experience)
            if built is not None:
                built.model.seen = sum(len(tasks[j].positions) for j in range(t + 1))
            row = _accuracy_row(strategy.eval(eval_stream[: t + 1]), t + 1)
            rows.append(row + [math.nan] * (len(tasks) - t - 1))
            seconds.append(time.perf_counter() - tick)
            note = ""
            if reference is not None:
                generated.append(_generated(strategy, tasks[: t + 1], reference, spec, seed, device))
                note = f", generated {generated[-1]['mean']:.2f}"
            print(f"[{label}] experience {t + 1}/{len(tasks)}: A_{t + 1} = {np.mean(row):.2f}{note} "
                  f"({seconds[-1]:.1f} s)", flush=True)
    wall = time.perf_counter() - start
    if generative:
        kept = generator_bytes(strategy.generator)
    else:
        kept = bytes_kept(method, built, tasks, image_bytes)
    record = {"method": method, "seed": seed, "phase": phase, "params": params,
              "evaluated_on": "val" if phase == "select" else "test", "wall_seconds": round(wall, 2),
              "experience_seconds": [round(s, 2) for s in seconds],
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda"
              else None,
              "bytes_kept": int(kept), "image_bytes": image_bytes,
              "exemplars": exemplars, "num_tasks": len(tasks), "num_classes": n_classes,
              "train_per_class": [len(t.train) // len(t.positions) for t in tasks]}
    if generated:
        record["generated"] = {"n_per_class": spec.generated_per_class, "after_task": generated,
                               "mean": [g["mean"] for g in generated]}
    if method == "joint":
        final = float(np.mean(rows[0]))
        record.update(accuracy_matrix=None, final_row=[round(v, 4) for v in rows[0]],
                      average_accuracy=[None] * (len(tasks) - 1) + [round(final, 4)],
                      forgetting=[None] * len(tasks), backward_transfer=[None] * len(tasks))
    else:
        record.update(evaluate.metrics(np.array(rows)))
    return record


# ------------------------------------------------------------------------------------------------------
# the comparison (the parent process)


def _slug(params: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in params.items()) or "default"


def _final_path(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / "final" / f"{method}-seed{seed}.json"


def _select_path(out: Path, method: str, params: dict) -> Path:
    return out / "runs" / "select" / f"{method}-{_slug(params)}.json"


@dataclass
class _Run:
    method: str
    seed: int
    phase: str
    params: dict
    path: Path
    log: Path
    exemplars: int | None = None


class _Workers:
    """The worker processes running now; :meth:`stop` ends them (an interrupted comparison leaves none behind)."""

    def __init__(self):
        self._procs: set = set()
        self._lock = threading.Lock()
        self.stopping = False

    def start(self, args, log):
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self._procs.add(proc)
            return proc

    def done(self, proc) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _execute(spec: CompareSpec, run: _Run, workers: _Workers) -> str | None:
    """Run one worker process; None on success, else what went wrong (with the log's path)."""
    run.log.parent.mkdir(parents=True, exist_ok=True)
    job = {"spec": asdict(spec), "method": run.method, "seed": run.seed, "phase": run.phase, "params": run.params,
           "exemplars": run.exemplars, "out": str(run.path)}
    job_path = run.log.with_suffix(".job.json")
    write_json_atomic(job_path, job)
    with open(run.log, "w") as log:
        proc = workers.start([sys.executable, "-m", "dgm.avalanche.compare", "--worker", str(job_path)], log)
        if proc is None:
            return f"{run.method} seed {run.seed} {_slug(run.params)} ({run.phase}): not started (interrupted)"
        try:
            code = proc.wait()
        finally:
            workers.done(proc)
    job_path.unlink(missing_ok=True)
    if code != 0 or not run.path.exists():
        tail = run.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        return f"{run.method} seed {run.seed} {_slug(run.params)} ({run.phase}) failed with exit {code}: " \
               f"{tail[0]} (log: {run.log})"
    return None


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: the lines printed per run say the same
        return None
    return tqdm(total=total, desc=desc, dynamic_ncols=True)


def _done(run: _Run) -> bool:
    """Has ``run`` finished with the same hyperparameters and budget? (A final run of a searched method is run again
    when the search chooses another value, e.g. after its grid changed.)"""
    rec = _load(run.path)
    return rec is not None and rec["params"] == run.params and rec.get("exemplars") == run.exemplars


def _run_all(spec: CompareSpec, runs: list[_Run], desc: str, failures: list[str]) -> None:
    todo = [r for r in runs if not _done(r)]
    if not todo:
        return
    bar = _progress(len(todo), desc)

    workers = _Workers()

    def one(run):
        error = _execute(spec, run, workers)
        rec = _load(run.path)
        msg = error or (f"{run.method} seed {run.seed} {_slug(run.params)}: A_T = "
                        f"{rec['average_accuracy'][-1]:.2f} in {rec['wall_seconds']:.0f} s")
        if bar is not None:
            bar.write(msg)
            bar.update(1)
        else:
            print(msg, flush=True)
        if error:
            failures.append(error)

    pool = ThreadPoolExecutor(max_workers=spec.jobs)
    try:
        for future in [pool.submit(one, run) for run in todo]:
            future.result()
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): no new run starts, the running ones are ended
        workers.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()


def run_compare(spec: CompareSpec, out) -> dict:
    """Run (or continue) the comparison into ``out``; returns the summary written to ``OUT/results.json``."""
    spec.validate()
    out = Path(out)
    _check_settings(spec, _load(out / SPEC_NAME), str(out), "give a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SPEC_NAME, spec.key())
    failures: list[str] = []
    if spec.generated_per_class and any(m in GENERATIVE_METHODS for m in spec.methods):
        # trained (or loaded) here, once, so that runs in parallel find it cached instead of each training it
        from dgm.generated import reference_classifier

        from dgm.train import resolve_device

        _, info = reference_classifier(spec.dataset, data_dir=spec.data_dir, device=resolve_device(spec.device))
        print(f"dgm compare: reference classifier for the generated-sample metric: {info['test_accuracy']:.2f} % on "
              f"the real test images ({info['path']})", flush=True)

    def final(method, seed, params=None, exemplars=None):
        name = f"{method}-seed{seed}"
        return _Run(method, seed, "final", params or {}, _final_path(out, method, seed),
                    out / "logs" / "final" / f"{name}.log", exemplars)

    # stage 1: the hyperparameter searches (first seed, held-out images), DGM, and the methods without a grid
    first = spec.seeds[0]
    searches = [_Run(m, first, "select", p, _select_path(out, m, p),
                     out / "logs" / "select" / f"{m}-{_slug(p)}.log")
                for m in spec.methods if m in GRIDS for p in grid_points(m, spec.grids)]
    plain = [final(m, s, exemplars=ICARL_EXEMPLARS if m == "icarl" else None)
             for s in spec.seeds for m in spec.methods if m not in GRIDS and m != "icarl-dgm"]
    _run_all(spec, searches + plain, "searches, DGM and the methods without a grid", failures)
    # stage 2: the searched methods with their chosen values, iCaRL with DGMw's bytes
    chosen = _choices(spec, out)
    later = []
    for s in spec.seeds:
        for m in spec.methods:
            if m in GRIDS and m in chosen:
                later.append(final(m, s, chosen[m]["params"]))
            elif m == "icarl-dgm":
                dgm = _load(final("dgmw", s).path)
                if dgm is None:
                    failures.append(f"icarl-dgm seed {s}: no finished dgmw run of seed {s} to take the budget from")
                    continue
                later.append(final(m, s, exemplars=exemplars_for_bytes(dgm["bytes_kept"], dgm["image_bytes"])))
    _run_all(spec, later, "the searched methods and iCaRL at DGM's bytes", failures)
    summary = summarize(spec, out)
    if failures:
        raise CompareError(f"{len(failures)} run(s) failed; the others are in {out / RESULTS_NAME} (run the same "
                           "command again to retry only the failed ones):\n  " + "\n  ".join(failures))
    return summary


def _check_settings(spec: CompareSpec, saved: dict | None, where: str, hint: str) -> None:
    key = spec.key()
    if saved is not None and saved != key:
        diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        raise ConfigError(f"{where} holds a comparison with other settings ({', '.join(diff)} differ: "
                          f"{ {k: saved.get(k) for k in diff} } there, { {k: key.get(k) for k in diff} } now); {hint}")


def restore(spec: CompareSpec, results, out) -> tuple[int, int]:
    """Put the runs of a comparison's ``results.json`` (e.g. the one committed beside its table, when the run directory
    is gone) into ``out``, so that :func:`run_compare` with ``spec`` runs only what the file lacks: a new method or
    seed, a run that had not finished. Its settings must be ``spec``'s. A search run comes back as what the choice
    reads (its parameters and held-out A_T); a run already in ``out`` is kept. Returns (final runs, search runs)
    written."""
    spec.validate()
    results, out = Path(results), Path(out)
    try:
        summary = json.loads(results.read_text())
        settings, runs, search = summary["settings"], summary["runs"], summary["hyperparameter_search"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"restore must be a results.json written by dgm compare, got {str(results)!r} "
                          f"({type(exc).__name__}: {exc})") from None
    _check_settings(spec, settings, str(results), "restore it with the command that made it")
    _check_settings(spec, _load(out / SPEC_NAME), str(out), "give a new --out")
    write_json_atomic(out / SPEC_NAME, spec.key())
    finals = {_final_path(out, m, rec["seed"]): rec for m, recs in runs.items() for rec in recs}
    searches = {_select_path(out, m, point["params"]): {
                    "method": m, "seed": search["seed"], "phase": "select", "params": point["params"],
                    "exemplars": None, "average_accuracy": [point["val_A_T"]], "restored_from": str(results)}
                for m, choice in search.items() if isinstance(choice, dict)  # not "seed" and "evaluated_on"
                for point in choice["grid"]}

    def put(records: dict) -> int:
        missing = [path for path in records if not path.exists()]
        for path in missing:
            write_json_atomic(path, records[path])
        return len(missing)

    return put(finals), put(searches)


def _choices(spec: CompareSpec, out: Path) -> dict:
    """method -> the grid point with the best final A_T on the held-out images (the first of equals), and the grid."""
    chosen = {}
    for m in spec.methods:
        if m not in GRIDS:
            continue
        results = []
        for p in grid_points(m, spec.grids):
            rec = _load(_select_path(out, m, p))
            if rec is not None:
                results.append({"params": p, "val_A_T": rec["average_accuracy"][-1]})
        if len(results) == len(grid_points(m, spec.grids)):  # a partial grid chooses nothing
            best = max(results, key=lambda r: r["val_A_T"])  # max keeps the first of equals
            chosen[m] = {"params": best["params"], "grid": results}
    return chosen


def _stats(values):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def summarize(spec: CompareSpec, out) -> dict:
    """Gather the finished runs into ``results.json``, ``table.md`` and ``accuracy.png``."""
    out = Path(out)
    runs = {}
    chosen = _choices(spec, out)
    for m in spec.methods:
        for s in spec.seeds:
            rec = _load(_final_path(out, m, s))
            # a searched method's final counts once its value is the one chosen now (see _done)
            if rec is not None and (m not in GRIDS or (m in chosen and rec["params"] == chosen[m]["params"])):
                runs.setdefault(m, []).append(rec)
    summary = {"settings": spec.key(), "methods": spec.methods, "seeds": spec.seeds,
               "descriptions": {m: BASELINES.get(m, PIPELINE_DESCRIPTIONS.get(m)) for m in spec.methods},
               "hyperparameter_search": {"seed": spec.seeds[0], "evaluated_on": "held-out training images",
                                         **{m: c for m, c in chosen.items()}},
               "runs": runs, "table": {}}
    for m, recs in runs.items():
        row = {"seeds": [r["seed"] for r in recs]}
        for name, key in (("A_T", "average_accuracy"), ("forgetting_T", "forgetting"),
                          ("bwt_T", "backward_transfer")):
            row[name] = _stats([r[key][-1] for r in recs])
        measured = [r["generated"]["mean"][-1] for r in recs if "generated" in r]
        row["generated_T"], row["generated_seeds"] = _stats(measured), len(measured)
        for name in ("wall_seconds", "peak_rss_mb", "peak_cuda_mb", "bytes_kept"):
            row[name] = _stats([r[name] for r in recs])
        row["params"] = recs[0]["params"]
        row["exemplars"] = recs[0].get("exemplars")
        summary["table"][m] = row
    write_json_atomic(out / RESULTS_NAME, summary)
    (out / TABLE_NAME).write_text(_markdown(spec, summary))
    if runs:
        _plot(spec, runs, out / PLOT_NAME)
    return summary


def _fmt(stat, digits=1):
    mean, sd = stat
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _generated_cell(row) -> str:
    """The generated-sample column; a run made before the metric existed has none: say over how many seeds."""
    cell = _fmt(row.get("generated_T", (None, None)))
    measured = row.get("generated_seeds", 0)
    if 0 < measured < len(row["seeds"]):
        cell += f" ({measured} of {len(row['seeds'])} seeds)"
    return cell


def _markdown(spec: CompareSpec, summary: dict) -> str:
    lines = [f"{spec.dataset}, protocol {spec.protocol}, preset {spec.preset}, seeds "
             f"{','.join(map(str, spec.seeds))} (mean ± sample std over the seeds that finished; A_T, forgetting "
             "and backward transfer after the last task, in %; generated: a reference classifier's accuracy on "
             "generated images of every class, the generative methods' memory, another metric than A_T)", "",
             "| method | hyperparameters | seeds | A_T | forgetting | BWT | generated | wall s | peak RSS MB | "
             "bytes kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in spec.methods:
        row = summary["table"].get(m)
        if row is None:
            lines.append(f"| {m} | | 0 | - | - | - | - | - | - | - |")
            continue
        params = ", ".join(f"{k} {v:g}" for k, v in row["params"].items())
        if row["exemplars"]:
            params = f"{row['exemplars']} exemplars"
        kept = row["bytes_kept"][0]
        lines.append(f"| {m} | {params} | {len(row['seeds'])} | {_fmt(row['A_T'])} | {_fmt(row['forgetting_T'])} | "
                     f"{_fmt(row['bwt_T'])} | {_generated_cell(row)} | "
                     f"{_fmt(row['wall_seconds'], 0)} | {_fmt(row['peak_rss_mb'], 0)} | "
                     f"{'-' if kept is None else f'{kept / 1024:.0f} KiB'} |")
    search = summary["hyperparameter_search"]
    grids = [m for m in spec.methods if m in GRIDS]
    if grids:
        lines += ["", f"Hyperparameters chosen on held-out training images (seed {search['seed']}, A_T on them):", ""]
        for m in grids:
            if m not in search:
                lines.append(f"- {m}: search not finished")
                continue
            points = "; ".join(f"{_slug(g['params'])}: {g['val_A_T']:.1f}" for g in search[m]["grid"])
            lines.append(f"- {m}: **{_slug(search[m]['params'])}** (grid {points})")
    return "\n".join(lines) + "\n"


def _plot_labels(spec: CompareSpec, runs: dict) -> tuple[str, dict]:
    """The plot's title and each method's legend label: when the methods have finished different numbers of seeds,
    each label says its own count (the title alone would claim every seed for every method)."""
    counts = {m: len(recs) for m, recs in runs.items()}
    head = f"{spec.dataset} {spec.protocol}, {spec.preset} preset"
    if len(set(counts.values())) <= 1:
        n = next(iter(counts.values()), len(spec.seeds))
        return f"{head}, {n} seed(s): mean ± std", {m: m for m in runs}
    return f"{head}, n seed(s) per method: mean ± std", {m: f"{m} (n={n})" for m, n in counts.items()}


def _plot(spec: CompareSpec, runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    title, labels = _plot_labels(spec, runs)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: one per method (the default cycle repeats after 10)
    for i, (m, recs) in enumerate(runs.items()):
        color = colors[(2 * i) % 20 if i < 10 else (2 * (i - 10) + 1) % 20]
        A = np.array([[np.nan if v is None else v for v in r["average_accuracy"]] for r in recs], dtype=float)
        x = np.arange(1, A.shape[1] + 1)
        if m == "joint":  # trained once on everything: a point after the last task
            sd = float(np.std(A[:, -1], ddof=1)) if len(recs) > 1 else 0.0
            ax.errorbar(x[-1:], [float(np.mean(A[:, -1]))], yerr=[sd], fmt="*", markersize=11, label=labels[m],
                        capsize=3, color=color)
            continue
        mean = A.mean(axis=0)
        sd = A.std(axis=0, ddof=1) if len(recs) > 1 else np.zeros_like(mean)
        ours, generative = m in DGM_METHODS, m in GENERATIVE_METHODS  # DGM thick, its rivals solid, baselines dashed
        ax.plot(x, mean, marker="o", markersize=3, label=labels[m], color=color, linewidth=2.5 if ours else 1.2,
                linestyle="-" if generative else "--")
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.15)
    ax.set_xlabel("tasks learned")
    ax.xaxis.get_major_locator().set_params(integer=True)  # a task count: no 1.5 tick on a 5-task plot
    ax.set_ylabel("A_t: mean accuracy over the seen tasks (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _worker(job_path: str) -> int:
    import warnings

    # the runs evaluate through EvaluationPlugin without loggers on purpose: the log has one line per experience
    warnings.filterwarnings("ignore", message="No loggers specified")
    job = json.loads(Path(job_path).read_text())
    spec = CompareSpec(**job["spec"])
    record = run_one(spec, job["method"], job["seed"], job["params"], job["phase"], job["exemplars"])
    write_json_atomic(Path(job["out"]), record)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one run of dgm compare (used by dgm compare itself)")
    parser.add_argument("--worker", required=True, help="the run's job file")
    sys.exit(_worker(parser.parse_args().worker))
