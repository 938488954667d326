"""Roofline figures for the microbenchmarks: how close each kernel comes to what the machine can do.

- Elementwise and bookkeeping ops (``mask``, ``masked_weight``, ``channel_gate``, ``sparsity_regularizer``): the
  achieved bytes per second, ``minimal bytes / median time``, against the machine's measured copy bandwidth
  (``clone()`` of a large tensor: read + write bytes / time). The minimal bytes are what any implementation must
  read and write once (:func:`op_bytes`): the tensors in, the results out, the frozen state as packed bits; for
  ``fwd+bwd`` the backward's gradient in and gradients out are added.
- Convolutions (``masked_conv2d``, ``masked_conv_transpose2d``, ``gated_*``, ``masked_linear``): the achieved
  FLOP/s, ``2 * MACs / median`` (forward; forward + both backward products for ``fwd+bwd``, the input's gradient
  only where the input needs one), against the measured rate of a large matrix product of the same dtype
  (the best of ``torch.mm`` of square matrices of a few sizes, the TF32 settings as they are in the benchmark
  process, recorded). A fraction above 100 % means the peak was measured low, or, for the bandwidth, that the
  tensors fit in a cache.

Both peaks are measured in the process that writes the report, on the same device and dtype, so a row's fraction
is comparable across machines.
"""
from __future__ import annotations

import math
import statistics
import time

from benchmarks import shapes

ELEMENTWISE_OPS = ("mask", "masked_weight", "channel_gate", "sparsity_regularizer")
CONV_OPS = ("masked_conv2d", "masked_conv_transpose2d", "gated_conv2d", "gated_conv_transpose2d", "masked_linear")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _numel(shape) -> int:
    return math.prod(shape)


def op_bytes(case: shapes.Case, phase: str, dtype: str) -> int | None:
    """The bytes any implementation of ``case`` must move at least (None: not an elementwise op)."""
    e = DTYPE_BYTES[dtype]
    if case.op == "mask":
        n = _numel(case.tensors["scores"])
        fwd, bwd = 2 * n * e, 3 * n * e  # e -> m; (grad m, e) -> grad e
    elif case.op == "masked_weight":
        n = _numel(case.tensors["weight"])
        bits = math.ceil(n / 8) if case.frozen is not None else 0
        fwd = 3 * n * e + bits  # w, e, frozen bits -> w * m
        bwd = 4 * n * e + bits  # grad out, w, e, bits -> grad w, grad e
    elif case.op == "channel_gate":
        shape = case.tensors["activation"]
        n, c = _numel(shape), shape[1]
        fwd = 2 * n * e + c * e  # y, gates -> y * g
        bwd = 3 * n * e + 2 * c * e  # grad out, y -> grad y; grad gates
    elif case.op == "sparsity_regularizer":
        n = sum(_numel(s) for s in case.tensors["masks"])
        bits = math.ceil(n / 8) if case.frozen is not None else 0
        fwd, bwd = n * e + bits, n * e + bits  # masks, reserved bits -> scalar; -> grad masks
    else:
        return None
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]


def op_flops(case: shapes.Case, phase: str) -> int | None:
    """2 x the multiply-adds of ``case`` in ``phase`` (None: not a convolution or linear op)."""
    if case.op not in CONV_OPS:
        return None
    x, w = case.tensors["input"], case.tensors["weight"]
    if case.op == "masked_linear":
        macs = x[0] * w[0] * w[1]
    elif "transpose" in case.op:
        n, cin, h, wd = x
        macs = n * cin * h * wd * w[1] * w[2] * w[3]
    else:
        out = case.out_shape
        macs = out[0] * out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
    fwd = 2 * macs
    bwd = 2 * macs * (2 if case.input_grad else 1)  # grad weight, and grad input where the input needs one
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[phase]


def _timeit(fn, sync, *, min_time: float = 0.3, repeats: int = 5) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / repeats / one))
    best = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best.append((time.perf_counter() - t0) / inner)
    return statistics.median(best)


def _copy_time(numel: int, dtype, dev, sync) -> float:
    import torch

    src = torch.empty(numel, dtype=dtype, device=dev).fill_(1)
    dst = torch.empty_like(src)
    return _timeit(lambda: dst.copy_(src), sync)


def _mm_time(n: int, dtype, dev, sync) -> float:
    import torch

    a, b = (torch.randn(n, n, device=dev).to(dtype) for _ in range(2))
    return _timeit(lambda: torch.mm(a, b), sync)


def _mm_sizes(device) -> tuple:
    return (4096, 8192) if device.type == "cuda" else (1024, 2048, 3072)  # the best of these is the peak


def matmul_rate(device: str, dtype: str = "float32") -> float:
    """The best FLOP/s of a square ``torch.mm`` over the sizes the suite tries, measured now in this process."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    return max(2 * n**3 / _mm_time(n, getattr(torch, dtype), dev, sync) for n in _mm_sizes(dev))


def measure_peaks(device: str, dtypes=("float32",)) -> dict:
    """{"copy_bytes_per_s": {dtype: B/s}, "matmul_flops": {dtype: FLOP/s}, "settings": {...}} on ``device``."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    big = 256 * 2**20 if dev.type == "cuda" else 64 * 2**20  # bytes per buffer: well beyond the caches
    sizes = _mm_sizes(dev)
    out = {"copy_bytes_per_s": {}, "matmul_flops": {}, "settings": {
        "copy_buffer_bytes": big, "matmul_size": None, "threads": torch.get_num_threads(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}}
    for name in dtypes:
        dtype = getattr(torch, name)
        out["copy_bytes_per_s"][name] = 2 * big / _copy_time(big // DTYPE_BYTES[name], dtype, dev, sync)
        best = max((2 * n**3 / _mm_time(n, dtype, dev, sync), n) for n in sizes)
        out["matmul_flops"][name] = best[0]
        out["settings"]["matmul_size"] = best[1]
    return out


def roofline_rows(rows: list[dict], peaks: dict) -> list[dict]:
    """Per measured row (ops of :data:`ELEMENTWISE_OPS` and :data:`CONV_OPS`): achieved rate and its fraction of
    the device's peak. ``peaks``: ``{device: measure_peaks(device)}``."""
    cases = {(c.op, c.name): c for c in shapes.CASES}
    out = []
    for r in rows:
        case = cases.get((r["op"], r["case"]))
        peak = peaks.get(r["device"])
        if case is None or peak is None or r["median"] <= 0:
            continue
        nbytes = op_bytes(case, r["phase"], r["dtype"]) if r["dtype"] in DTYPE_BYTES else None
        flops = op_flops(case, r["phase"])
        if nbytes is not None and r["dtype"] in peak["copy_bytes_per_s"]:
            rate = nbytes / r["median"]
            out.append({**_ident(r), "kind": "bandwidth", "amount": nbytes, "rate": rate,
                        "peak": peak["copy_bytes_per_s"][r["dtype"]],
                        "fraction": rate / peak["copy_bytes_per_s"][r["dtype"]]})
        elif flops is not None and r["dtype"] in peak["matmul_flops"]:
            rate = flops / r["median"]
            out.append({**_ident(r), "kind": "compute", "amount": flops, "rate": rate,
                        "peak": peak["matmul_flops"][r["dtype"]], "fraction": rate / peak["matmul_flops"][r["dtype"]]})
    return out


def _ident(r: dict) -> dict:
    return {k: r[k] for k in ("op", "case", "shape", "device", "dtype", "phase", "backend", "median")}


def format_rows(rows: list[dict], *, phase: str = "fwd+bwd") -> list[str]:
    """Markdown: one table for bandwidth-bound ops, one for convolutions, of ``phase``."""
    lines = []
    for kind, unit, scale, title in (("bandwidth", "GB/s", 1e9, "Elementwise and bookkeeping ops: bytes/s against the measured copy bandwidth"),
                                      ("compute", "GFLOP/s", 1e9, "Convolutions: FLOP/s against a large matrix product of the same dtype")):
        rs = [r for r in rows if r["kind"] == kind and r["phase"] == phase]
        if not rs:
            continue
        lines += [f"#### {title} ({phase})", "", f"| device | dtype | op | case | backend | achieved {unit} | peak {unit} | fraction |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rs:
            label = "torch.compile(reference)" if r["backend"] == "compile" else r["backend"]
            lines.append(f"| {r['device']} | {r['dtype']} | {r['op']} | {r['case']} | {label} | {r['rate'] / scale:.1f} | "
                         f"{r['peak'] / scale:.1f} | {100 * r['fraction']:.0f}% |")
        if kind == "bandwidth":
            lines.append("Fractions above 100 %: the tensors fit in a cache, whose bandwidth exceeds the DRAM copy "
                         "bandwidth measured here; the bandwidth goal concerns the large cases.")
        lines.append("")
    return lines
