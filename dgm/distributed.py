"""Data-parallel training on several processes (``torchrun``; docs/distributed.md): the process group, each rank's
share of a batch, gradient averaging, BatchNorm statistics over all ranks, gathering, and the check that every rank
holds the same networks.

The preset's batch is the global batch. Every rank draws the same random numbers for the whole batch (the same
seeds, the same draws as one process would make), takes its contiguous share of the rows (:class:`Shard`), and
computes its share of each batch mean (``sum over its rows / global batch size``). After each backward the
gradients are summed over the ranks with one all-reduce per optimizer step (:meth:`World.sum_gradients`), so that
every rank steps with the gradient of the global batch, the same on every rank. BatchNorm layers in training mode
compute their statistics over all ranks (:class:`CrossRankBatchNorm`), so a run does not depend on how many
processes share it beyond float rounding.

Why not ``DistributedDataParallel``: the generator grows after every task (new parameter tensors, which DDP's
buckets would not follow), the critic runs three forwards and a double backward (the gradient penalty) per step,
old tasks' modules are unused, and a step's gradient is complete only after the whole backward; one flat
all-reduce per step needs none of DDP's machinery and no re-wrapping (docs/distributed.md).

A single process (no ``torchrun``, or ``--nproc_per_node=1``) never enters this module's collectives: it takes
exactly the code path it took before distributed training existed.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "Shard", "DistributedError", "CrossRankBatchNorm", "start", "current_world", "shard_bounds",
           "convert_batchnorm", "state_digests", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600  # a collective that waits longer than this ends the job (a peer died or hangs)


class DistributedError(RuntimeError):
    """The processes of a run disagree or one of them stopped: the job cannot go on."""


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``total`` that rank ``rank`` of ``size`` takes: contiguous, sizes differing by at most one
    (a rank may get none when total < size)."""
    return total * rank // size, total * (rank + 1) // size


@dataclass(frozen=True)
class Shard:
    """One rank's share of a global batch of ``total`` rows: rows [lo, hi) (``world``: the ranks sharing it)."""

    lo: int
    hi: int
    total: int
    world: World

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.lo:self.hi]

    def mean(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global batch mean of ``v`` (its rows' sum over the global row count): the
        shares of all ranks add up to the mean over the global batch."""
        return v.sum() / self.total


@dataclass(frozen=True)
class World:
    """The processes of a run: ``size`` 1 is a single process (no collectives at all)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> Shard | None:
        """This rank's share of a global batch of ``total`` rows; None for a single process."""
        if not self.distributed:
            return None
        return Shard(*shard_bounds(total, self.rank, self.size), total, self)

    # -- collectives (call them on every rank, in the same order) -------------------------------------------
    def sum_gradients(self, params, scalars=()) -> list[float]:
        """Sum the gradients of ``params`` over the ranks, in place, with one all-reduce; returns ``scalars``
        (floats or 0-dim tensors: this rank's shares of the step's losses) summed over the ranks.

        A parameter without a gradient on every rank keeps none (optimizers skip it, as they would in one
        process); one with a gradient on some rank gets the sum (zeros standing in for the missing ones)."""
        params = list(params)
        ref = params[0] if params else None
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.float32
        parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None else torch.zeros(p.numel(), device=device,
                                                                                     dtype=dtype) for p in params]
        # one buffer, one all-reduce: the gradients, whether each parameter had one, and the losses to log
        tail = [float(p.grad is not None) for p in params] + [float(s) for s in scalars]
        flat = torch.cat(parts + [torch.tensor(tail, device=device, dtype=dtype)])
        dist.all_reduce(flat)
        total = sum(p.numel() for p in params)
        flags = flat[total:total + len(params)].tolist()
        offset = 0
        for p, present in zip(params, flags):
            n = p.numel()
            if present:
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n
        return flat[total + len(params):].tolist()

    def sum_values(self, values) -> list[float]:
        """Floats summed over the ranks (counts, losses)."""
        if not self.distributed:
            return [float(v) for v in values]
        # NCCL reduces GPU tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_rows(self, local: torch.Tensor, shard: Shard) -> torch.Tensor:
        """The global tensor of which every rank holds its ``shard`` of rows (dim 0), on every rank."""
        if not self.distributed:
            return local
        most = shard.total - shard.total * (self.size - 1) // self.size  # the largest share
        padded = local.new_zeros((most,) + tuple(local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        rows = []
        for r in range(self.size):
            lo, hi = shard_bounds(shard.total, r, self.size)
            rows.append(parts[r][: hi - lo])
        return torch.cat(rows)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Every rank passes the exception it met (or None); if any rank met one, every rank raises it (the first
        rank's), so that no rank goes on alone into a collective its peers will never join."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        gathered = [None] * self.size
        dist.all_gather_object(gathered, None if error is None else (type(error).__name__, str(error)))
        for rank, item in enumerate(gathered):
            if item is not None:
                if error is not None:
                    raise error
                raise DistributedError(f"rank {rank} failed ({item[0]}): {item[1]}")

    def check_same(self, digests: dict[str, str], what: str) -> None:
        """Fail loudly unless every rank holds the same ``digests`` (name -> hash, see :func:`state_digests`)."""
        if not self.distributed:
            return
        gathered = [None] * self.size
        dist.all_gather_object(gathered, digests)
        for rank, other in enumerate(gathered[1:], start=1):
            if other != gathered[0]:
                names = sorted(set(other) | set(gathered[0]))
                diff = [n for n in names if other.get(n) != gathered[0].get(n)]
                raise DistributedError(
                    f"{what}: rank {rank} differs from rank 0 in {len(diff)} of {len(names)} tensors "
                    f"(first: {', '.join(diff[:5])}); the ranks no longer train the same networks")


def current_world() -> World:
    """The running process group as a :class:`World` (a single process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def start(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): NCCL when the
    run uses CUDA GPUs (one per process: ``cuda:LOCAL_RANK``), gloo on CPUs. Without ``torchrun``, or with one
    process, nothing happens and a single-process :class:`World` is returned.

    ``timeout_s``: how long a collective waits for the other ranks before the job stops with an error."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if dist.is_initialized():
        return current_world()
    if not timeout_s > 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds, got {timeout_s!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    kwargs = {}
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} asks for CUDA but this process sees no GPU")
        if torch.cuda.device_count() <= local_rank:
            raise DistributedError(f"LOCAL_RANK {local_rank} needs GPU cuda:{local_rank}, but this node has "
                                   f"{torch.cuda.device_count()}: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return current_world()


# ------------------------------------------------------------------------------------------------------
# BatchNorm over all ranks


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose backward is the same sum of the gradients, itself differentiable (the critic's
    gradient penalty differentiates through the BatchNorm statistics twice).

    Written here: ``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated, and its
    replacement in ``torch.distributed._functional_collectives`` (private) wraps every result in a tensor subclass,
    slower on the CPU (docs/distributed.md)."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the global batch (every rank's rows), with the same
    parameters, buffers and state dict as the ``torch.nn.BatchNorm*d`` it replaces (:func:`convert_batchnorm`).

    Written here instead of using ``torch.nn.SyncBatchNorm``, which runs on GPUs only and whose backward is not
    differentiable again (the critic's gradient penalty needs that): the statistics are two differentiable
    all-reduces (the per-channel sums with the row count, then the sums of squared deviations from the global
    mean, which is as accurate as one process's two-pass variance). Outside training mode it is the plain layer.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (batch, channels, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_full((1,), input.numel() // max(input.shape[1], 1))
        # one all-reduce of the sums of x - K and (x - K)^2 with the row count: K, the running mean (the same on
        # every rank, near the batch mean), keeps E[(x-K)^2] - E[x-K]^2 free of cancellation
        shift = (self.running_mean.detach().clone() if self.track_running_stats else input.new_zeros(input.shape[1]))
        d = input - shift.view(shape)
        sums = _AllReduceSum.apply(torch.cat([d.sum(dims), d.square().sum(dims), count]))
        c = input.shape[1]
        n = sums[-1]
        offset = sums[:c] / n
        mean = shift + offset
        var = (sums[c:2 * c] / n - offset.square()).clamp_min(0)
        centred = d - offset.view(shape)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)
        return out


def convert_batchnorm(module: nn.Module | None) -> nn.Module | None:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` inside ``module`` by a :class:`CrossRankBatchNorm` holding the
    same parameter and buffer tensors (optimizers and state dicts stay valid). In place; returns ``module``."""
    if module is None:
        return None
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                parent.add_module(name, _cross_rank(child))
    return module


def _cross_rank(bn: nn.modules.batchnorm._BatchNorm) -> CrossRankBatchNorm:
    new = CrossRankBatchNorm.__new__(CrossRankBatchNorm)
    nn.Module.__init__(new)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(new, attr, getattr(bn, attr))
    for name, p in bn._parameters.items():
        new._parameters[name] = p
    for name, b in bn._buffers.items():
        new._buffers[name] = b
    new.training = bn.training
    return new


# ------------------------------------------------------------------------------------------------------
# the consistency check


def state_digests(states: dict) -> dict[str, str]:
    """A SHA-256 per tensor (and per other leaf) of nested dicts / lists of tensors: what :meth:`World.check_same`
    compares across ranks."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h = hashlib.sha256(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            out[prefix] = h.hexdigest()
        else:
            out[prefix] = hashlib.sha256(repr(value).encode()).hexdigest()

    walk("", states)
    return out
