"""One process of the data-parallel tests (tests/dgm/test_distributed.py), started by ``torchrun``.

``python dp_worker.py grads OUT``: every rank runs one GAN iteration of the global batch with its share
(2 ranks x 32 images) and, on its own, the same iteration of one process with all 64 images (from copies of the
same networks, plain BatchNorm); writes the largest gradient and loss differences to OUT/rank<r>.json.

``python dp_worker.py cli KILL_AT ARGS...``: ``dgm train ARGS`` through the real command line, with rank 1 killing
itself (``KILL_AT`` = ``kill:T:E:B``, SIGKILL before iteration B of epoch E of task T) or hanging (``hang:T:E:B``)
on the way; ``none`` runs it plainly.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _tiny(method: str, **kw):
    from dgm.presets import make_config

    base = dict(epochs=1, num_tasks=2, max_train_per_class=64, max_test_per_class=8, batch_size=64, threads=1,
                critic_widths=[4, 8, 8], classifier_widths=[4, 8, 8], samples_per_class=2, backend="cpu",
                classifier_schedule="interleaved", classifier_batchnorm=True, replay_per_class=64)
    base.update(kw)
    return make_config("synthetic", method, "quick", **base)


def _grads(nets) -> dict:
    out = {}
    for name, net in nets.items():
        for pname, p in net.named_parameters():
            if p.grad is not None:
                out[f"{name}.{pname}"] = p.grad.detach().clone()
    return out


def _compare(a: dict, b: dict) -> dict:
    """The largest difference of two sets of named tensors relative to the largest value of the set (a gradient
    that is zero in exact arithmetic, such as a convolution bias before a BatchNorm, is rounding noise both
    ways: compared per tensor it would look like a 100 % difference), for the mask scores and for the rest."""
    if a.keys() != b.keys():
        return {"keys_differ": sorted(set(a) ^ set(b))}
    scale = max([float(v.abs().max()) for v in b.values()] + [1e-30])
    out = {"scores": 0.0, "other": 0.0, "n": len(a)}
    for k in a:
        kind = "scores" if k.endswith("scores") else "other"
        out[kind] = max(out[kind], float((a[k] - b[k]).abs().max()) / scale)
    return out


def grads(out_dir: str) -> None:
    from dgm.checkpoint import new_generator
    from dgm.data import synthetic_tasks, to_model_range
    from dgm import distributed as dd
    from dgm.distributed import DistributedError, start
    from dgm.steps import new_classifier, new_critic, prepare_task, task_seeds
    from dgm.train import train_task

    world = start("cpu", 60)
    torch.set_num_threads(1)
    report = {}
    # DGMw and DGMa on tasks of one class; DGMw on tasks of two classes, where the AC-GAN term is on
    for method, per_task in (("dgmw", 1), ("dgma", 1), ("dgmw", 2)):
        config = _tiny(method).validate()
        tasks = synthetic_tasks(0, num_tasks=2, max_train_per_class=64, max_test_per_class=8,
                                classes_per_task=per_task)
        n_classes = sum(len(t.positions) for t in tasks)
        torch.manual_seed(task_seeds(0, 10**6 + 1)[0])
        G, D, C = new_generator(config, n_classes, "cpu"), new_critic(config, "cpu"), new_classifier(config, "cpu")
        init = G.mask_sizes()
        G.set_backend(config.backend)
        for t in range(2):
            if t == 1:  # after a growth: task 0 trained by one process (the same on every rank), then committed
                D, C, _ = train_task(config, 0, tasks, G, D, C, init, "cpu", {})
                G.commit_and_expand()
            real = tasks[t].train
            for rows in (64, 3, 1):  # even shares, uneven shares, and rank 0 without any row
                idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(rows))[:rows]
                x, pos = to_model_range(real.images[idx]), real.positions[idx]
                Gr, Dr, Cr = copy.deepcopy(G), copy.deepcopy(D), copy.deepcopy(C)
                step_r, Dr, Cr = prepare_task(config, t, tasks, Gr, Dr, Cr, init, "cpu")
                out_r = step_r.iteration(x, pos, idx, 50.0, 1e4)
                Gd, Dd, Cd = copy.deepcopy(G), copy.deepcopy(D), copy.deepcopy(C)
                step_d, Dd, Cd = prepare_task(config, t, tasks, Gd, Dd, Cd, init, "cpu", world)
                same_replay = (step_r.replay_x is None and step_d.replay_x is None) or float(
                    (step_r.replay_x - step_d.replay_x).abs().max()) < 1e-5
                calls = [0]
                plain_forward = dd._AllReduceSum.forward

                def counting(ctx, t, plain=plain_forward):
                    calls[0] += 1
                    return plain(ctx, t)

                dd._AllReduceSum.forward = staticmethod(counting)
                try:
                    out_d = step_d.iteration(x, pos, idx, 50.0, 1e4)
                finally:
                    dd._AllReduceSum.forward = staticmethod(plain_forward)
                key = f"{method}{'' if per_task == 1 else '-aux'}/task{t}/rows{rows}"
                report[key] = {
                    "grads": {n: _compare(_grads({n: a}), _grads({n: b}))
                              for n, a, b in (("G", Gd, Gr), ("D", Dd, Dr), ("C", Cd, Cr))},
                    "losses": {k: [out_d[k], out_r[k]] for k in ("d", "gp", "w", "g", "reg", "c")},
                    "replay_same": bool(same_replay),
                    "batchnorm_allreduces": calls[0],
                    "running_stats": _compare({k: v for k, v in Gd.state_dict().items() if "running" in k},
                                              {k: v for k, v in Gr.state_dict().items() if "running" in k}),
                }
    try:  # the check after every task must fail loudly when the ranks differ
        world.check_same({"a": "1", "b": str(world.rank)}, "deliberately different")
    except DistributedError as exc:
        report["mismatch"] = str(exc)
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


def cli(kill_at: str, argv: list[str]) -> int:
    import dgm.cli
    import dgm.train

    if kill_at != "none":
        how, *where = kill_at.split(":")
        where = tuple(int(v) for v in where)
        rank = int(os.environ.get("RANK", "0"))

        def hook(task, epoch, batch):
            if rank == 1 and (task, epoch, batch) == where:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # "hang": never answer again

        plain = dgm.train.train

        def train(*args, **kw):
            kw["hooks"] = {"iteration": hook}
            return plain(*args, **kw)

        dgm.train.train = train
    return dgm.cli.main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        grads(sys.argv[2])
    else:
        sys.exit(cli(sys.argv[2], sys.argv[3:]))
