"""dgm.avalanche: benchmarks from the project's readers and DGM as an Avalanche strategy (the extra 'avalanche')."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

pytest.importorskip("avalanche", reason="needs the optional extra: pip install -e '.[avalanche]'")

from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from dgm.avalanche import DGMStrategy, ModelRangeInput, benchmark_from_tasks, experience_task  # noqa: E402
from dgm.checkpoint import load_checkpoint  # noqa: E402
from dgm.data import synthetic_tasks, to_model_range  # noqa: E402
from dgm.presets import ConfigError, make_config  # noqa: E402
from dgm.train import train  # noqa: E402


def _tiny(**kw):
    base = dict(epochs=2, num_tasks=3, max_train_per_class=48, max_test_per_class=16, batch_size=16, threads=1,
                critic_widths=[4, 8, 8], classifier_widths=[4, 8, 8], samples_per_class=2, classifier_epochs=1,
                classifier_batch_size=32, backend="cpu")
    base.update(kw)
    return make_config("synthetic", "dgmw", "quick", **base)


def _tasks(classes_per_task=1, val=0.0):
    if classes_per_task == 1 and not val:
        return synthetic_tasks(0, num_tasks=3, max_train_per_class=48, max_test_per_class=16)
    from dgm.data.datasets import ImageSet
    from dgm.data.splits import split_tasks

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(20)
    data = ImageSet(torch.randint(0, 256, (120, 1, 8, 8), dtype=torch.uint8, generator=g), labels)
    return split_tasks(data, data, list(range(6)), classes_per_task, val, 0)


def test_the_benchmark_holds_the_tasks_images_in_their_order():
    tasks = _tasks()
    bench = benchmark_from_tasks(tasks)
    assert len(bench.train_stream) == len(bench.test_stream) == 3
    assert not hasattr(bench, "valid_stream")
    for t, (exp, task) in enumerate(zip(bench.train_stream, tasks)):
        assert sorted(exp.classes_in_this_experience) == list(task.positions)
        x, y, tl = exp.dataset[0]
        assert x.dtype == torch.uint8 and int(tl) == 0
        back = experience_task(exp, t)
        assert torch.equal(back.train.images, task.train.images)
        assert torch.equal(back.train.positions, task.train.positions)
    two = _tasks(classes_per_task=2, val=0.1)
    bench2 = benchmark_from_tasks(two)
    assert len(bench2.train_stream) == len(two) and len(bench2.valid_stream) == len(two)
    assert [sorted(e.classes_in_this_experience) for e in bench2.train_stream] == [list(t.positions) for t in two]
    with pytest.raises(ValueError, match="at least one task"):
        benchmark_from_tasks([])


def test_model_range_input_converts_bytes_like_dgm():
    net = torch.nn.Flatten()
    m = ModelRangeInput(net)
    x = torch.randint(0, 256, (2, 1, 3, 3), dtype=torch.uint8)
    assert torch.equal(m(x), to_model_range(x).flatten(1))
    assert torch.equal(m(x.float()), x.float().flatten(1))
    padded = ModelRangeInput(net, num_outputs=12)(x)
    assert padded.shape == (2, 12) and torch.isinf(padded[:, 9:]).all() and (padded[:, 9:] < 0).all()


def test_the_strategy_trains_the_networks_of_dgm_train_bit_for_bit(tmp_path):
    config = _tiny()
    tasks = _tasks()
    bench = benchmark_from_tasks(tasks)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 bwt_metrics(experience=True, stream=True), loggers=[])
    strategy = DGMStrategy(config=config, n_classes=3, evaluator=evaluator)
    assert all(id(p) not in {id(q) for q in strategy.model.parameters()}
               for p in list(strategy.generator.parameters()) + list(strategy.critic.parameters()))
    rows, bwt = [], []
    for t, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream)
        rows.append([100 * metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{k:03d}"] for k in range(t + 1)])
        bwt.append(metrics.get("StreamBWT/eval_phase/test_stream"))
    results = train(config, tmp_path / "run", tasks=tasks)
    for t, row in enumerate(rows):
        assert row == pytest.approx(results["accuracy_matrix"][t][: t + 1], abs=1e-9)
    # Avalanche's backward transfer over the stream is this project's (mean over the earlier tasks)
    for t in range(1, 3):
        assert 100 * bwt[t] == pytest.approx(results["backward_transfer"][t], abs=1e-6)
    ckpt = load_checkpoint(tmp_path / "run")
    for name, tensor in strategy.generator.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, ckpt["generator"]["state"][name]), name
    for name, tensor in strategy.classifier.state_dict().items():
        assert torch.equal(tensor, ckpt["classifier"]["state"][name]), name
    assert [e["widths"] for e in strategy.expansions] == [e["widths"] for e in results["generator"]["expansions"]]


def test_the_strategy_refuses_a_shared_classifier_and_bad_sizes():
    with pytest.raises(ConfigError, match="needs a separate classifier"):
        DGMStrategy(config=make_config("synthetic", "dgmw", "paper"), n_classes=3)
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        DGMStrategy(config=_tiny(), n_classes=0)


def test_without_the_extra_the_import_names_the_install_command(monkeypatch):
    for name in [m for m in sys.modules if m == "dgm.avalanche" or m.startswith("dgm.avalanche.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "avalanche", None)  # "import avalanche" now fails
    with pytest.raises(ImportError, match=r'pip install --no-build-isolation -e "\.\[avalanche\]"'):
        importlib.import_module("dgm.avalanche")


def test_the_readme_example_runs():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "avalanche_dgm.py"
    proc = subprocess.run([sys.executable, str(script), "--dataset", "synthetic", "--epochs", "1", "--experiences", "2",
                           "--max-train-per-class", "32"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final accuracy over the classes seen:" in proc.stdout
    assert "Top1_Acc_Exp/eval_phase/test_stream/Exp001" in proc.stdout  # Avalanche's logger printed its metrics
