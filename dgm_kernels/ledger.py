"""The mask ledger: what a mask-based continual learner must remember about which task owns which weights.

For every masked layer of a network (a chain of :mod:`dgm_kernels.nn` layers, in forward order) the ledger
keeps, as bits (1 bit per entry per task, never a float):

- the binary mask of every finished task, with the shape the layer had when that task was trained;
- the cumulative reserved mask M (union of all finished tasks' masks), at the layer's current shape;
- the widths ``(in, out)`` each task was trained with, so that an older task never sees a unit added
  after it (SPEC section 4).

Per-weight layers (DGMw: ``MaskedConv2d``, ``MaskedConvTranspose2d``, ``MaskedLinear``) have one bit per
weight; unit-gated layers (DGMa, HAT: ``GatedConv2d``, ``GatedConvTranspose2d``, ``GatedLinear``) one bit per
output unit.

The life of a task: train the scores (the layers read their frozen state, kept by the ledger as bits, and
the masked optimizers of :mod:`dgm_kernels.optim` skip frozen entries); ``commit_task(t)`` binarises
the scores, stores them and returns the newly reserved counts; ``expansion_plan(counts)`` says how many
channels each layer gains; ``grow(plan)`` enlarges the layers (old block in place, new weights fresh, the
optimizer state grown alike) and opens the next task with scores at 0 or from ``init`` (``begin_task()`` does the latter
alone when nothing grows).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as dnn
from .nn import UNIT, WEIGHT
from .backends import resolve
from .bits import packed_size, unit_block_pattern, unpack_bits_reference
from .functional import mask as mask_of_scores, pack_bits

STATE_VERSION = 1


class LedgerError(ValueError):
    """Bad use of the ledger (a task committed twice, an unknown layer, a corrupt state dict, ...)."""


class TaskView(NamedTuple):
    """The parameters with which task t computes in one layer."""

    weight: torch.Tensor  # a view of the live weight, sliced to the task's widths
    mask: torch.Tensor  # bool: the weight's shape (per-weight layers) or [out] (gated layers)
    bias: torch.Tensor | None


@dataclass
class _Record:
    """What the ledger keeps of one layer: bits and widths (the layer itself knows its kind and geometry)."""

    name: str
    module: dnn.MaskedLayer
    reserved: torch.Tensor  # packed bits at the layer's current mask shape
    task_bits: list = field(default_factory=list)
    task_shapes: list = field(default_factory=list)
    widths: list = field(default_factory=list)
    # input positions per unit of the previous layer: 1 in a chain, H*W after a flatten of [C, H, W];
    # None when the input width is no multiple of the previous layer's output width (not a chain)
    in_repeat: int | None = 1

    @property
    def kind(self) -> str:
        return self.module.mask_kind

    @property
    def in_width(self) -> int:
        return self.module.in_width

    @property
    def out_width(self) -> int:
        return self.module.out_width

    def mask_shape(self) -> tuple:
        return self.module.mask_shape()

    def unit_layout(self) -> tuple[int, int, int]:
        """The mask viewed as [outer, units, inner] with the output units in the middle."""
        shape = self.mask_shape()
        if self.kind == UNIT:
            return 1, shape[0], 1
        out_dim = self.module.out_dim
        outer = 1 if out_dim == 0 else shape[0]
        return outer, shape[out_dim], math.prod(shape[out_dim + 1:])

    def slice_weight(self, w: torch.Tensor, in_w: int, out_w: int) -> torch.Tensor:
        return w[:in_w, :out_w] if self.module.transposed else w[:out_w, :in_w]


def dgmw_expansion(new_counts: Sequence[int], in_width: int, out_widths: Sequence[int], kernel_areas: Sequence[int]) -> list[int]:
    """Channels each layer of a chain gains after a task, by DGM's per-weight rule (SPEC section 4).

    Layer 1 gains ``ceil(n_1 / (in_width k_1))`` outputs; layer l > 1 first gets ``a_{l-1} * C_l_old * k_l``
    free weights from its grown input, then gains ``max(ceil((n_l - a_{l-1} C_l_old k_l) / (C_{l-1}_new k_l)), 0)``
    outputs, where ``C_{l-1}_new = out_widths[l-1] + a_{l-1}`` is its new input width. Free capacity stays constant.
    """
    if not (len(new_counts) == len(out_widths) == len(kernel_areas)):
        raise LedgerError(
            f"new_counts, out_widths and kernel_areas must have one entry per layer, got lengths "
            f"{len(new_counts)}, {len(out_widths)}, {len(kernel_areas)}"
        )
    gains: list[int] = []
    for layer, n in enumerate(new_counts):
        n, k = int(n), int(kernel_areas[layer])
        if n < 0:
            raise LedgerError(f"new_counts[{layer}] must be >= 0, got {n}")
        if layer == 0:
            gain = -(-n // (in_width * k))
        else:
            prev = gains[-1]
            freed = prev * int(out_widths[layer]) * k
            in_new = int(out_widths[layer - 1]) + prev
            gain = max(-(-(n - freed) // (in_new * k)), 0)
        gains.append(gain)
    return gains


def dgma_expansion(new_counts: Sequence[int]) -> list[int]:
    """DGMa: a layer gains as many output units as the task newly reserved in it."""
    if any(int(n) < 0 for n in new_counts):
        raise LedgerError(f"new_counts must all be >= 0, got {list(new_counts)}")
    return [int(n) for n in new_counts]


class MaskLedger:
    """Bookkeeping of task masks for a chain of masked layers (see the module docstring)."""

    def __init__(self, layers, *, backend: str | None = None):
        if isinstance(layers, nn.Module):
            layers = [(n, m) for n, m in layers.named_modules() if isinstance(m, dnn.MaskedLayer)]
        layers = list(layers)
        if not layers:
            raise LedgerError("layers must hold at least one dgm_kernels.nn masked layer, got none")
        self.backend = backend
        self._records: list[_Record] = []
        names = set()
        for name, module in layers:
            if not isinstance(module, dnn.MaskedLayer):
                raise LedgerError(f"layer must be a dgm_kernels.nn masked layer, got {type(module).__name__}")
            if name in names:
                raise LedgerError(f"layer names must be unique, got {name!r} twice")
            names.add(name)
            rec = _Record(name, module, reserved=None)
            rec.reserved = torch.zeros(packed_size(math.prod(rec.mask_shape())), dtype=torch.uint8,
                                       device=module.weight.device)
            if self._records:
                prev = self._records[-1]
                rec.in_repeat = rec.in_width // prev.out_width if rec.in_width % prev.out_width == 0 else None
                if rec.kind == UNIT and module.frozen_in is not None and rec.in_repeat is None:
                    raise LedgerError(
                        f"layer {name!r} reads masked input units (input_masked=True), so its input width must be "
                        f"the previous layer {prev.name!r}'s output width ({prev.out_width}) or a multiple of it (a "
                        f"flatten of [{prev.out_width}, H, W]); got {rec.in_width}"
                    )
            self._records.append(rec)
        kinds = {r.kind for r in self._records}
        if len(kinds) != 1:
            raise LedgerError("layers must be all per-weight (DGMw) or all channel-gated (DGMa), got a mix")
        self.kind = kinds.pop()
        self._committed_open_task = False
        self._optimizers: list[weakref.ref] = []
        self._sync_frozen()

    # ------------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self._records[0].widths)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._records]

    def _record(self, name: str) -> _Record:
        for r in self._records:
            if r.name == name:
                return r
        raise LedgerError(f"layer must be one of {self.names}, got {name!r}")

    def _check_task(self, t) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.num_tasks:
            raise LedgerError(f"task must be an int in [0, {self.num_tasks}) (finished tasks), got {t!r}")
        return t

    def _check_shapes(self) -> None:
        for r in self._records:
            want = packed_size(math.prod(r.mask_shape()))
            if r.reserved.numel() != want:
                raise LedgerError(
                    f"layer {r.name!r} has mask shape {r.mask_shape()} but the ledger's reserved mask holds "
                    f"{r.reserved.numel()} bytes ({want} expected): was the layer resized outside MaskLedger.grow?"
                )

    def reserved(self, name: str) -> torch.Tensor:
        """The cumulative reserved mask of a layer as packed bits (its current mask shape)."""
        return self._record(name).reserved

    def reserved_mask(self, name: str) -> torch.Tensor:
        r = self._record(name)
        return unpack_bits_reference(r.reserved, r.mask_shape())

    def widths(self, name: str) -> list[tuple[int, int]]:
        """(in, out) widths of the layer for every finished task."""
        return [tuple(w) for w in self._record(name).widths]

    # ------------------------------------------------------------------------------------------------
    def _frozen_in_bits(self, index: int) -> torch.Tensor | None:
        """DGMa: the input units of layer ``index`` are the output units of the previous gated layer.

        After a flatten of ``[C, H, W]`` (input width ``C * H * W``), input unit ``i`` is channel ``i // (H W)``
        of the previous layer: each reserved channel freezes its ``H W`` positions.
        """
        rec = self._records[index]
        if rec.kind != UNIT or rec.module.frozen_in is None or index == 0:
            return None
        prev = self._records[index - 1]
        if rec.in_repeat == 1:
            return prev.reserved
        units = unpack_bits_reference(prev.reserved, (prev.out_width,))
        return pack_bits(units.repeat_interleave(rec.in_repeat).contiguous(), backend=self.backend)

    def _bias_frozen(self, rec: _Record) -> torch.Tensor | None:
        """Per-weight layers: the units whose bias a finished task computes with (packed bits), None without bias.

        A per-weight mask does not gate a unit: a finished task adds ``bias[o]`` at every output unit of its
        width, whatever its mask keeps, so every such bias is frozen.
        """
        if rec.kind != WEIGHT or rec.module.bias is None:
            return None
        used = max((w[1] for w in rec.widths), default=0)
        frozen = torch.arange(rec.out_width, device=rec.module.weight.device) < used
        return pack_bits(frozen, backend=self.backend)

    def _sync_frozen(self) -> None:
        """Bring every layer's frozen state, and every attached optimizer's, in step with the reserved masks."""
        for i, rec in enumerate(self._records):
            if rec.kind == WEIGHT:
                rec.module.set_frozen(rec.reserved, self._bias_frozen(rec))
            else:
                rec.module.frozen_out = rec.reserved.clone()
                fin = self._frozen_in_bits(i)
                if rec.module.frozen_in is not None:
                    rec.module.frozen_in = (fin.clone() if fin is not None
                                            else torch.zeros_like(rec.module.frozen_in))
        for optimizer in self.attached_optimizers():
            self._apply_frozen(optimizer)

    def frozen_parameters(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, packed frozen bits of its shape) for every parameter the ledger protects.

        Per-weight layers: the weight, frozen where reserved, and the bias, frozen at every unit a finished task
        computes with. Gated layers: the weight, frozen where its output and input units are both reserved, and
        the bias, frozen where its unit is reserved.
        """
        out = []
        for i, rec in enumerate(self._records):
            m = rec.module
            if rec.kind == WEIGHT:
                out.append((m.weight, rec.reserved))
                if m.bias is not None:
                    out.append((m.bias, self._bias_frozen(rec)))
                continue
            fo = unpack_bits_reference(rec.reserved, (rec.out_width,))
            fin_bits = self._frozen_in_bits(i)
            fi = None if fin_bits is None else unpack_bits_reference(fin_bits, (rec.in_width,))
            block = unit_block_pattern(m.weight.shape, fo, fi, m.transposed, getattr(m, "groups", 1))
            block = block[(...,) + (None,) * (m.weight.dim() - 2)].expand(m.weight.shape)
            out.append((m.weight, pack_bits(block.contiguous(), backend=self.backend)))
            if m.bias is not None:
                out.append((m.bias, rec.reserved))
        return out

    def attach(self, optimizer) -> None:
        """Keep a masked optimizer (dgm_kernels.optim) in step with the frozen entries of every parameter.

        From now on every change of the reserved masks (``commit_task``, ``begin_task``, ``grow``,
        ``load_state_dict``) reaches the optimizer too, and ``grow`` grows its parameters and state, until
        ``detach(optimizer)`` or until the optimizer is garbage-collected (the ledger holds a weak reference).
        """
        if not hasattr(optimizer, "set_frozen"):
            raise LedgerError(
                f"optimizer must be a dgm_kernels.optim masked optimizer (with set_frozen), got {type(optimizer).__name__}"
            )
        self._apply_frozen(optimizer)
        if all(o is not optimizer for o in self.attached_optimizers()):
            self._optimizers.append(weakref.ref(optimizer))

    def detach(self, optimizer) -> None:
        """Stop keeping ``optimizer`` in step (its frozen state stays as it is now)."""
        self._optimizers = [r for r in self._optimizers if r() is not None and r() is not optimizer]

    def attached_optimizers(self) -> list:
        """The optimizers given to ``attach`` that are still alive, in the order they were attached."""
        self._optimizers = [r for r in self._optimizers if r() is not None]
        return [r() for r in self._optimizers]

    def _apply_frozen(self, optimizer) -> None:
        for param, frozen in self.frozen_parameters():
            optimizer.set_frozen(param, frozen)

    # ------------------------------------------------------------------------------------------------
    def commit_task(self, task: int) -> dict[str, tuple[int, torch.Tensor]]:
        """Binarise every layer's current scores (1[e >= 0]), store them as task ``task``, update M.

        Returns, per layer, ``(number of newly reserved entries, newly reserved entries per output unit)``.
        """
        if isinstance(task, bool) or not isinstance(task, int):
            raise LedgerError(f"task must be an int, got {type(task).__name__}")
        if task < self.num_tasks:
            raise LedgerError(f"task {task} is already committed ({self.num_tasks} tasks are)")
        if self._committed_open_task:
            raise LedgerError(
                f"task {self.num_tasks - 1} was committed last and no new task was opened: call grow() or "
                f"begin_task() before committing task {task}"
            )
        if task != self.num_tasks:
            raise LedgerError(f"task must be the next task id, {self.num_tasks}, got {task}")
        self._check_shapes()
        impl = resolve(self.backend, self._records[0].module.weight.device)
        results, updates = {}, []
        for rec in self._records:  # compute everything first: on error the ledger stays unchanged
            shape = rec.mask_shape()
            task_bits = pack_bits((rec.module.scores.detach() >= 0).reshape(shape).contiguous(), backend=self.backend)
            outer, units, inner = rec.unit_layout()
            union, per_unit = impl.union_count(rec.reserved, task_bits, outer, units, inner)
            updates.append((rec, task_bits, shape, union))
            results[rec.name] = (int(per_unit.sum()), per_unit)
        for rec, task_bits, shape, union in updates:
            rec.task_bits.append(task_bits)
            rec.task_shapes.append(tuple(shape))
            rec.widths.append((rec.in_width, rec.out_width))
            rec.reserved = union
        self._committed_open_task = True
        self._sync_frozen()
        return results

    def begin_task(self, init="zeros") -> None:
        """Open the next task without growing; every layer's scores start again from ``init``.

        ``init``: ``"zeros"`` (every mask at 0.5 in anneal mode, every gate open in ste mode) or a callable that
        fills a scores tensor in place, called once per layer in the ledger's order (e.g.
        ``torch.nn.init.normal_`` or ``lambda e: torch.nn.init.normal_(e, 0.0, 1.0)``: HAT starts each task's
        embedding from random values). The ledger keeps no scores, only bits: to gate an old task softly later
        (:meth:`task_forward` with ``soft_scores``), save ``layer.scores.detach().clone()`` of every layer before
        ``commit_task``.
        """
        self._check_init(init)
        for rec in self._records:
            with torch.no_grad():
                if init == "zeros":
                    rec.module.scores.zero_()
                else:
                    init(rec.module.scores)
        self._committed_open_task = False
        self._sync_frozen()

    @staticmethod
    def _check_init(init) -> None:
        # checked before anything changes, so that a bad init leaves the ledger and the layers as they were
        if not (callable(init) or (isinstance(init, str) and init == "zeros")):
            raise LedgerError(f"init must be 'zeros' or a callable filling the scores in place, got {init!r}")

    def expansion_plan(self, counts: dict, rule: str | None = None) -> dict[str, int]:
        """Output channels each layer gains, from ``commit_task``'s counts, by the DGMw or DGMa rule."""
        rule = rule or ("dgmw" if self.kind == WEIGHT else "dgma")
        if rule not in ("dgmw", "dgma"):
            raise LedgerError(f"rule must be 'dgmw' or 'dgma', got {rule!r}")
        missing = [n for n in self.names if n not in counts]
        if missing:
            raise LedgerError(f"counts must hold every layer of the ledger; missing {missing}")
        new = [int(counts[n][0] if isinstance(counts[n], tuple) else counts[n]) for n in self.names]
        if rule == "dgma":
            return dict(zip(self.names, dgma_expansion(new)))
        recs = self._records
        gains = dgmw_expansion(new, recs[0].in_width, [r.out_width for r in recs], [r.module.kernel_area for r in recs])
        return dict(zip(self.names, gains))

    # ------------------------------------------------------------------------------------------------
    def grow(self, plan: dict[str, int], optimizer=None, *, init="zeros") -> dict[str, tuple[tuple, tuple]]:
        """Enlarge the layers: layer l gains ``plan[l]`` output channels, the next layer as many inputs.

        Every old value stays in place (old block first); new weights and biases get a fresh
        initialisation (the one of a new layer of the new size); the scores of the next task start from
        ``init`` (as in :meth:`begin_task`: ``"zeros"`` or a callable filling each layer's scores in place);
        old tasks keep their stored masks and widths, so they never see the new units. With ``optimizer``
        (a torch optimizer holding these parameters), its state (Adam moments, momentum buffers) grows
        alike, zero on the new entries, and the new parameters replace the old ones in its groups; so do the
        optimizers given to ``attach``. Returns ``{layer: (old weight shape, new weight shape)}``.
        """
        if not isinstance(plan, dict):
            raise LedgerError(f"plan must be a dict of layer name -> channels gained, got {type(plan).__name__}")
        self._check_init(init)
        for name, gain in plan.items():
            self._record(name)
            if isinstance(gain, bool) or not isinstance(gain, int) or gain < 0:
                raise LedgerError(f"plan[{name!r}] must be an int >= 0 (channels gained), got {gain!r}")
        self._check_shapes()
        prev_gain = 0
        for rec in self._records:  # everything is checked before anything grows
            gain = plan.get(rec.name, 0)
            try:
                rec.module.check_growth(prev_gain * (rec.in_repeat or 0), gain)
            except ValueError as exc:
                raise LedgerError(f"layer {rec.name!r}: {exc}") from None
            prev_gain = gain
        for i, rec in enumerate(self._records):
            if i and plan.get(self._records[i - 1].name, 0) and rec.in_repeat is None:
                prev = self._records[i - 1]
                raise LedgerError(
                    f"layer {rec.name!r} cannot grow its input with {prev.name!r}'s output: its input width "
                    f"{rec.in_width} is no multiple of {prev.name!r}'s output width {prev.out_width} (not a chain)"
                )
        optimizers = self.attached_optimizers()
        if optimizer is not None and all(o is not optimizer for o in optimizers):
            optimizers.append(optimizer)
        changes = {}
        prev_gain = 0
        for rec in self._records:
            gain = plan.get(rec.name, 0)
            old_shape = tuple(rec.module.weight.shape)
            self._grow_layer(rec, extra_in=prev_gain * (rec.in_repeat or 0), extra_out=gain, optimizers=optimizers)
            changes[rec.name] = (old_shape, tuple(rec.module.weight.shape))
            prev_gain = gain
        self.begin_task(init)
        if optimizer is not None and hasattr(optimizer, "set_frozen"):
            self.attach(optimizer)
        return changes

    def _grow_layer(self, rec: _Record, extra_in: int, extra_out: int, optimizers) -> None:
        old_mask_shape = rec.mask_shape()
        replacements = rec.module.grow(extra_in, extra_out)
        if not replacements:
            return
        # the reserved mask: old entries keep their bit, new entries are free
        old_reserved = unpack_bits_reference(rec.reserved, old_mask_shape)
        grown = torch.zeros(rec.mask_shape(), dtype=torch.bool, device=rec.reserved.device)
        grown[tuple(slice(0, d) for d in old_mask_shape)] = old_reserved
        rec.reserved = pack_bits(grown, backend=self.backend)
        for optimizer in optimizers:
            _grow_optimizer(optimizer, replacements)

    # ------------------------------------------------------------------------------------------------
    def task_view(self, name: str, task: int) -> TaskView:
        """The weight slice, binary mask and bias with which ``task`` computes in layer ``name``."""
        rec = self._record(name)
        t = self._check_task(task)
        in_w, out_w = rec.widths[t]
        weight = rec.slice_weight(rec.module.weight, in_w, out_w)
        mask = unpack_bits_reference(rec.task_bits[t], rec.task_shapes[t])
        bias = None if rec.module.bias is None else rec.module.bias[:out_w]
        return TaskView(weight, mask, bias)

    def task_forward(self, name: str, input: torch.Tensor, task: int, norm=None, *, soft_scores=None,
                     s=None) -> torch.Tensor:
        """Layer ``name`` computed as task ``task`` does: its widths, its binary mask (no gradient).

        ``input`` must have the task's input width. Old tasks keep generating exactly as before, whatever
        was trained or grown since. ``norm`` (a callable, e.g. the task's frozen BatchNorm) is applied to the
        layer's output before a gated layer's gate (after the output of a per-weight layer).

        ``soft_scores`` and ``s``: gate with ``sigmoid(s * soft_scores)`` instead of the stored bits (HAT's
        test-time gate, ``s = s_max``), where ``soft_scores`` are the task's real scores as saved before
        ``commit_task`` (``layer.scores.detach().clone()``; the ledger keeps bits only), of the task's mask shape
        (:meth:`task_mask_shapes`). Only the entries whose bit is 1 are protected from later tasks: a soft gate
        below 0.5 still passes ``sigmoid(s e)`` of units that later tasks may change, so the soft output of an old
        task stays exact only as far as those gates are 0 in float.
        """
        rec = self._record(name)
        view = self.task_view(name, task)
        m = rec.module
        in_w = rec.widths[task][0]
        if input.shape[-1 if m.linear else -3] != in_w:
            raise LedgerError(
                f"input of layer {name!r} for task {task} must have {in_w} channels (the task's width), got shape {tuple(input.shape)}"
            )
        gate = view.mask
        if (soft_scores is None) != (s is None):
            raise LedgerError("soft_scores and s go together (s scales the soft gate sigmoid(s * soft_scores)): "
                              f"got soft_scores {'None' if soft_scores is None else 'given'}, s={s!r}")
        if soft_scores is not None:
            shape = rec.task_shapes[task]
            if not isinstance(soft_scores, torch.Tensor) or tuple(soft_scores.shape) != shape:
                got = tuple(soft_scores.shape) if isinstance(soft_scores, torch.Tensor) else type(soft_scores).__name__
                raise LedgerError(f"soft_scores of layer {name!r} for task {task} must be a tensor of the task's mask "
                                  f"shape {shape}, got {got}")
            with torch.no_grad():
                gate = mask_of_scores(soft_scores.detach().to(m.weight.device), s, mode="anneal", backend=self.backend)
        with torch.no_grad():
            if rec.kind == WEIGHT:
                weight = view.weight * gate.to(view.weight.dtype)
            else:
                weight = view.weight
            if m.linear:
                out = F.linear(input, weight, view.bias)
            elif m.transposed:
                out = F.conv_transpose2d(input, weight, view.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
            else:
                out = F.conv2d(input, weight, view.bias, m.stride, m.padding, m.dilation, m.groups)
            if norm is not None:
                out = norm(out)
            if rec.kind == UNIT:
                # the gate's unit dim: the last of a linear layer's [..., out], dim 1 of a convolution's [N, C, H, W]
                shape = (-1,) if m.linear else (1, -1) + (1,) * (out.dim() - 2)
                out = out * gate.to(out.dtype).view(shape)
        return out

    # ------------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes the bookkeeping keeps: every task's mask bits, the reserved bits and the widths."""
        total = 0
        for rec in self._records:
            total += sum(b.numel() for b in rec.task_bits) + rec.reserved.numel() + 16 * len(rec.widths)
        return total

    def task_mask_shapes(self, name: str) -> list[tuple]:
        """The mask shape of layer ``name`` for every finished task (the shape it had when the task trained)."""
        return [tuple(s) for s in self._record(name).task_shapes]

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "open": not self._committed_open_task,
            "layers": [
                {
                    "name": r.name,
                    "mask_shape": list(r.mask_shape()),
                    "reserved": r.reserved.clone(),
                    "task_bits": [b.clone() for b in r.task_bits],
                    "task_shapes": [list(s) for s in r.task_shapes],
                    "widths": [list(w) for w in r.widths],
                }
                for r in self._records
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ledger saved by ``state_dict``; the layers must already have the saved shapes.

        Everything is validated before anything changes: a corrupt state raises LedgerError and leaves
        the ledger as it was.
        """
        def bad(why):
            return LedgerError(f"corrupt ledger state: {why}")

        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise bad(f"expected a dict with version {STATE_VERSION}, got "
                      f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        if state.get("kind") != self.kind:
            raise bad(f"kind must be {self.kind!r}, got {state.get('kind')!r}")
        layers = state.get("layers")
        if not isinstance(layers, list) or [ly.get("name") if isinstance(ly, dict) else None for ly in layers] != self.names:
            raise bad(f"layers must be {self.names} in order")
        n_tasks = None
        staged = []
        for rec, ly in zip(self._records, layers):
            shape = tuple(ly.get("mask_shape", ()))
            if shape != rec.mask_shape():
                raise bad(f"layer {rec.name!r} has mask shape {rec.mask_shape()}, the state {shape}")
            tb, ts, wd, res = ly.get("task_bits"), ly.get("task_shapes"), ly.get("widths"), ly.get("reserved")
            if not (isinstance(tb, list) and isinstance(ts, list) and isinstance(wd, list)) or not len(tb) == len(ts) == len(wd):
                raise bad(f"layer {rec.name!r}: task_bits, task_shapes and widths must be lists of equal length")
            if n_tasks is None:
                n_tasks = len(tb)
            elif len(tb) != n_tasks:
                raise bad(f"layer {rec.name!r} holds {len(tb)} tasks, an earlier layer {n_tasks}")
            for t, (b, s) in enumerate(zip(tb, ts)):
                if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.numel() != packed_size(math.prod(s)):
                    raise bad(f"layer {rec.name!r} task {t}: bits do not match the shape {tuple(s)}")
            if not isinstance(res, torch.Tensor) or res.dtype != torch.uint8 or res.numel() != packed_size(math.prod(shape)):
                raise bad(f"layer {rec.name!r}: reserved bits do not match the shape {shape}")
            if any(not (isinstance(w, (list, tuple)) and len(w) == 2) for w in wd):
                raise bad(f"layer {rec.name!r}: widths must be (in, out) pairs")
            dev = rec.module.weight.device
            staged.append((rec, [b.to(dev) for b in tb], [tuple(s) for s in ts], [tuple(int(v) for v in w) for w in wd], res.to(dev)))
        for rec, tb, ts, wd, res in staged:
            rec.task_bits, rec.task_shapes, rec.widths, rec.reserved = tb, ts, wd, res
        self._committed_open_task = not state.get("open", True)
        self._sync_frozen()


def _grow_optimizer(optimizer, replacements) -> None:
    """Swap grown parameters into an optimizer; state tensors of the parameter's shape grow with zeros."""
    for old, new, old_block in replacements:
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
        state = optimizer.state.pop(old, None)
        if state is None:
            continue
        grown = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                bigger = torch.zeros_like(new)
                bigger[old_block] = value
                grown[key] = bigger
            else:
                grown[key] = value
        optimizer.state[new] = grown
        if hasattr(optimizer, "forget"):
            optimizer.forget(old)
