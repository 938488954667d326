"""dgm compare: DGM against Avalanche's baselines (the extra 'avalanche'), on the synthetic data set."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("avalanche", reason="needs the optional extra: pip install -e '.[avalanche]'")

from avalanche.evaluation.metrics import accuracy_metrics  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from dgm import evaluate  # noqa: E402
from dgm.avalanche.baselines import (BASELINES, GRIDS, NormalizedInput, baseline_benchmark,  # noqa: E402
                                     build_strategy, exemplars_for_bytes, grid_points)
from dgm.avalanche.compare import (COMPARE_METHODS, CompareSpec, _accuracy_row, _choices,  # noqa: E402
                                   _plot_labels, generator_bytes, run_one)
from dgm.checkpoint import new_generator  # noqa: E402
from dgm.cli import main  # noqa: E402
from dgm.data import to_model_range  # noqa: E402

TINY = dict(epochs=1, batch_size=16, critic_widths=[4, 8, 8], classifier_widths=[4, 8, 8], samples_per_class=2,
            classifier_epochs=1, classifier_batch_size=32, backend="cpu")
TINY_ARGS = ["--dataset", "synthetic", "--num-tasks", "2", "--max-train-per-class", "24", "--max-test-per-class", "8",
             "--threads", "1"] + [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def _spec(**kw):
    base = dict(dataset="synthetic", num_tasks=3, max_train_per_class=24, max_test_per_class=8, overrides=TINY,
                threads=1)
    base.update(kw)
    return CompareSpec(**base).validate()


@pytest.mark.parametrize("method", [m for m in BASELINES])
def test_every_baseline_trains_and_yields_a_class_incremental_record(method):
    spec = _spec(protocol="5x2", num_tasks=2, methods=["dgmw", method])
    params = grid_points(method)[-1]
    rec = run_one(spec, method, 0, params, "final", exemplars=7 if method.startswith("icarl") else None)
    assert rec["method"] == method and rec["params"] == params and rec["num_tasks"] == 2
    assert rec["train_per_class"] == [24, 24]
    A = rec["average_accuracy"]
    assert len(A) == 2 and 0 <= A[-1] <= 100
    if method == "joint":  # trained once on everything: only the final row
        assert rec["accuracy_matrix"] is None and len(rec["final_row"]) == 2 and A[0] is None
        assert A[-1] == pytest.approx(sum(rec["final_row"]) / 2, abs=1e-3)
    else:
        R = rec["accuracy_matrix"]
        assert R[0][1] is None and A[0] == R[0][0]
        assert A[1] == pytest.approx((R[1][0] + R[1][1]) / 2, abs=1e-3)
        assert rec["backward_transfer"][1] == pytest.approx(R[1][0] - R[0][0], abs=1e-3)
    image_bytes = 1 * 32 * 32
    assert rec["image_bytes"] == image_bytes
    expected = {"joint": 96 * image_bytes, "cumulative": 96 * image_bytes, "icarl": 2 * 4 * image_bytes,
                "icarl-dgm": 2 * 4 * image_bytes}  # 7 exemplars over 2 then 4 classes: ceil(7/4) = 2 per class
    if method == "gr-vae":
        assert rec["bytes_kept"] > 0
    else:
        assert rec["bytes_kept"] == expected.get(method, 0)
    assert rec["peak_rss_mb"] > 0 and rec["wall_seconds"] > 0


def test_avalanches_accuracy_is_this_projects_on_the_same_predictions():
    """The accuracies compare reads from Avalanche's EvaluationPlugin equal dgm.evaluate's count on the same
    network's predictions (among the seen classes)."""
    from dgm.data import synthetic_tasks

    tasks = synthetic_tasks(0, num_tasks=3, max_train_per_class=24, max_test_per_class=8)
    spec = _spec()
    config = spec.config("naive", 0)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    built = build_strategy("naive", config, 3, {}, image_shape=(1, 32, 32), device="cpu", evaluator=evaluator, seed=0)
    bench = baseline_benchmark(tasks)
    built.strategy.train(bench.train_stream[0])
    built.model.seen = 1
    built.strategy.train(bench.train_stream[1])
    built.model.seen = 2
    row = _accuracy_row(built.strategy.eval(bench.test_stream[:2]), 2)
    built.model.eval()
    net = built.model.net
    ours = evaluate.accuracy_per_task(net.classify, [t.test for t in tasks[:2]], seen_classes=2)
    assert row == pytest.approx(ours, abs=1e-9)
    # the input mapping: Avalanche-normalised floats back to DGM's [-1, 1]
    x = tasks[0].test.images[:4]
    normalized = (x.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(NormalizedInput.to_model_range(normalized), to_model_range(x), atol=1e-5)
    # unseen classes are never predicted at evaluation
    logits = built.model(normalized)
    assert torch.isinf(logits[:, 2:]).all() and torch.isfinite(logits[:, :2]).all()


@pytest.mark.parametrize("method", ["dgr", "mergan-jtr"])
def test_the_rivals_run_in_compare_with_the_generated_sample_metric(method, tmp_path, monkeypatch):
    """A rival is trained by the pipeline inside compare (as DGM is), keeps its generator's bytes and is scored on
    generated images after every task: by class for a conditional generator, by its classifier's labels for DGR's."""
    monkeypatch.setenv("DGM_DATA_DIR", str(tmp_path))  # the reference classifier's cache
    spec = _spec(protocol="5x2", num_tasks=2, methods=[method], generated_per_class=6)
    rec = run_one(spec, method, 0, {}, "final")
    assert rec["method"] == method and len(rec["average_accuracy"]) == 2 and 0 <= rec["average_accuracy"][-1] <= 100
    g = new_generator(spec.config(method, 0), 4, "cpu")
    assert rec["bytes_kept"] == generator_bytes(g) > 0  # one unmasked network: its size does not change
    gen = rec["generated"]
    assert gen["n_per_class"] == 6 and len(gen["after_task"]) == 2 and len(gen["mean"]) == 2
    for t, after in enumerate(gen["after_task"]):
        assert len(after["per_task"]) == t + 1 and 0 <= after["mean"] <= 100
    if method == "dgr":
        shares = gen["after_task"][-1]["share_per_task"]
        assert sum(shares) == pytest.approx(100.0) and gen["after_task"][-1]["labelled_by"]
        # measuring between tasks changes nothing of the training: the same run without it, the same matrix
        unmeasured = run_one(_spec(protocol="5x2", num_tasks=2, methods=[method], generated_per_class=0), method, 0,
                             {}, "final")
        assert "generated" not in unmeasured and unmeasured["accuracy_matrix"] == rec["accuracy_matrix"]
    else:
        assert "share_per_task" not in gen["after_task"][-1]
    assert list(tmp_path.glob("reference/synthetic-*.pt"))


def test_dgms_bytes_are_its_weights_and_mask_bits():
    spec = _spec()
    g = new_generator(spec.config("dgmw", 0), 3, "cpu")
    state = g.state_dict()
    weights = sum(t.numel() * 4 for n, t in state.items() if isinstance(t, torch.Tensor) and t.dtype == torch.float32
                  and not n.endswith(".scores"))
    bits = g.ledger.memory_bytes()
    assert generator_bytes(g) == weights + bits
    assert exemplars_for_bytes(10 * 1024 + 5, 1024) == 10 and exemplars_for_bytes(3, 1024) == 1


def test_the_search_picks_the_best_held_out_accuracy(tmp_path):
    spec = _spec(methods=["ewc", "naive"])
    points = grid_points("ewc")
    assert len(points) == len(GRIDS["ewc"]["ewc_lambda"])
    scores = [30.0, 55.0, 55.0, 10.0, 20.0]
    from dgm.avalanche.compare import _slug

    for p, a in zip(points, scores):
        path = tmp_path / "runs" / "select" / f"ewc-{_slug(p)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"average_accuracy": [90.0, a]}))
        if p is points[2]:
            assert "ewc" not in _choices(spec, tmp_path)  # a partial grid chooses nothing
    chosen = _choices(spec, tmp_path)["ewc"]
    assert chosen["params"] == points[1]  # the best, the first of equals
    assert [g["val_A_T"] for g in chosen["grid"]] == scores


def test_dgm_compare_end_to_end_resumes_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DGM_DATA_DIR", str(tmp_path / "data"))  # the reference classifier's cache (runs inherit it)
    out = tmp_path / "cmp"
    methods = "dgmw,ewc,icarl-dgm"  # every kind of run: DGM, a searched method, one that needs another's result
    base = ["compare", *TINY_ARGS, "--out", str(out), "--jobs", "2", "--generated-per-class", "4",
            "--grid", "ewc.ewc_lambda=1,1e4"]
    args = [*base, "--methods", methods, "--seeds", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| method | hyperparameters |" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == methods.split(",")
    search = results["hyperparameter_search"]["ewc"]
    assert [g["params"]["ewc_lambda"] for g in search["grid"]] == [1.0, 1e4]  # the --grid replaced the default one
    for m in methods.split(","):
        rec = results["runs"][m][0]
        assert rec["seed"] == 0 and len(rec["average_accuracy"]) == 2
    # iCaRL's budget: as many images as DGMw's bytes hold
    dgm = results["runs"]["dgmw"][0]
    assert results["runs"]["icarl-dgm"][0]["exemplars"] == dgm["bytes_kept"] // dgm["image_bytes"]
    # the searched method's final run used the chosen value, and was evaluated on the test images
    assert results["runs"]["ewc"][0]["params"] == results["hyperparameter_search"]["ewc"]["params"]
    assert results["runs"]["ewc"][0]["evaluated_on"] == "test"
    assert (out / "accuracy.png").stat().st_size > 0 and "ewc" in (out / "table.md").read_text()
    # the generated-sample column: DGM's generator scored after every task, the baselines have none
    assert len(dgm["generated"]["mean"]) == 2 and "generated" not in results["runs"]["ewc"][0]
    assert results["table"]["dgmw"]["generated_T"][0] == dgm["generated"]["mean"][-1]
    assert results["table"]["ewc"]["generated_T"] == [None, None]
    from dgm.avalanche.compare import _generated_cell  # a run made before the metric: the cell says so

    partial = {**results["table"]["dgmw"], "seeds": [0, 1], "generated_seeds": 1}
    assert _generated_cell(partial).endswith("(1 of 2 seeds)")

    # resumable: the same command runs nothing again; a new seed runs only its runs
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == stamps
    assert main([*base, "--methods", "dgmw,ewc", "--seeds", "0,1"]) == 0
    new = {p for p in (out / "runs").rglob("*.json")} - set(stamps)
    assert {p.name for p in new} == {"dgmw-seed1.json", "ewc-seed1.json"}  # the search is not run again

    # another grid: its new point is searched, and the final runs are redone only where the choice changed
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert main([*base[:-2], "--grid", "ewc.ewc_lambda=1e6", "--methods", "dgmw,ewc", "--seeds", "0,1"]) == 0
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    changed = {p.name for p in after if before.get(p) != after[p]}
    assert changed == {"ewc-ewc_lambda=1e+06.json", "ewc-seed0.json", "ewc-seed1.json"}
    assert json.loads((out / "runs" / "final" / "ewc-seed1.json").read_text())["params"] == {"ewc_lambda": 1e6}
    capsys.readouterr()

    # continued from the results.json alone (the run directory lost): nothing is run again, the same table comes out
    again = [*base[:-2], "--grid", "ewc.ewc_lambda=1e6", "--methods", "dgmw,ewc", "--seeds", "0,1"]
    copy = tmp_path / "copy"
    assert main([*again, "--out", str(copy), "--restore", str(out / "results.json")]) == 0
    assert "restored 4 run(s) and 1 search run(s)" in capsys.readouterr().out
    assert not list((copy / "logs").rglob("*.log"))  # no run was started
    assert (copy / "table.md").read_text() == (out / "table.md").read_text()
    restored = json.loads((copy / "results.json").read_text())
    assert restored["runs"] == json.loads((out / "results.json").read_text())["runs"]
    # a results.json of other settings, or a file that is none, is refused naming what is wrong
    assert main([*again, "--out", str(tmp_path / "other"), "--num-tasks", "1",
                 "--restore", str(out / "results.json")]) == 2
    err = capsys.readouterr().err
    assert "results.json holds a comparison with other settings (num_tasks differ" in err
    assert main([*again, "--out", str(tmp_path / "other"), "--restore", str(out / "table.md")]) == 2
    assert "restore must be a results.json written by dgm compare" in capsys.readouterr().err

    # other settings in the same directory are refused, naming what differs
    assert main([*base, "--methods", "naive", "--protocol", "5x2"]) == 2
    err = capsys.readouterr().err
    assert "holds a comparison with other settings" in err and "protocol" in err


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dgmw,nonsense"], "methods must be a comma-separated list of dgmw, dgma"),
    (["--methods", "naive,naive"], "must not repeat"),
    (["--protocol", "3x3"], "protocol must be one of 10x1, 5x2, got '3x3'"),
    (["--seeds", "0,x"], "seeds must be comma-separated ints"),
    (["--methods", "icarl-dgm"], "add dgmw to methods"),
    (["--val-fraction", "0"], "val_fraction must be in (0, 1)"),
    (["--generated-per-class", "-1"], "generated_per_class must be an int >= 0, got -1"),
    (["--preset", "paper"], "needs a separate classifier"),
    pytest.param(["--device", "cuda"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")),
    (["--set", "classifier_epochs=-1"], "classifier_epochs must be an int >= 0"),
    (["--grid", "ewc.ewc_lambda=big"], "--grid must be METHOD.PARAM=V1,V2,... with numbers"),
    (["--grid", "naive.lr=1"], "grid: method must be one of ewc, si, lwf, rwalk"),
    (["--grid", "ewc.alpha=1"], "grid: ewc's hyperparameter must be one of ewc_lambda, got 'alpha'"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main(["compare", "--dataset", "synthetic", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_plot_says_how_many_seeds_each_method_finished():
    spec = CompareSpec(dataset="mnist", protocol="10x1", methods="dgmw,dgr", seeds=[0, 1, 2]).validate()
    title, labels = _plot_labels(spec, {"dgmw": [{}, {}, {}], "dgr": [{}]})
    assert "n seed(s) per method" in title and labels == {"dgmw": "dgmw (n=3)", "dgr": "dgr (n=1)"}
    title, labels = _plot_labels(spec, {"dgmw": [{}, {}], "dgr": [{}, {}]})
    assert title == "mnist 10x1, quick preset, 2 seed(s): mean ± std" and labels == {"dgmw": "dgmw", "dgr": "dgr"}


def test_every_method_is_named_once():
    assert COMPARE_METHODS[:5] == ("dgmw", "dgma", "dgr", "mergan-jtr", "mergan-ra")
    assert set(COMPARE_METHODS[5:]) == set(BASELINES)
    assert set(GRIDS) <= set(BASELINES)
    assert all(math.prod(len(v) for v in GRIDS[m].values()) == len(grid_points(m)) for m in GRIDS)


def test_an_interrupted_compare_ends_its_runs_and_resumes(tmp_path):
    """SIGTERM (a scheduler) or Ctrl-C: the running workers are ended, no new one starts, exit 130; the same command
    then finishes the comparison."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "dgm", "compare", *TINY_ARGS, "--methods", "dgmw,naive", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = out / "logs" / "final" / "dgmw-seed0.job.json"
    deadline = time.time() + 300
    while not job.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert job.exists(), proc.stderr.read() if proc.poll() is not None else "the first run never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "the same command continues it" in err
    leftover = subprocess.run(["pgrep", "-f", str(job)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "a worker outlived the interrupted comparison"
    assert not (out / "runs" / "final" / "naive-seed0.json").exists()  # no run started after the signal
    assert main(["compare", *TINY_ARGS, "--methods", "dgmw,naive", "--out", str(out)]) == 0
    assert all((out / "runs" / "final" / f"{m}-seed0.json").exists() for m in ("dgmw", "naive"))
