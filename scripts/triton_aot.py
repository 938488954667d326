"""Ahead-of-time compilation of every Triton kernel of dgm_kernels, for GPUs this machine does not have.

    python scripts/triton_aot.py [--targets 80,90,100] [--all-targets] [--jobs N] [--json OUT]

prints one line per kernel and target (specialisations compiled, registers, shared memory, local memory)
and exits 1 when a specialisation fails to compile or a ``@triton.jit`` function of the package is covered
by none; ``--json`` writes everything (the recorded specialisations, every compile's result, the coverage).
``tests/kernels/test_triton_aot.py`` runs it; ``scripts/kernel_resources.py`` prints its resource table.

No GPU is needed: Triton compiles to PTX and ptxas to a cubin for any target on the CPU. This process must
define real JIT kernels, so it refuses to run with ``TRITON_INTERPRET`` set (tests run it as a subprocess).

Where the specialisations come from (one source of truth: the launchers). The backend's ops run on CPU
tensors through their public entry points (``dgm_kernels.functional`` with ``backend="triton"``, the
autograd backward of each, and the backend object's methods for the gate, the optimizers and the ledger's
bits) while ``JITFunction.run`` is replaced by a recorder: it binds the arguments with Triton's own binder
and specialisation rules for the target (pointer element types, ``i32``/``i64``, integers equal to 1 made
constexpr, divisibility by 16), keeps (kernel, signature, constexprs, attributes, num_warps) and launches
nothing. The launchers run as they do on a GPU (``_common.INTERPRETED`` is False here: GPU block sizes,
GPU conv tiles), with two stand-ins for the missing device, both harness-side only:

- ``device_programs`` (programs that fill the GPU, 4 per SM) returns the value of an emulated H100 (132
  SMs): it sizes the ledger's chunks (the gate backward's slices depend on the positions per channel only);
- ``check_dtype`` accepts float16 and bfloat16 CPU tensors (the real one refuses them only because the
  interpreter cannot run them; nothing is executed here), so the half-precision launches are recorded as
  they are, with their float32 partial buffers and ``ACC`` from ``_common.compute_dtype``.

The inputs (dtypes, modes, HAT compensation, frozen masks as bools or bits, bias, which gradients are
wanted, conv strategy, TF32) are combined pairwise (every pair of option values in some case, not the full
product); the conv geometries are chosen so that every tile ``conv._blocks`` can return on a GPU occurs for
both kinds (gather, scatter) in every dtype (checked against ``_blocks`` itself), the gate backward's positions per
channel so that every ``BLOCK_S`` occurs, the ledger's shapes so that every ``(BU, BK)`` tile of ``union_count`` occurs.

sm_80 and sm_90 compile every specialisation; sm_100 a representative subset (``representative``: every
value of every constexpr and pointer type of each kernel, and every tile of the convolution with float16,
bfloat16 and TF32 operands), which keeps the test within a few minutes of 2 CPU cores; ``--all-targets``
compiles everything everywhere. Triton's cache goes to a fresh temporary directory: nothing is reused.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_PACKAGE = "dgm_kernels.backends.triton_kernels"
#: SMs of the emulated GPU (H100/H200): device_programs = 4 x SMs = 528 programs, which sizes union_count's chunks
EMULATED_SMS = 132
#: compute capabilities compiled by default (sm_100 when this Triton's NVIDIA backend can target it)
DEFAULT_TARGETS = (80, 90, 100)
#: the targets every specialisation is compiled for (issue 11: sm_80 and sm_90); the others (sm_100) get a
#: representative subset unless --all-targets
FULL_TARGETS = (80, 90)
#: the target whose binder records the launches (pointer types, integer specialisations)
FULL_TARGET = 90
#: jit functions that are neither kernels nor device functions of one: (module, name) -> why they are exempt
EXEMPT = {
    ("_common", "_probe"): "a type probe: INTERPRETED is whether Triton defined it as an InterpretedFunction; "
                           "never launched nor called",
}

# ----------------------------------------------------------------------------------------------------------
# this process: real JIT kernels, no GPU
# ----------------------------------------------------------------------------------------------------------
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("scripts/triton_aot.py compiles real kernels: run it with TRITON_INTERPRET unset (or 0)")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import dgm_kernels as dk  # noqa: E402
from dgm_kernels.backends import load_backend  # noqa: E402
from dgm_kernels.backends import triton_backend  # noqa: E402

if not Path(dk.__file__).resolve().is_relative_to(ROOT):
    sys.exit(f"dgm_kernels was imported from {dk.__file__}, not from {ROOT}")

common = importlib.import_module(f"{KERNEL_PACKAGE}._common")
conv_mod = importlib.import_module(f"{KERNEL_PACKAGE}.conv")
assert not common.INTERPRETED


def kernel_modules():
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def jit_functions() -> dict[str, JITFunction]:
    """Every @triton.jit function defined in the kernel package, by 'module.name'."""
    found = {}
    for mod in kernel_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = obj
    return found


# ----------------------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------------------
def _encode(value):
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if isinstance(value, tl.constexpr):
        return _encode(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr value {value!r}")


def _decode(value):
    return tl.dtype(value["dtype"]) if isinstance(value, dict) else value


class Recorder:
    """Replaces JITFunction.run: binds a launch as Triton would for a CUDA target, records it, launches nothing."""

    def __init__(self):
        self.backend = make_backend(GPUTarget("cuda", FULL_TARGET, 32))
        self.binders = {}
        self.specs: dict[str, dict] = {}
        self.case = "?"
        self.launches = 0

    def run(self, fn, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", fn.debug) or False
        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        spec = {
            "kernel": f"{fn.fn.__module__.rsplit('.', 1)[1]}.{fn.fn.__name__}",
            "signature": signature,
            "constexprs": [[list(k), _encode(v)] for k, v in sorted(constexprs.items())],
            "attrs": [[list(k), v] for k, v in sorted(attrs.items())],
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
        }
        key = json.dumps(spec, sort_keys=True)
        self.launches += 1
        if key not in self.specs:
            spec["case"] = self.case
            self.specs[key] = spec
        return None


def pairwise(axes: dict[str, list]) -> list[dict]:
    """Cases in which every pair of values of two axes occurs at least once (greedy, deterministic)."""
    names = list(axes)
    todo = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in range(len(axes[a]))
            for vb in range(len(axes[b]))}
    if len(names) == 1:
        return [{names[0]: v} for v in axes[names[0]]]
    cases = []
    while todo:
        a, va, b, vb = min(todo, key=lambda p: (names.index(p[0]), p[1], names.index(p[2]), p[3]))
        pick = {a: va, b: vb}
        for n in names:
            if n in pick:
                continue
            best = max(range(len(axes[n])), key=lambda v: sum(
                ((m, pick[m], n, v) in todo) if names.index(m) < names.index(n) else ((n, v, m, pick[m]) in todo)
                for m in pick))
            pick[n] = best
        todo -= {(m, pick[m], n, pick[n]) for m, n in itertools.combinations(names, 2)}
        cases.append({n: axes[n][pick[n]] for n in names})
    return cases


#: (input channels, kernel size): entries per output unit from 8 to 1152, so that every BLOCK of the per-unit
#: kernels (gate._unit_block: 128 ... 1024) occurs
UNIT_GEOMETRIES = [(8, 1), (16, 3), (32, 3), (128, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
GRADS = ["all", "weight", "scores", "input"]  # which leaves require grad


def _t(shape, dtype, grad=False):
    return torch.randn(shape, dtype=dtype).requires_grad_(grad)


def _frozen(kind, shape):
    if kind is None:
        return None
    flags = torch.rand(shape) < 0.5
    return dk.pack_bits(flags, backend="reference") if kind == "bits" else flags


def _backward(y):
    if y.requires_grad:
        y.backward(torch.randn_like(y))


def exercise(rec: Recorder) -> None:
    """Run the backend's ops over inputs that reach every branch of the launchers (see the module doc)."""
    backend = load_backend("triton")
    T = "triton"

    def case(label):
        rec.case = label

    # -- mask family ---------------------------------------------------------------------------------------
    for c in pairwise({"dtype": DTYPES, "mode": ["anneal", "ste"], "s_max": [None, 1e4], "n": [1000, 1]}):
        case(f"mask {c}")
        e = _t((c["n"],), c["dtype"], True)
        _backward(dk.mask(e, 4.0, mode=c["mode"], s_max=c["s_max"], backend=T))
    for c in pairwise({"dtype": DTYPES, "mode": ["anneal", "ste"], "s_max": [None, 1e4],
                       "frozen": [None, "bool", "bits"], "grads": ["all", "weight", "scores"]}):
        case(f"masked_weight {c}")
        w = _t((24, 10, 3, 3), c["dtype"], c["grads"] in ("all", "weight"))
        e = _t((24, 10, 3, 3), c["dtype"], c["grads"] in ("all", "scores"))
        _backward(dk.masked_weight(w, e, 4.0, _frozen(c["frozen"], w.shape), mode=c["mode"], s_max=c["s_max"],
                                   backend=T))

    # -- gate family: channel gate (every slice count of the backward), block_unit_grad ----------------------
    # the backward's split depends on the positions per channel only (GATE_SLICE_BLOCKS blocks a slice, at most
    # 1024 slices): these sizes give every BLOCK_S of the finish kernel, 16 ... 1024
    gate_kernels = importlib.import_module(f"{KERNEL_PACKAGE}.gate")
    for (i, split), dtype in itertools.product(enumerate((1, 16, 32, 64, 128, 256, 512, 1024)), DTYPES):
        c = {"dtype": dtype, "mode": ["anneal", "ste"][i % 2], "s_max": [None, 1e4][(i // 2) % 2]}
        ch = 3 if split == 1 else 1
        case(f"channel_gate channels={ch} slices={split} {c}")
        positions = split * gate_kernels.GATE_SLICE_BLOCKS * 1024
        y = _t((1, ch, positions), c["dtype"], True)
        e = _t((ch,), c["dtype"], True)
        _backward(backend.channel_gate(y, e, 4.0, _mode(c["mode"]), c["s_max"]))
    for c in pairwise({"dtype": DTYPES, "mode": ["anneal", "ste"], "s_max": [None, 1e4],
                       "grads": ["all", "input", "scores"], "shape": [(4, 16, 7, 7), (3, 5, 1, 1)]}):
        case(f"channel_gate {c}")
        y = _t(c["shape"], c["dtype"], c["grads"] in ("all", "input"))
        e = _t((c["shape"][1],), c["dtype"], c["grads"] in ("all", "scores"))
        _backward(backend.channel_gate(y, e, 4.0, _mode(c["mode"]), c["s_max"]))
    for c in pairwise({"dtype": DTYPES, "transposed": [False, True], "frozen_out": ["bool", "bits"],
                       "frozen_in": [None, "bool", "bits"], "geometry": UNIT_GEOMETRIES}):
        case(f"block_unit_grad {c}")
        out_c, (in_c, k) = 12, c["geometry"]
        shape = (in_c, out_c, k, k) if c["transposed"] else (out_c, in_c, k, k)
        w = _t(shape, c["dtype"], True)
        fo = _frozen(c["frozen_out"], (out_c,))
        fi = _frozen(c["frozen_in"], (in_c,))
        _backward(backend.block_unit_grad(w, fo, fi, c["transposed"], 1))

    # -- convolutions: flags and strategies pairwise on one geometry per kind ------------------------------
    for c in pairwise({"dtype": DTYPES, "tf32": [True, False], "kind": ["masked", "gated"],
                       "transposed": [False, True], "strategy": ["fused", "unfused"], "mode": ["anneal", "ste"],
                       "s_max": [None, 1e4], "bias": [False, True], "frozen": [None, "bool", "bits"],
                       "frozen_in": [False, True], "grads": GRADS, "groups": [1, 2]}):
        case(f"conv {c}")
        _conv_case(c, rec)
    # -- convolutions: every tile of conv._blocks in every dtype (forwards; the flags are covered above) ----
    for (cin, cout, k, n, hw, transposed), dtype, tf32 in itertools.product(
            _block_geometries(), [torch.float32, torch.float16, torch.bfloat16], [True, False]):
        if dtype != torch.float32 and not tf32:
            continue
        c = {"dtype": dtype, "tf32": tf32, "kind": "masked", "transposed": transposed, "strategy": "fused",
             "mode": "anneal", "s_max": None, "bias": False, "frozen": None, "frozen_in": False, "grads": None,
             "groups": 1,
             "geometry": (cin, cout, k, n, hw)}
        case(f"conv tiles {c}")
        _conv_case(c, rec)

    # -- the unfused gated convolution's gate_weight over every per-unit block size
    for geometry, dtype in itertools.product(UNIT_GEOMETRIES, DTYPES):
        cin, k = geometry
        c = {"dtype": dtype, "tf32": True, "kind": "gated", "transposed": cin == 16, "strategy": "unfused",
             "mode": "anneal", "s_max": None, "bias": k == 3, "frozen": None, "frozen_in": False, "grads": "scores",
             "groups": 1, "geometry": (cin, 8, k, 1, 6)}
        case(f"gate_weight tiles {c}")
        _conv_case(c, rec)

    # -- sparsity regulariser -------------------------------------------------------------------------------
    for c in pairwise({"dtype": DTYPES, "reserved": [False, True], "n": [5000, 1]}):
        case(f"sparsity {c}")
        m = torch.rand(c["n"], dtype=c["dtype"]).requires_grad_(True)
        r = (torch.rand(c["n"]) < 0.5) if c["reserved"] else None
        _backward(dk.sparsity_regularizer([m], [r], backend=T))

    # -- ledger bits: pack_bits, union_count over every (BU, BK) tile --------------------------------------
    for n in (1, 13, 4096, 100_000):
        case(f"pack_bits n={n}")
        backend.pack_bits(torch.rand(n) < 0.5)
    # the launcher's tile: BK = next_power_of_2(outer * range_bytes) in 16..1024, BU = units (power of two) up
    # to 1024 / BK; inner = 9 bits straddle 2 bytes, so outer = BK / 2 reaches BK; then two ledger-like shapes
    shapes = [(8 << a, 1 << b, 9) for a in range(7) for b in range(7 - a)] + [(1, 64, 1152), (24, 10, 1)]
    with _device_programs(4 * EMULATED_SMS):
        for outer, units, inner in shapes:
            case(f"union_count outer={outer} units={units} inner={inner}")
            nbytes = (outer * units * inner + 7) // 8
            r = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
            backend.union_count(r, r.clone(), outer, units, inner)

    # -- optimizers (the backend contract: bool or packed frozen masks, every flag) --------------------------
    for c in pairwise({"dtype": DTYPES, "frozen": [None, "bool", "bits"], "weight_decay": [0.0, 0.01],
                       "decoupled": [False, True], "n": [3000, 1]}):
        case(f"adam_step_ {c}")
        p = _t((c["n"],), c["dtype"])
        backend.adam_step_(p, torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p),
                           _frozen(c["frozen"], p.shape), 1e-3, 0.9, 0.999, 1e-8, c["weight_decay"], 3, c["decoupled"])
    for c in pairwise({"dtype": DTYPES, "frozen": [None, "bool", "bits"], "weight_decay": [0.0, 0.01],
                       "momentum": [0.0, 0.9], "first": [False, True], "nesterov": [False, True]}):
        case(f"sgd_step_ {c}")
        p = _t((3000,), c["dtype"])
        nesterov = c["nesterov"] and c["momentum"] > 0
        backend.sgd_step_(p, torch.randn_like(p), torch.zeros_like(p), _frozen(c["frozen"], p.shape), 0.1,
                          c["momentum"], 0.0, c["weight_decay"], nesterov, c["first"])
    # and the public optimizers once (their frozen masks are kept as bits)
    for dtype in DTYPES:
        case(f"MaskedAdam/MaskedSGD {dtype}")
        p = torch.nn.Parameter(_t((64, 3), dtype))
        for opt in (dk.optim.MaskedAdam([p], backend=T), dk.optim.MaskedSGD([p], lr=0.1, momentum=0.9, backend=T)):
            opt.set_frozen(p, torch.rand(p.shape) < 0.5)
            p.grad = torch.randn_like(p)
            opt.step()
            opt.step()


def _mode(name):
    return {"anneal": 0, "ste": 1}[name]


class _device_programs:
    """device_programs of the bits launcher answers as the emulated GPU would (harness only)."""

    def __init__(self, programs):
        self.programs = programs
        self.mods = [importlib.import_module(f"{KERNEL_PACKAGE}.bits")]

    def __enter__(self):
        self.saved = [m.device_programs for m in self.mods]
        for m in self.mods:
            m.device_programs = lambda device, p=self.programs: p

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self.saved):
            m.device_programs = f


def _block_geometries():
    """(in, out, kernel, batch, size, transposed) whose forward reaches each tile of conv._blocks once."""
    geos, seen = [], set()
    for cout, cin_k, n, transposed in itertools.product([8, 32, 64], [(1, 3), (8, 3)], [1, 8], [False, True]):
        cin, k = cin_k
        hw = 32  # stride 1: 32x32 outputs; stride 2 transposed: 64x64 outputs in 4 phases of 32x32
        m = n * hw * hw  # output pixels per phase
        taps = k * k if not transposed else triton.cdiv(k, 2) ** 2
        tile = conv_mod._blocks(m, cout, cin * taps)
        if (tile, transposed) not in seen:
            seen.add((tile, transposed))
            geos.append((cin, cout, k, n, hw, transposed))
    return geos


def block_image() -> set[tuple]:
    """Every (BM, BN, BK, num_warps) that conv._blocks returns on a GPU (evaluated at powers of two and next to
    them: it depends on its arguments only through next_power_of_2 and thresholds)."""
    values = sorted({v for p in range(0, 22) for v in (2**p - 1, 2**p, 2**p + 1) if v > 0})
    return {conv_mod._blocks(m, c, k) for m in values for c in values[:40] for k in values[:40]}


def _conv_case(c, rec):
    dtype, transposed, kind, groups = c["dtype"], c["transposed"], c["kind"], c["groups"]
    cin, cout, k, n, hw = c.get("geometry", (6 * groups, 10 * groups, 3, 2, 9))
    stride, padding = (2, 1) if transposed else (1, 1)
    wshape = (cin, cout // groups, k, k) if transposed else (cout, cin // groups, k, k)
    grads = c["grads"]
    x = _t((n, cin, hw, hw), dtype, grads in ("all", "input"))
    w = _t(wshape, dtype, grads in ("all", "weight"))
    extra = {"output_padding": 1} if transposed else {}
    torch.backends.cudnn.allow_tf32 = c["tf32"]
    triton_backend.set_conv_strategy(c["strategy"])
    try:
        if kind == "masked":
            e = _t(wshape, dtype, grads in ("all", "scores"))
            b = _t((cout,), dtype, grads == "all") if c["bias"] else None
            fn = dk.masked_conv_transpose2d if transposed else dk.masked_conv2d
            y = fn(x, w, e, 4.0, _frozen(c["frozen"], wshape), bias=b, stride=stride, padding=padding, groups=groups,
                   mode=c["mode"], s_max=c["s_max"], backend="triton", **extra)
        else:
            e = _t((cout,), dtype, grads in ("all", "scores"))
            b = _t((cout,), dtype, grads in ("all", "weight")) if c["bias"] else None
            fo = _frozen(c["frozen"], (cout,))
            fi = _frozen(c["frozen"], (cin,)) if c["frozen_in"] else None
            fn = dk.gated_conv_transpose2d if transposed else dk.gated_conv2d
            y = fn(x, w, e, 4.0, fo, fi, bias=b, stride=stride, padding=padding, groups=groups, mode=c["mode"],
                   s_max=c["s_max"], backend="triton", **extra)
        _backward(y)
    finally:
        triton_backend.set_conv_strategy("auto")


def record() -> tuple[list[dict], int]:
    torch.set_num_threads(1)  # nothing is computed; and the compile workers are forked from this process
    rec = Recorder()
    backend = load_backend("triton")
    backend.unavailable_reason = lambda device=None: None  # CPU tensors, real (not interpreted) kernels
    ops = [importlib.import_module(f"{KERNEL_PACKAGE}.{m}") for m in
           ("mask_ops", "gate_ops", "sparsity_ops", "conv_ops", "optim_ops")]
    strict = common.check_dtype

    def check_dtype(name, tensor):  # the real check, less its "no half precision in the interpreter" rule
        if tensor.dtype not in common.SUPPORTED_DTYPES:
            strict(name, tensor)

    saved_run = JITFunction.run
    saved_checks = [m.check_dtype for m in ops]
    JITFunction.run = lambda fn, *a, **kw: rec.run(fn, *a, **kw)
    for m in ops:
        m.check_dtype = check_dtype
    torch.manual_seed(0)
    try:
        exercise(rec)
    finally:
        JITFunction.run = saved_run
        for m, f in zip(ops, saved_checks):
            m.check_dtype = f
    return list(rec.specs.values()), rec.launches


# ----------------------------------------------------------------------------------------------------------
# compiling
# ----------------------------------------------------------------------------------------------------------
_LOC = re.compile(r'loc\("([^"]+)":(\d+):\d+\)')
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for cand in (os.environ.get("CUOBJDUMP"), "/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump"), bundled):
        if cand and Path(cand).is_file():
            return str(cand)
    raise FileNotFoundError("no cuobjdump (set CUOBJDUMP)")


def resource_usage(binary: Path) -> list[tuple[str, str, dict]]:
    """(arch, function, {regs, stack, shared, local}) of every function in a cubin or a fat binary / .so."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    rows, arch = [], "?"
    fn = None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = _RES.search(line)
        if m and fn:
            regs, stack, shared, local = map(int, m.groups())
            rows.append((arch, fn, {"regs": regs, "stack": stack, "shared": shared, "local": local}))
            fn = None
    return rows


def _function_lines() -> dict[str, tuple[str, int, int]]:
    """jit function -> (file, first body line, last line)."""
    out = {}
    for name, fn in jit_functions().items():
        lines, start = inspect.getsourcelines(fn.fn)
        body = start + next(i for i, line in enumerate(lines) if line.lstrip().startswith("def ")) + 1
        out[name] = (str(Path(inspect.getsourcefile(fn.fn)).resolve()), body, start + len(lines) - 1)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas, cuobjdump): load-independent cost."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_one(job):
    spec, cap, workdir = job
    fn = jit_functions()[spec["kernel"]]
    constexprs = {tuple(k): _decode(v) for k, v in spec["constexprs"]}
    attrs = {tuple(k): v for k, v in spec["attrs"]}
    t0, c0 = time.perf_counter(), _cpu_seconds()
    result = {"kernel": spec["kernel"], "target": cap, "spec": spec["id"]}
    try:
        ck = triton.compile(ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", cap, 32),
                            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as exc:  # a compile failure is the finding: keep its message
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-4000:], seconds=time.perf_counter() - t0,
                      cpu_seconds=_cpu_seconds() - c0)
        return result
    cubin = Path(workdir) / f"{spec['id']}_{cap}.cubin"
    cubin.write_bytes(ck.asm["cubin"])
    usage = [u for _, f, u in resource_usage(cubin)]
    cubin.unlink()
    lines = {}
    for file, line in _LOC.findall(ck.asm["ttir"]):
        lines.setdefault(str(Path(file).resolve()), set()).add(int(line))
    calls = sorted(name for name, (file, lo, hi) in _function_lines().items()
                   if any(lo <= ln <= hi for ln in lines.get(file, ())))
    result.update(ok=True, seconds=time.perf_counter() - t0, cpu_seconds=_cpu_seconds() - c0,
                  num_warps=ck.metadata.num_warps,
                  shared_dynamic=ck.metadata.shared, calls=calls, **usage[0])
    return result


def representative(specs: list[dict]) -> list[dict]:
    """A subset of the specialisations in which every kernel meets every value of each of its constexprs and
    pointer types, and the fused convolution every tile with every tensor-core operand type (greedy set cover)."""
    def features(s):
        f = {(s["kernel"], "num_warps", s["num_warps"])}
        f |= {(s["kernel"], name, ty) for name, ty in s["signature"].items() if ty.startswith("*")}
        f |= {(s["kernel"], tuple(k), json.dumps(v)) for k, v in s["constexprs"]}
        names = list(s["signature"])
        cx = {names[k[0]]: v for k, v in s["constexprs"]}
        if s["kernel"] == "conv._conv_kernel" and cx["INPUT_PRECISION"] != "ieee":
            # the tensor-core lowering differs per target, tile and operand type (IEEE float32 uses no tensor core)
            f.add((s["kernel"], "tile", cx["BM"], cx["BN"], cx["BK"], cx["INPUT_PRECISION"], s["signature"]["x_ptr"]))
        return f

    feats = [features(s) for s in specs]
    todo = set().union(*feats)
    chosen = []
    while todo:
        i = max(range(len(specs)), key=lambda j: len(feats[j] & todo))
        chosen.append(specs[i])
        todo -= feats[i]
    return chosen


def supported_targets(wanted) -> tuple[list[int], dict[int, str]]:
    ok, skipped = [], {}
    for cap in wanted:
        try:
            make_backend(GPUTarget("cuda", cap, 32)).parse_options({})
            ok.append(cap)
        except Exception as exc:
            skipped[cap] = f"{type(exc).__name__}: {exc}"
    return ok, skipped


def check(targets, all_targets: bool, jobs: int) -> dict:
    t0 = time.perf_counter()
    specs, launches = record()
    for i, s in enumerate(specs):
        s["id"] = i
    t_record = time.perf_counter() - t0
    targets, skipped = supported_targets(targets)
    subset = representative(specs)
    work = []
    with tempfile.TemporaryDirectory(prefix="dgm-triton-aot-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")  # fresh: nothing cached across runs
        for cap in targets:
            chosen = specs if (all_targets or cap in FULL_TARGETS) else subset
            work += [(s, cap, tmp) for s in chosen]
        # the slow conv kernels first, so that the pool ends with the short jobs
        work.sort(key=lambda j: (j[0]["kernel"] != "conv._conv_kernel", j[1], j[0]["id"]))
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(compile_one, work, chunksize=1))
    funcs = jit_functions()
    kernels = sorted({s["kernel"] for s in specs})
    called = set().union(*(r.get("calls", []) for r in results if r["ok"])) - set(kernels)
    exempt = {f"{m}.{n}": why for (m, n), why in EXEMPT.items()}
    uncovered = sorted(set(funcs) - set(kernels) - called - set(exempt))
    return {
        "targets": targets, "targets_skipped": skipped, "full_targets": list(FULL_TARGETS), "all_targets": all_targets,
        "launches_recorded": launches, "specialisations": specs, "subset_ids": [s["id"] for s in subset],
        "kernels": kernels, "device_functions": sorted(called), "exempt": exempt,
        "jit_functions": sorted(funcs), "uncovered": uncovered,
        "failures": [r for r in results if not r["ok"]], "results": results,
        "block_image": sorted(block_image()),
        "seconds": {"record": round(t_record, 1), "total": round(time.perf_counter() - t0, 1),
                    "compile_cpu": round(sum(r["cpu_seconds"] for r in results), 1)}, "jobs": jobs,
    }


def summary_rows(report: dict) -> list[dict]:
    rows = {}
    for r in report["results"]:
        if not r["ok"]:
            continue
        row = rows.setdefault((r["kernel"], r["target"]), {"kernel": r["kernel"], "target": r["target"], "specs": 0,
                                                            "regs": [], "shared": [], "local": [], "warps_list": []})
        row["specs"] += 1
        row["warps_list"].append(r["num_warps"])
        row["regs"].append(r["regs"])
        row["shared"].append(r["shared_dynamic"] + r["shared"])
        row["local"].append(r["local"])
    return [rows[k] for k in sorted(rows)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                    help="compute capabilities, comma separated (default: %(default)s)")
    ap.add_argument("--all-targets", action="store_true",
                    help="every specialisation for every target (default: all for sm_80 and sm_90, a "
                         "representative subset for the others)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: %(default)s)")
    ap.add_argument("--json", help="write the full report here")
    args = ap.parse_args(argv)
    report = check([int(t) for t in args.targets.split(",")], args.all_targets, args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    for row in summary_rows(report):
        print(f"{row['kernel']:<34} sm_{row['target']:<4} {row['specs']:4d} specs  regs {min(row['regs'])}-"
              f"{max(row['regs'])}  shared {max(row['shared'])} B  local {max(row['local'])} B")
    n = len(report["specialisations"])
    print(f"{report['launches_recorded']} launches recorded -> {n} specialisations of {len(report['kernels'])} "
          f"kernels; {len(report['results'])} compiles for sm_{', sm_'.join(map(str, report['targets']))} "
          f"({len(report['subset_ids'])} for the other targets); "
          f"{report['seconds']['total']} s with {args.jobs} processes (recording {report['seconds']['record']} s, "
          f"compiling {report['seconds']['compile_cpu']} CPU s)")
    for cap, why in report["targets_skipped"].items():
        print(f"sm_{cap} skipped: {why}")
    for f in report["failures"]:
        spec = report["specialisations"][f["spec"]]
        print(f"FAILED {f['kernel']} sm_{f['target']} (case {spec['case']}): {f['error']}")
    for name in report["uncovered"]:
        print(f"UNCOVERED {name}: no compiled specialisation launches or calls it")
    return 1 if report["failures"] or report["uncovered"] else 0


if __name__ == "__main__":
    sys.exit(main())
