"""Parity of the ledger's kernels on every backend: bit packing, union + popcount, masked optimizer steps.

The backend contract (tests/kernels/test_backend_contract.py) makes every backend implement ``pack_bits``,
``union_count``, ``adam_step_`` and ``sgd_step_``; here the bit kernels must agree exactly with the reference,
the optimizer steps to the rounding of their dtype, and frozen entries must stay bit-identical.

These are the only parity tests of the four methods: every row of ``helpers.backend_params()`` runs every case,
so a case added here reaches every backend. The backend files keep what is their own (the ops' argument
checks, opcheck, torch.compile, the kernels' internal parameters, packed bits read inside the kernels).
A row is skipped for a case only where the backend cannot take the input, with the reason.
"""
from __future__ import annotations

import pytest
import torch

from dgm_kernels.backends import reference
from dgm_kernels.backends import resolve
from dgm_kernels.bits import pack_bits_reference, unpack_bits_reference

from helpers import backend_params

BACKENDS = backend_params()


def _impl(backend, device):
    return resolve(backend, torch.device(device))


def _interpreted(backend, device):
    """Triton kernels on CPU tensors run in Triton's interpreter (tests/conftest.py): correct, but slow per
    program and limited to float32/float64 (numpy runs it)."""
    return backend == "triton" and device == "cpu"


def _size(backend, device, full, interpreted):
    # Sizes chosen for a GPU's or OpenMP's chunking (several blocks, more units than a block's histogram) are
    # kept for every real device; the interpreter gets a smaller size with the same shape of problem, since a
    # program there costs milliseconds (the 600_000-unit union takes ~13 s).
    return interpreted if _interpreted(backend, device) else full


# ----------------------------------------------------------------------------------------------------------
# pack_bits
# ----------------------------------------------------------------------------------------------------------
# empty, sizes around a byte (7, 8, 9, 15..17), a 32-flag word and a 64-bit one (31..33, 63..65), thousands,
# several programs of the interpreter (70001), a megabit whose chunks start inside bytes, and N-D shapes
PACK_SHAPES = [(0,), (1,), (7,), (8,), (9,), (15,), (16,), (17,), (31,), (32,), (33,), (63,), (64,), (65,),
               (1000,), (70_001,), (1_000_003,), (3, 5, 7), (24, 12, 4, 4), (1000, 3)]


@pytest.mark.parametrize("shape", PACK_SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pack_bits_exact(backend, device, shape):
    impl = _impl(backend, device)
    mask = torch.rand(shape, device=device) < 0.37
    got = impl.pack_bits(mask)
    assert got.dtype == torch.uint8 and got.shape == ((mask.numel() + 7) // 8,)
    assert torch.equal(got, pack_bits_reference(mask))
    assert torch.equal(unpack_bits_reference(got, shape), mask)
    # a non-contiguous view of the same size: the bits follow the row-major order of the view, not the storage
    # (compare first, then slice: a comparison of a view would give a new, contiguous tensor)
    strided = (torch.rand(shape + (2,), device=device) < 0.5)[..., 1]
    assert not strided.is_contiguous() or strided.numel() <= 1
    assert torch.equal(impl.pack_bits(strided), pack_bits_reference(strided.contiguous()))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pack_bits_of_strided_views(backend, device):
    # views whose row-major order differs from the storage order in other ways than a step on the last dim
    base = torch.rand(6, 5, 4, device=device) < 0.5
    for view in (base.transpose(0, 2), base[:, ::2], base.permute(1, 2, 0)[..., 1:]):
        assert not view.is_contiguous()
        assert torch.equal(_impl(backend, device).pack_bits(view), pack_bits_reference(view.contiguous()))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pack_bits_bit_order_and_padding(backend, device):
    # written out, not compared with the reference: entry i is bit i % 8 (LSB first) of byte i // 8, and the
    # padding bits of the last byte are 0
    mask = torch.zeros(11, dtype=torch.bool, device=device)
    mask[[0, 3, 8, 10]] = True
    impl = _impl(backend, device)
    assert impl.pack_bits(mask).tolist() == [0b00001001, 0b00000101]
    assert impl.pack_bits(torch.ones(3, dtype=torch.bool, device=device)).tolist() == [0b111]


# ----------------------------------------------------------------------------------------------------------
# union_count
# ----------------------------------------------------------------------------------------------------------
# [outer, units, inner]: the ledger's layouts (a DGMa gate (1, units, 1), a transposed conv (in, out, kH * kW)),
# ranges that start and end inside bytes (inner 1, 3, 5, 13, 17), one unit, one entry; then large masks: many
# blocks with runs straddling bytes, more than one 64 KiB chunk of bytes, more units than a shared-memory
# histogram holds (CUDA: global atomics), one unit of 1.4 M entries
UNION_LAYOUTS = [(1, 24, 192), (12, 5, 16), (1, 7, 1), (3, 1, 9), (2, 13, 5), (5, 6, 3), (4, 3, 17), (1, 1, 1),
                 (1, 300, 1), (9, 4, 13), (3, 7, 30_011), (40_000, 3, 5), (2, 5000, 3), (1, 600_000, 1),
                 (2, 1, 700_001)]
# in the interpreter: 600_000 units are ~590 programs of ~20 ms; 5000 still needs several unit blocks
UNION_LAYOUTS_INTERPRETED = {(1, 600_000, 1): (1, 5000, 1)}


@pytest.mark.parametrize("layout", UNION_LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_union_count_exact(backend, device, layout):
    outer, units, inner = _size(backend, device, layout, UNION_LAYOUTS_INTERPRETED.get(layout, layout))
    n = outer * units * inner
    reserved = pack_bits_reference(torch.rand(n, device=device) < 0.3)
    task = pack_bits_reference(torch.rand(n, device=device) < 0.5)
    got_bits, got_counts = _impl(backend, device).union_count(reserved, task, outer, units, inner)
    want_bits, want_counts = reference.union_count(reserved, task, outer, units, inner)
    assert torch.equal(got_bits, want_bits)
    assert got_counts.dtype == torch.int64 and torch.equal(got_counts, want_counts)
    # the counts, written out: task & ~reserved per unit (so that the reference is checked too)
    new = unpack_bits_reference(task, (n,)) & ~unpack_bits_reference(reserved, (n,))
    assert got_counts.tolist() == new.view(outer, units, inner).sum(dim=(0, 2)).tolist()


# (reserved bytes, task bytes, layout, union, counts): set padding bits in the inputs must neither be counted
# nor survive in the union
PADDING_CASES = [
    # 10 entries: bits 0..1 of byte 1 are entries, bits 2..7 padding (all set in both inputs)
    ([0b00000000, 0b11111100], [0b11111111, 0b11111111], (1, 5, 2), [0xFF, 0b11], [2, 2, 2, 2, 2]),
    # 11 entries of one entry per unit: bits 3..7 of byte 1 are padding
    ([0b00000001, 0b11111000], [0b00000110, 0b11100111], (1, 11, 1), [0b00000111, 0b00000111],
     [0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]),
]


@pytest.mark.parametrize("case", range(len(PADDING_CASES)))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_union_count_ignores_padding_bits(backend, device, case):
    reserved, task, layout, union, counts = PADDING_CASES[case]
    reserved, task = (torch.tensor(values, dtype=torch.uint8, device=device) for values in (reserved, task))
    bits, got = _impl(backend, device).union_count(reserved, task, *layout)
    assert bits.tolist() == union
    assert got.dtype == torch.int64 and got.tolist() == counts


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_union_count_of_an_empty_mask(backend, device):
    if backend in ("cpu", "cuda"):
        pytest.skip(f"{backend}: the compiled op refuses a layout with a zero extent ('outer, units and inner must "
                    "be >= 1', an argument check of the op, tests/kernels/test_compiled_ops.py)")
    empty = torch.zeros(0, dtype=torch.uint8, device=device)
    union, counts = _impl(backend, device).union_count(empty, empty, 4, 3, 0)
    assert union.numel() == 0 and union.dtype == torch.uint8
    assert counts.dtype == torch.int64 and counts.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------------------------------------
# masked optimizer steps
# ----------------------------------------------------------------------------------------------------------
FLOAT_DTYPES = [torch.float32, torch.float64]
# one shape of a few blocks' worth at most, and one whose per-thread / per-block chunks start inside a byte of
# the packed bits (100_003 entries is not a multiple of 8)
OPT_SHAPES = [(37, 11), (5, 3, 4, 4), (100_003,)]
# in the interpreter (up to 65536 entries a program), a test of 100_003 entries took ~3 s here; 10_007 (not a
# multiple of 8 either) keeps the partial last byte of the packed bits
OPT_SHAPES_INTERPRETED = {(100_003,): (10_007,)}
FROZEN_FORMS = ["none", "bool", "packed", "strided-bool"]


#: ulps one optimizer step's update may be off by on a GPU: up to 8 roundings in the update, each of which FMA
#: contraction may change by 1 ulp, plus the approximate square root (<= 2 ulp) and division (div.full.f32,
#: <= 2 ulp) that compiled Triton uses and the interpreter and the CPU kernels do not
UPDATE_ULPS = 16
#: the largest update of a parameter entry per step, in units of lr: Adam's |m_hat| / sqrt(v_hat) <= 1 for
#: betas (0.9, 0.999) in the first 3 steps (Cauchy-Schwarz over the moments' weights), plus the decay term; SGD's
#: momentum buffer (with Nesterov) over 3 gradients of |g| <= 5 (float64 normal draws of <= 1e5 entries)
UPDATE_SCALE = {"adam": 2.0, "sgd": 30.0}


def _tol(dtype, method, lr, steps=3):
    """Tolerances from the error analysis of ``steps`` updates, not from what the interpreter happens to give.

    Both the kernel and the reference round: each step stores the parameter once (0.5 ulp of |p|, relative) and
    computes the update u = lr * (...) to ``UPDATE_ULPS`` ulps of its bound ``UPDATE_SCALE[method] * lr``
    (absolute). Twice that (two implementations), over ``steps`` steps. In float64 the Triton kernels receive
    lr, the betas and eps as two float32 halves (hi + lo: 48 significant bits), so the update's unit is 2**-48.
    """
    unit = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    update_unit = 2.0**-24 if dtype == torch.float32 else 2.0**-48
    return {"rtol": 2 * (steps + 1) * unit,
            "atol": 2 * steps * UPDATE_ULPS * update_unit * UPDATE_SCALE[method] * lr}


def _frozen(shape, device, form, seed):
    """(the bool mask, the form the step is given: None, bool, packed bits or a strided bool view)."""
    g = torch.Generator().manual_seed(seed)
    frozen = (torch.rand(shape, generator=g) < 0.4).to(device)
    if form == "strided-bool":  # the same values, every other byte of a wider tensor
        given = torch.stack([frozen, ~frozen], dim=-1)[..., 0]
        assert not given.is_contiguous()
    else:
        given = {"none": None, "bool": frozen, "packed": pack_bits_reference(frozen)}[form]
    return (None if form == "none" else frozen), given


def _randn(shape, dtype, device, g):
    # drawn in float64 on the CPU: the same values on every device and, rounded, in every dtype
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def _poison(grad, frozen):
    """``grad`` with NaN at the frozen entries: a frozen entry must not even be read into an update."""
    return grad if frozen is None else torch.where(frozen, torch.full_like(grad, float("nan")), grad)


def _assert_bits_kept(now, before, frozen, what):
    assert torch.equal(now[frozen].view(torch.uint8), before[frozen].view(torch.uint8)), (
        f"{what}: a frozen entry changed (frozen entries must keep their bits)")


def _skip_unsupported_dtype(backend, device, dtype):
    if _interpreted(backend, device) and dtype not in FLOAT_DTYPES:
        pytest.skip("triton on cpu: Triton's interpreter runs float32 and float64 only (numpy has no bfloat16)")


# the weight decay of each of 3 steps: plain Adam, L2 decay added to the gradient, decoupled decay (AdamW), and
# all three in turn on the same state (a step's decay must not leak into the moments the next step reads)
ADAM_DECAY = {
    "none": [(0.0, False)] * 3,
    "l2": [(0.01, False)] * 3,
    "decoupled": [(0.1, True)] * 3,
    "changing": [(0.0, False), (0.01, False), (0.1, True)],
}


# the large shape is about where chunks start, not about the formula: it runs the schedule that has every decay
ADAM_CASES = [(shape, decay) for shape in OPT_SHAPES for decay in ADAM_DECAY
              if shape != (100_003,) or decay == "changing"]


@pytest.mark.parametrize("form", FROZEN_FORMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,decay", ADAM_CASES, ids=[f"{shape}-{decay}" for shape, decay in ADAM_CASES])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adam_step(backend, device, shape, dtype, form, decay):
    shape = _size(backend, device, shape, OPT_SHAPES_INTERPRETED.get(shape, shape))
    frozen, given = _frozen(shape, device, form, seed=1)
    g = torch.Generator().manual_seed(5)
    p, m = _randn(shape, dtype, device, g), _randn(shape, dtype, device, g)
    v = _randn(shape, dtype, device, g).abs()
    grads = [_randn(shape, dtype, device, g) for _ in range(3)]
    results = []
    for impl, poisoned in ((_impl(backend, device), True), (reference, False)):
        state = [p.clone(), m.clone(), v.clone()]
        for step, ((weight_decay, decoupled), grad) in enumerate(zip(ADAM_DECAY[decay], grads), start=1):
            grad = _poison(grad, frozen) if poisoned else grad
            impl.adam_step_(*state[:1], grad, *state[1:], given, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step, decoupled)
        results.append(state)
    for got, want, before, what in zip(*results, (p, m, v), ("param", "exp_avg", "exp_avg_sq")):
        if frozen is not None:
            _assert_bits_kept(got, before, frozen, what)
        assert not torch.isnan(got).any(), f"{what}: the NaN of a frozen entry's gradient leaked"
        torch.testing.assert_close(got, want, **_tol(dtype, "adam", 1e-2), msg=lambda msg, what=what: f"{what}: {msg}")


# (momentum, dampening, nesterov, weight_decay): plain, L2 decay, momentum with decay, dampening, Nesterov
SGD_CONFIGS = [(0.0, 0.0, False, 0.0), (0.0, 0.0, False, 0.05), (0.9, 0.0, False, 0.01), (0.9, 0.1, False, 0.0),
               (0.9, 0.0, True, 0.01)]
# every configuration on the small shape; the other shapes (a 4-d weight, a partial last byte) with the richest
# one (momentum + decay): the shapes exercise the indexing, the configurations the arithmetic
SGD_CASES = [((37, 11), c) for c in SGD_CONFIGS] + [(shape, SGD_CONFIGS[2]) for shape in OPT_SHAPES[1:]]


@pytest.mark.parametrize("form", FROZEN_FORMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,config", SGD_CASES, ids=[f"{s}-{c}" for s, c in SGD_CASES])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sgd_step(backend, device, shape, config, dtype, form):
    momentum, dampening, nesterov, weight_decay = config
    shape = _size(backend, device, shape, OPT_SHAPES_INTERPRETED.get(shape, shape))
    frozen, given = _frozen(shape, device, form, seed=2)
    g = torch.Generator().manual_seed(9)
    p, buf = _randn(shape, dtype, device, g), _randn(shape, dtype, device, g)
    grads = [_randn(shape, dtype, device, g) for _ in range(3)]
    results = []
    for impl, poisoned in ((_impl(backend, device), True), (reference, False)):
        # the buffer exists only with momentum (None is what the optimizers pass without)
        state = [p.clone(), buf.clone() if momentum else None]
        for i, grad in enumerate(grads):
            grad = _poison(grad, frozen) if poisoned else grad
            impl.sgd_step_(state[0], grad, state[1], given, 0.1, momentum, dampening, weight_decay, nesterov, i == 0)
        results.append(state)
    for got, want, before, what in zip(*results, (p, buf), ("param", "momentum_buffer")):
        if want is None:
            assert got is None
            continue
        if frozen is not None:
            _assert_bits_kept(got, before, frozen, what)
        assert not torch.isnan(got).any(), f"{what}: the NaN of a frozen entry's gradient leaked"
        torch.testing.assert_close(got, want, **_tol(dtype, "sgd", 0.1), msg=lambda msg, what=what: f"{what}: {msg}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_optimizer_steps_update_non_contiguous_tensors_in_place(backend, device, dtype):
    # a parameter (and its state) stored transposed, as a view of a parameter may be: the step must write into
    # that storage, not into a contiguous copy, with the values of the reference on contiguous tensors
    frozen, bits = _frozen((6, 4), device, "packed", seed=3)
    g = torch.Generator().manual_seed(4)
    p0, grad = _randn((6, 4), dtype, device, g), _randn((6, 4), dtype, device, g)

    def transposed(t):
        out = t.t().contiguous().t()
        assert not out.is_contiguous() and torch.equal(out, t)
        return out

    mine = [transposed(p0), transposed(torch.zeros_like(p0)), transposed(torch.zeros_like(p0))]
    theirs = [p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)]
    buf, ref_buf = transposed(torch.zeros_like(p0)), torch.zeros_like(p0)
    pointers = [t.data_ptr() for t in mine + [buf]]
    impl = _impl(backend, device)
    impl.adam_step_(mine[0], grad, mine[1], mine[2], bits, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, False)
    reference.adam_step_(theirs[0], grad, theirs[1], theirs[2], bits, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, False)
    impl.sgd_step_(mine[0], grad, buf, bits, 0.1, 0.9, 0.0, 0.0, False, True)
    reference.sgd_step_(theirs[0], grad, ref_buf, bits, 0.1, 0.9, 0.0, 0.0, False, True)
    for t, ptr in zip(mine + [buf], pointers):
        assert t.data_ptr() == ptr and not t.is_contiguous()
    _assert_bits_kept(mine[0], p0, frozen, "param")
    # a first step's buffer is the gradient itself, exactly, and a frozen entry's stays as it was
    assert torch.equal(buf[~frozen], grad[~frozen]) and (buf[frozen] == 0).all()
    for got, want, what in zip(mine + [buf], theirs + [ref_buf], ("param", "exp_avg", "exp_avg_sq", "buffer")):
        # one Adam and one SGD step of lr 0.1 on the parameter
        torch.testing.assert_close(got, want, **_tol(dtype, "sgd", 0.1, steps=2), msg=lambda msg, what=what: f"{what}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adam_step_in_half_precision_rounds_once(backend, device, dtype):
    # the fused steps compute in float32 and round once to the storage type: within one unit in the last place
    # of the float32 reference's result on the same inputs; frozen entries keep their bits
    _skip_unsupported_dtype(backend, device, dtype)
    if device == "cpu" or backend == "reference":
        pytest.skip(f"{backend} on {device}: {dtype} goes through the reference in its own dtype (several roundings, "
                    "no one-rounding bound; the cpu backend's fallback is tested in test_compiled_ops.py)")
    frozen, bits = _frozen((5000,), device, "packed", seed=6)
    g = torch.Generator().manual_seed(7)
    p, grad, m = (_randn((5000,), dtype, device, g) for _ in range(3))
    v = _randn((5000,), dtype, device, g).abs()
    want = [t.float() for t in (p, m, v)]
    before = [t.clone() for t in (p, m, v)]
    _impl(backend, device).adam_step_(p, grad, m, v, bits, 1e-2, 0.9, 0.999, 1e-3, 0.0, 1, False)
    reference.adam_step_(want[0], grad.float(), want[1], want[2], frozen, 1e-2, 0.9, 0.999, 1e-3, 0.0, 1, False)
    eps = torch.finfo(dtype).eps
    for got, ref, old, what in zip((p, m, v), want, before, ("param", "exp_avg", "exp_avg_sq")):
        _assert_bits_kept(got, old, frozen, what)
        assert ((got.float() - ref).abs() <= eps * ref.abs() + 1e-6).all(), what
