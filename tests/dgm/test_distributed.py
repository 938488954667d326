"""Data-parallel training (dgm.distributed, docs/distributed.md): two CPU processes under torchrun with gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dgm.checkpoint import load_checkpoint
from dgm.cli import main
from dgm.distributed import CrossRankBatchNorm, World, convert_batchnorm, shard_bounds, state_digests
from dgm.presets import make_config
from dgm.train import train

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks.dp_cost import batchnorm_allreduces  # noqa: E402

WORKER = Path(__file__).with_name("dp_worker.py")
TIMEOUT_S = 600  # no torchrun job of these tests may take longer (a hang fails the test instead of CI)

# the 3-task run of these tests, as `dgm train` arguments
RUN_ARGS = ["--dataset", "synthetic", "--epochs", "2", "--num-tasks", "3", "--max-train-per-class", "48",
            "--threads", "1", "--backend", "cpu", "--set", "batch_size=16", "--set", "critic_widths=[4,8,8]",
            "--set", "classifier_widths=[4,8,8]", "--set", "max_test_per_class=16", "--set", "samples_per_class=2",
            "--set", "classifier_schedule=interleaved", "--set", "classifier_batchnorm=true"]


def torchrun(*args, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port each time), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# ---------------------------------------------------------------------------------------------------------
# in one process


def test_shards_cover_the_batch_once_and_evenly():
    for total in (0, 1, 3, 64, 65):
        for size in (1, 2, 3, 8):
            bounds = [shard_bounds(total, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_a_single_process_world_has_no_shards_and_no_collectives():
    world = World()
    assert not world.distributed and world.is_main and world.shard(64) is None
    assert world.sum_values([1, 2.5]) == [1.0, 2.5]
    t = torch.arange(6.0)
    assert world.gather_rows(t, None) is t
    world.check_same({"a": "x"}, "nothing")  # nobody to disagree with
    with pytest.raises(KeyError):
        world.agree(KeyError("raised on its own rank"))


def test_cross_rank_batchnorm_keeps_the_tensors_and_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ModuleList([nn.BatchNorm1d(4)]))
    with torch.no_grad():
        net[1].weight.uniform_()
    before = net.state_dict()
    params = {name: id(p) for name, p in net.named_parameters()}
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(net[1].state_dict())
    convert_batchnorm(net)
    assert isinstance(net[1], CrossRankBatchNorm) and isinstance(net[2][0], CrossRankBatchNorm)
    assert {name: id(p) for name, p in net.named_parameters()} == params  # optimizers stay valid
    assert net.state_dict().keys() == before.keys()
    x = torch.randn(5, 3, 4, 4)
    assert torch.equal(net[1](x), ref(x))
    assert torch.equal(net[1].running_var, ref.running_var)
    assert convert_batchnorm(None) is None


def test_state_digests_name_every_tensor_and_change_with_one_bit():
    state = {"g": {"w": torch.zeros(3), "bits": torch.ones(2, dtype=torch.bool)}, "widths": [1, 2], "n": 3,
             "rows": [torch.ones(1), {"x": torch.zeros(())}]}
    d = state_digests(state)
    assert set(d) == {"g.w", "g.bits", "widths", "n", "rows[0]", "rows[1].x"}
    state["g"]["w"][1] = 1e-30
    assert state_digests(state)["g.w"] != d["g.w"]
    assert {k: v for k, v in state_digests(state).items() if k != "g.w"} == {k: v for k, v in d.items() if k != "g.w"}


def test_dist_timeout_and_compile_errors(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", "--out", str(tmp_path / "a"), "--dist-timeout", "0"]) == 2
    assert "--dist-timeout must be > 0 seconds, got 0" in capsys.readouterr().err
    config = make_config("synthetic", compile=True)
    with pytest.raises(ValueError, match="compile is not supported with several processes"):
        train(config, tmp_path / "b", world=World(0, 2))


# ---------------------------------------------------------------------------------------------------------
# two processes


def test_one_iteration_of_two_ranks_gives_the_gradients_of_one_process(tmp_path):
    """2 ranks x 32 images against 1 process x 64 (and uneven shares: 3 rows, 1 row, so that rank 0 has none),
    DGMw and DGMa, at task 0 and after a growth, and DGMw on tasks of two classes (the AC-GAN term's shares); plus the cross-rank check failing loudly on a mismatch."""
    _ok(torchrun(WORKER, "grads", tmp_path))
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(report) == 3 * 2 * 3 + 1
        mismatch = report.pop("mismatch")
        assert "rank 1 differs from rank 0 in 1 of 2 tensors (first: b)" in mismatch
        for case, r in report.items():
            for net, g in r["grads"].items():
                # relative to the network's largest gradient. The mask scores' gradients are ill-conditioned sums
                # (BatchNorm's output sums to zero over the batch, times HAT's compensation): one process on the
                # cpu and reference backends, identical in exact arithmetic, differ by 9e-4 there
                # the AC-GAN case (two classes per task, after a task trained with it): the critic's gradient
                # differs by up to 4.7e-4 of its largest (measured; cross-entropy through the cross-rank BatchNorm)
                assert g["other"] < (1e-3 if "-aux/" in case else 1e-4), (case, net, g)
                assert g["scores"] < 5e-3, (case, net, g)
                assert g["n"] >= 12
            for name, (dp, one) in r["losses"].items():
                assert dp == pytest.approx(one, rel=1e-4, abs=1e-6), (case, name)
            assert r["replay_same"], case
            # the cost model's count (docs/distributed.md): generator 3 BatchNorms, critic 2, classifier 2
            aux = "-aux/" in case  # tasks of two classes: one classifier step per replayed class, plus the real
            steps = int(case.split("/task")[1][0]) * (2 if aux else 1) + 1
            assert r["batchnorm_allreduces"] == batchnorm_allreduces(3, 2, 2, steps, aux=aux), case
            assert r["running_stats"]["other"] < 1e-5, case


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "two"
    proc = _ok(torchrun("-m", "dgm", "train", *RUN_ARGS, "--out", out))
    return out, proc


def test_a_three_task_run_on_two_ranks_matches_one_process(two_rank_run, tmp_path, capsys):
    out, proc = two_rank_run
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["world_size"] == 2 and results["tasks_done"] == 3
    assert "3 tasks" in proc.stdout and "2 processes" in proc.stdout  # rank 0 prints the summary line once
    assert proc.stdout.count("run ") == 1
    assert (out / "samples" / "task_02.png").is_file() and (out / "accuracy.png").is_file()
    assert main(["train", *RUN_ARGS, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["world_size"] == 1
    # the same global batch and the same random numbers: the runs differ by float rounding only (summation order
    # of the gradients and BatchNorm statistics), which the GAN's training amplifies over the iterations
    assert results["generator"]["widths_per_task"] == one["generator"]["widths_per_task"]
    for row_dp, row_one in zip(results["accuracy_matrix"], one["accuracy_matrix"]):
        assert row_dp == pytest.approx(row_one, abs=12.5), (results["accuracy_matrix"], one["accuracy_matrix"])
    a, b = load_checkpoint(out), load_checkpoint(tmp_path / "one")
    ga, gb = a["generator"]["state"], b["generator"]["state"]
    floats = [k for k in ga if isinstance(ga[k], torch.Tensor) and ga[k].is_floating_point()]
    assert max(float((ga[k] - gb[k]).abs().max()) for k in floats) < 0.05
    # the reserved-weight bits: entries whose score ends near the binarisation threshold may fall either way
    # (measured: 574 of 122880 bits of conv1, 0.5 %)
    for k in (k for k in ga if k.endswith("frozen")):
        flipped = sum(bin(int(v)).count("1") for v in torch.bitwise_xor(ga[k], gb[k]).flatten())
        assert flipped <= 0.02 * 8 * ga[k].numel(), (k, flipped)


def test_a_killed_rank_stops_the_job_and_resume_on_two_ranks_finishes_it(two_rank_run, tmp_path):
    full, _ = two_rank_run
    out = tmp_path / "killed"
    proc = torchrun(WORKER, "cli", "kill:1:0:1", "train", *RUN_ARGS, "--out", out, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "dgm train: error: rank 0 of 2" in text, text[-4000:]
    assert "--resume" in text
    assert load_checkpoint(out)["tasks_done"] == 1  # the last finished task's checkpoint is intact
    _ok(torchrun("-m", "dgm", "train", *RUN_ARGS, "--out", out, "--resume"))
    a, b = load_checkpoint(full), load_checkpoint(out)
    matrix = json.loads((out / "results.json").read_text())["accuracy_matrix"]
    assert matrix == json.loads((full / "results.json").read_text())["accuracy_matrix"]
    for part in ("generator", "discriminator", "classifier"):
        sa, sb = a[part]["state"], b[part]["state"]
        assert sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa), part
    assert json.loads((out / "results.json").read_text())["world_size"] == 2


def test_a_hanging_rank_stops_the_job_after_the_timeout(tmp_path):
    out = tmp_path / "hung"
    proc = torchrun(WORKER, "cli", "hang:0:0:1", "train", *RUN_ARGS, "--num-tasks", "1", "--out", out,
                    "--dist-timeout", "5", timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "dgm train: error: rank 0 of 2: the other processes stopped answering during task 0" in text, text[-4000:]
    assert "No task had finished, so no checkpoint" in text
