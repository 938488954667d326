"""Registers, shared memory and spills of every GPU kernel of dgm_kernels, as Markdown (no GPU needed).

    python scripts/kernel_resources.py                       # compile the Triton kernels now (a few minutes)
    python scripts/kernel_resources.py --report aot.json     # from the report of scripts/triton_aot.py --json
    python scripts/kernel_resources.py --so dgm_kernels/_C.cpython-311-x86_64-linux-gnu.so

Triton kernels: every specialisation that ``scripts/triton_aot.py`` records from the launchers, compiled for
each target; per kernel and target the range over its specialisations of registers per thread, shared
memory per block (Triton's dynamic allocation plus the cubin's static one), local memory per thread (spill
slots: these kernels keep no arrays in local memory, so local memory is spills) and the theoretical
occupancy that leaves (resident warps per SM over the maximum, from registers, shared memory and warps per
block). CUDA kernels: ``cuobjdump --dump-resource-usage`` of the built extension, per architecture it holds.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton_aot  # noqa: E402  (refuses to run with TRITON_INTERPRET set)

#: per compute capability: (shared memory per SM usable by blocks, registers per SM, max warps per SM)
SM_LIMITS = {80: (164 * 1024, 65536, 64), 86: (100 * 1024, 65536, 48), 89: (100 * 1024, 65536, 48),
             90: (228 * 1024, 65536, 64), 100: (228 * 1024, 65536, 64), 120: (100 * 1024, 65536, 48)}
MAX_BLOCKS_PER_SM = 32


def occupancy(cap: int, regs: int, shared: int, warps: int) -> tuple[float, str]:
    """(resident warps / max warps per SM, the limiting resource) for blocks of ``warps`` warps."""
    smem_sm, regs_sm, warps_sm = SM_LIMITS.get(cap, SM_LIMITS[90])
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    limits = {
        "registers": (regs_sm // regs_per_warp) // warps,
        "shared memory": smem_sm // (shared + 1024) if shared else MAX_BLOCKS_PER_SM,  # 1 KB reserved per block
        "warps": warps_sm // warps,
    }
    blocks = min(min(limits.values()), MAX_BLOCKS_PER_SM)
    limiter = min(limits, key=limits.get)
    return blocks * warps / warps_sm, limiter if limits[limiter] < warps_sm // warps else "warps"


def triton_table(report: dict) -> str:
    lines = ["| kernel | target | specialisations | registers / thread | shared memory / block (B) | "
             "local memory / thread (B) | lowest occupancy (limit) |", "|---|---|---|---|---|---|---|"]
    for row in triton_aot.summary_rows(report):
        worst = min((occupancy(row["target"], r, s, w)
                     for r, s, w in zip(row["regs"], row["shared"], row["warps_list"])), key=lambda o: o[0])
        rng = lambda v: f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}"  # noqa: E731
        lines.append(f"| `{row['kernel']}` | sm_{row['target']} | {row['specs']} | {rng(row['regs'])} | "
                     f"{rng(row['shared'])} | {rng(row['local'])} | {worst[0]:.0%} ({worst[1]}) |")
    return "\n".join(lines)


def conv_tile_table(report: dict, target: int) -> str:
    """The fused convolution per tile and operand type on ``target`` (worst over its specialisations)."""
    specs = {s["id"]: s for s in report["specialisations"]}
    rows: dict[tuple, list] = {}
    for r in report["results"]:
        if not r["ok"] or r["target"] != target or r["kernel"] != "conv._conv_kernel":
            continue
        s = specs[r["spec"]]
        names = list(s["signature"])
        cx = {names[k[0]]: v for k, v in s["constexprs"]}
        key = (cx["BM"], cx["BN"], cx["BK"], s["signature"]["x_ptr"][1:], cx["INPUT_PRECISION"] or "-")
        rows.setdefault(key, []).append(r)
    lines = [f"| BM x BN x BK | operands | dot | specialisations | registers | shared (B) | local (B) | "
             f"occupancy (sm_{target}) |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows, key=lambda k: (k[3], str(k[4]), k[0], k[1], k[2])):
        rs = rows[key]
        regs = max(r["regs"] for r in rs)
        shared = max(r["shared_dynamic"] + r["shared"] for r in rs)
        local = max(r["local"] for r in rs)
        occ, lim = occupancy(target, regs, shared, rs[0]["num_warps"])
        lines.append(f"| {key[0]} x {key[1]} x {key[2]} | {key[3]} | {key[4]} | {len(rs)} | {regs} | {shared} | "
                     f"{local} | {occ:.0%} ({lim}) |")
    return "\n".join(lines)


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def cuda_table(so: Path) -> str:
    """Per CUDA kernel (template instances together) and architecture: range over the instances."""
    rows = triton_aot.resource_usage(so)
    if not rows:
        return f"(no CUDA kernels in {so.name})"
    groups: dict[tuple, list] = {}
    for (arch, _, usage), name in zip(rows, demangle([fn for _, fn, _ in rows])):
        base = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))
        base = re.sub(r"\(.*$", "", base)  # drop the parameter list
        base = re.sub(r"<.*$", "", base).split("::")[-1]  # and the template arguments and namespaces
        groups.setdefault((base, arch), []).append(usage)
    rng = lambda v: f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}"  # noqa: E731
    lines = ["| CUDA kernel | arch | instances | registers / thread | shared (B) | local (B) | stack (B) |",
             "|---|---|---|---|---|---|---|"]
    for (base, arch), us in sorted(groups.items()):
        lines.append(f"| `{base}` | {arch} | {len(us)} | {rng([u['regs'] for u in us])} | "
                     f"{rng([u['shared'] for u in us])} | {rng([u['local'] for u in us])} | "
                     f"{rng([u['stack'] for u in us])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", help="a report of scripts/triton_aot.py --json (default: compile now)")
    ap.add_argument("--so", help="the built extension (default: dgm_kernels/_C*.so)")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        import os

        report = triton_aot.check(triton_aot.DEFAULT_TARGETS, False, args.jobs or os.cpu_count() or 1)
    print("### Triton kernels\n")
    print(triton_table(report))
    print(f"\n### The fused convolution per tile (sm_{triton_aot.FULL_TARGET}, worst over its specialisations)\n")
    print(conv_tile_table(report, triton_aot.FULL_TARGET))
    so = Path(args.so) if args.so else next(iter(sorted((triton_aot.ROOT / "dgm_kernels").glob("_C*.so"))), None)
    print("\n### CUDA kernels of the extension\n")
    print(cuda_table(so) if so else "(the extension is not built)")


if __name__ == "__main__":
    main()
