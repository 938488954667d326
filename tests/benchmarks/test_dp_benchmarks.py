"""The data-parallel benchmarks: benchmarks/scaling.py (torchrun jobs) and benchmarks/dp_cost.py (the cost model)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import dp_cost, scaling  # noqa: E402

import dgm_kernels as dk  # noqa: E402


def test_process_counts_double_up_to_the_gpus():
    assert scaling.process_counts(1) == [1]
    assert scaling.process_counts(2) == [1, 2]
    assert scaling.process_counts(6) == [1, 2, 4, 6]
    assert scaling.process_counts(8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="at least one process"):
        scaling.process_counts(0)


def test_scaling_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["--nproc", "0,2"], "integers >= 1"), (["--nproc", "a"], "comma-separated integers"),
                      (["--task", "10"], "--task must be a task of mnist-dgmw-quick"),
                      (["--threads", "0"], "--threads and --iters must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            scaling.main(argv)
        assert exc.value.code == 2
        assert msg in capsys.readouterr().err


@pytest.mark.skipif(dk.backends.unavailable_reason("cpu", "cpu") is not None, reason="the cpu backend is not built")
def test_two_processes_time_the_iteration_and_count_the_reduced_bytes():
    row = scaling.run_one(2, case="mnist-dgmw-quick", task=1, device="cpu", threads=1, iters=2, warmup=1,
                          per_class=64, timeout=600)
    assert "error" not in row, row
    assert row["processes"] == 2 and row["iterations"] == 2 and row["global_batch"] == 64
    assert row["median_s"] > 0 and row["it_per_s"] == pytest.approx(1 / row["median_s"])
    # the quick preset trains its classifier after the GAN: critic and generator all-reduces only
    assert row["allreduced_bytes_per_iteration"] == 4 * (row["parameters"]["generator"] + row["parameters"]["critic"])
    data = {"case": "mnist-dgmw-quick", "task": 1, "device": "cpu", "settings": {"iters": 2, "warmup": 1},
            "rows": [dict(row, processes=1, median_s=2 * row["median_s"]), row,
                     {"processes": 4, "threads": 1, "error": "torchrun exited with 1: boom"}]}
    base = data["rows"][0]
    for r in data["rows"][1:2]:
        r["speedup"] = base["median_s"] / r["median_s"]
        r["efficiency"] = r["speedup"] / r["processes"]
    text = "\n".join(scaling.format_table(data))
    assert "| 2 | 1 | 64 |" in text and "2.00x | 1.00 |" in text and "failed: torchrun exited with 1: boom" in text


def test_cost_model_counts_growth_classifier_steps_and_collectives():
    rows = dp_cost.case_rows("mnist", "dgmw", "paper", tasks=3)
    assert [r["task"] for r in rows] == [0, 1, 2]
    assert rows[2]["generator"] > rows[0]["generator"]  # the generator grew
    for r in rows:
        # the paper preset's classifier is the critic, stepped t + 1 times per iteration
        assert r["classifier_steps"] == r["task"] + 1 and r["classifier"] == r["critic"]
        assert r["gradient_bytes"] == 4 * (r["generator"] + r["critic"] * (r["task"] + 2))
        assert r["gradient_allreduces"] == r["task"] + 3
        assert r["batchnorm_allreduces"] == dp_cost.batchnorm_allreduces(3, 2, 2, r["task"] + 1)
    quick = dp_cost.case_rows("mnist", "dgmw", "quick", tasks=1)[0]
    assert quick["classifier_steps"] == 0 and quick["batchnorm_allreduces"] == 29  # as profiled (docs)
    link = dp_cost.LINKS[0]
    t = dp_cost.comm_seconds(rows[0], link, 8)
    assert t == pytest.approx(36 * link.alpha_s + 1.75 * rows[0]["gradient_bytes"] / link.bandwidth)
    assert dp_cost.efficiency(0.08, 0.0, 8) == 1.0 and dp_cost.efficiency(0.08, 0.01, 8) == pytest.approx(0.5)
    text = "\n".join(dp_cost.format_tables({"mnist-dgmw-paper": rows}))
    assert "| mnist-dgmw-paper | 2 |" in text and "Scaling efficiency on 8 GPUs" in text
