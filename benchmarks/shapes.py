"""The shapes the microbenchmarks run: the layers of the DGM networks at batch 64, plus a few large cases.

Every case names the op it times, where its shape comes from (SPEC section 2 and the measured growth of
SPEC section 8) and the output shape the layer must produce (checked by tests/benchmarks/test_benchmarks_smoke.py, so
a typo in a layer's geometry cannot go unnoticed).

Sources of the shapes:

- MNIST DGMw generator (ngf=6): noise 128 at 1x1 -> ConvTranspose2d(128, 24, 4, 1, 0) -> 4x4 ->
  ConvTranspose2d(24, 12, 4, 2, 1) -> 8x8 -> ConvTranspose2d(12, 6, 4, 2, 1) -> 16x16; the last (output)
  layer is per task and unmasked, so it is not here. After 10 tasks the widths have grown to 125/22/36
  ("grown"), and the reserved (frozen) weights of earlier tasks are about half of each layer.
- MNIST DGMa generator (ngf=20): the same stack with widths 80/40/20 and one score per output channel
  (gated convolutions); half of the units frozen by earlier tasks.
- Discriminator (MNIST: 1 input channel, SVHN: 3): Conv2d(nc, 32, 5, 2, 2) 32->16, Conv2d(32, 64, 5, 2, 2)
  16->8, Conv2d(64, 128, 5, 2, 2) 8->4. D is not masked in DGM; these shapes measure the masked conv on the
  strided 5x5 geometry a masked classifier (HAT, PackNet, Piggyback) would use.
- ImageNet-50 residual generator: 3x3 convolutions, 64 channels at 8x8, 16x16 and 32x32 (masked, DGMw, and
  gated, DGMa), and its first layer, a linear 128 -> 4*4*64 on the noise.
- Large cases: a conv with a 256x256x3x3 weight on [64, 256, 16, 16] (GPU) or 128x128x3x3 on
  [64, 128, 16, 16] (CPU: one call stays near 50 ms on two cores); the fused elementwise ops on ~4M entries
  (a [512, 512, 4, 4] weight) and the channel gate on a [64, 128, 32, 32] activation.

Mask schedule used everywhere: ``s = 8``, ``s_max = 400`` (HAT compensation on, as in training), scores
~ N(0, 1). With |s e| <= ~40 no sigmoid output is subnormal: the timings measure the kernels, not the slow
path some CPUs take on subnormal floats (SPEC section 3 asks the library to avoid those by design; a
benchmark that produced them would time the FPU's microcode, not the code under test).
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Annealing scale and HAT compensation of every benchmark (see the module docstring).
S = 8.0
S_MAX = 400.0
BATCH = 64

#: The ops the suite times, in report order. ``channel_gate`` is the gate alone (a backend primitive on a
#: precomputed activation), so the convolution does not hide its cost.
OPS = (
    "mask",
    "masked_weight",
    "channel_gate",
    "masked_conv_transpose2d",
    "gated_conv_transpose2d",
    "masked_conv2d",
    "gated_conv2d",
    "masked_linear",
    "sparsity_regularizer",
)

#: The ops whose ``cpu`` backend must be at least 2x faster than ``reference`` forward+backward.
HEADLINE_OPS = ("mask", "masked_weight", "channel_gate")
HEADLINE_SPEEDUP = 2.0

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Case:
    """One benchmarked call: an op on tensors of fixed shapes.

    ``tensors`` maps a role to a shape: ``scores`` (mask), ``weight`` (masked_weight, convs, linear),
    ``activation`` (channel_gate), ``input`` (convs, linear), ``masks`` (sparsity_regularizer: a tuple of
    per-layer shapes). ``frozen`` is the fraction of weights reserved by earlier tasks (DGMw; None: task
    0, nothing frozen); ``frozen_units`` the fractions of frozen (output, input) units (DGMa; an input
    fraction of None: the layer's input is not masked, e.g. the noise).
    """

    op: str
    name: str
    source: str
    tensors: dict = field(default_factory=dict)
    geometry: dict = field(default_factory=dict)
    out_shape: tuple = ()
    input_grad: bool = True  # False where the input is data (noise, images): training needs no grad there
    frozen: float | None = None
    frozen_units: tuple | None = None
    mode: str = "anneal"
    devices: tuple = DEVICES
    quick: bool = False  # part of the --quick smoke set

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"

    def describe(self) -> str:
        """The tensor shapes in a compact form, e.g. ``x[64,128,1,1] w[128,125,4,4]``."""
        short = {"input": "x", "weight": "w", "scores": "e", "activation": "y", "masks": "m"}
        parts = []
        for role, shape in self.tensors.items():
            if role == "masks":
                parts.append("m" + "+".join(_dims(s) for s in shape))
            else:
                parts.append(short[role] + _dims(shape))
        geo = ",".join(f"{k[0]}{v}" for k, v in self.geometry.items() if k != "output_padding" or v)
        return " ".join(parts) + (f" ({geo})" if geo else "") + (f" {self.mode}" if self.mode != "anneal" else "")


def _dims(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _tconv(op, name, source, cin, cout, hw, stride, padding, out_hw, **kw):
    return Case(
        op, name, source,
        tensors={"input": (BATCH, cin, hw, hw), "weight": (cin, cout, 4, 4)},
        geometry={"stride": stride, "padding": padding},
        out_shape=(BATCH, cout, out_hw, out_hw),
        **kw,
    )


def _conv(op, name, source, cin, cout, hw, k, stride, padding, out_hw, **kw):
    return Case(
        op, name, source,
        tensors={"input": (BATCH, cin, hw, hw), "weight": (cout, cin, k, k)},
        geometry={"stride": stride, "padding": padding},
        out_shape=(BATCH, cout, out_hw, out_hw),
        **kw,
    )


_DGMW = "MNIST DGMw generator"
_DGMA = "MNIST DGMa generator (80/40/20)"
_DISC = "discriminator"
_IMNET = "ImageNet-50 generator"
_LARGE_W = (512, 512, 4, 4)  # 4,194,304 entries

CASES: tuple[Case, ...] = (
    # --- the fused elementwise ops (the CPU headline) -------------------------------------------------
    Case("mask", "dgmw-grown-l1", f"{_DGMW} after 10 tasks, layer 1 scores",
         tensors={"scores": (128, 125, 4, 4)}, out_shape=(128, 125, 4, 4)),
    Case("mask", "large-4M", "large elementwise case", tensors={"scores": _LARGE_W}, out_shape=_LARGE_W, quick=True),
    Case("mask", "large-4M-ste", "large elementwise case, straight-through",
         tensors={"scores": _LARGE_W}, out_shape=_LARGE_W, mode="ste"),
    Case("masked_weight", "dgmw-grown-l1", f"{_DGMW} after 10 tasks, layer 1",
         tensors={"weight": (128, 125, 4, 4)}, out_shape=(128, 125, 4, 4), frozen=0.5),
    Case("masked_weight", "large-4M", "large elementwise case",
         tensors={"weight": _LARGE_W}, out_shape=_LARGE_W, frozen=0.5, quick=True),
    Case("masked_weight", "large-4M-ste", "large elementwise case, straight-through",
         tensors={"weight": _LARGE_W}, out_shape=_LARGE_W, frozen=0.5, mode="ste"),
    Case("channel_gate", "dgma-l1", f"{_DGMA}, layer 1 output",
         tensors={"activation": (BATCH, 80, 4, 4)}, out_shape=(BATCH, 80, 4, 4)),
    Case("channel_gate", "dgma-l2", f"{_DGMA}, layer 2 output",
         tensors={"activation": (BATCH, 40, 8, 8)}, out_shape=(BATCH, 40, 8, 8)),
    Case("channel_gate", "dgma-l3", f"{_DGMA}, layer 3 output",
         tensors={"activation": (BATCH, 20, 16, 16)}, out_shape=(BATCH, 20, 16, 16)),
    Case("channel_gate", "imagenet-32", f"{_IMNET}, 64 channels at 32x32",
         tensors={"activation": (BATCH, 64, 32, 32)}, out_shape=(BATCH, 64, 32, 32)),
    Case("channel_gate", "large", "large gate case",
         tensors={"activation": (BATCH, 128, 32, 32)}, out_shape=(BATCH, 128, 32, 32), quick=True),
    # --- DGMw generator: masked transposed convolutions ------------------------------------------------
    _tconv("masked_conv_transpose2d", "dgmw-l1", f"{_DGMW}, task 0, layer 1", 128, 24, 1, 1, 0, 4, input_grad=False),
    _tconv("masked_conv_transpose2d", "dgmw-l2", f"{_DGMW}, task 0, layer 2", 24, 12, 4, 2, 1, 8),
    _tconv("masked_conv_transpose2d", "dgmw-l3", f"{_DGMW}, task 0, layer 3", 12, 6, 8, 2, 1, 16),
    _tconv("masked_conv_transpose2d", "dgmw-grown-l1", f"{_DGMW} after 10 tasks, layer 1",
           128, 125, 1, 1, 0, 4, input_grad=False, frozen=0.5, quick=True),
    _tconv("masked_conv_transpose2d", "dgmw-grown-l2", f"{_DGMW} after 10 tasks, layer 2",
           125, 22, 4, 2, 1, 8, frozen=0.5),
    _tconv("masked_conv_transpose2d", "dgmw-grown-l3", f"{_DGMW} after 10 tasks, layer 3",
           22, 36, 8, 2, 1, 16, frozen=0.5),
    # --- DGMa generator: channel-gated transposed convolutions ----------------------------------------
    _tconv("gated_conv_transpose2d", "dgma-l1", f"{_DGMA}, layer 1", 128, 80, 1, 1, 0, 4,
           input_grad=False, frozen_units=(0.5, None)),
    _tconv("gated_conv_transpose2d", "dgma-l2", f"{_DGMA}, layer 2", 80, 40, 4, 2, 1, 8,
           frozen_units=(0.5, 0.5), quick=True),
    _tconv("gated_conv_transpose2d", "dgma-l3", f"{_DGMA}, layer 3", 40, 20, 8, 2, 1, 16, frozen_units=(0.5, 0.5)),
    # --- discriminator geometry and the ImageNet generator: masked convolutions -----------------------
    _conv("masked_conv2d", "disc-mnist-l1", f"{_DISC}, MNIST layer 1", 1, 32, 32, 5, 2, 2, 16, input_grad=False),
    _conv("masked_conv2d", "disc-svhn-l1", f"{_DISC}, SVHN layer 1", 3, 32, 32, 5, 2, 2, 16, input_grad=False),
    _conv("masked_conv2d", "disc-l2", f"{_DISC}, layer 2", 32, 64, 16, 5, 2, 2, 8, quick=True),
    _conv("masked_conv2d", "disc-l3", f"{_DISC}, layer 3", 64, 128, 8, 5, 2, 2, 4),
    _conv("masked_conv2d", "imagenet-8", f"{_IMNET}, 3x3 conv at 8x8", 64, 64, 8, 3, 1, 1, 8, frozen=0.5),
    _conv("masked_conv2d", "imagenet-16", f"{_IMNET}, 3x3 conv at 16x16", 64, 64, 16, 3, 1, 1, 16, frozen=0.5),
    _conv("masked_conv2d", "imagenet-32", f"{_IMNET}, 3x3 conv at 32x32", 64, 64, 32, 3, 1, 1, 32, frozen=0.5),
    _conv("masked_conv2d", "large-cpu", "large conv (CPU size)", 128, 128, 16, 3, 1, 1, 16, frozen=0.5,
          devices=("cpu",)),
    _conv("masked_conv2d", "large-gpu", "large conv (GPU size)", 256, 256, 16, 3, 1, 1, 16, frozen=0.5,
          devices=("cuda",)),
    _conv("gated_conv2d", "imagenet-8", f"{_IMNET} (DGMa), 3x3 conv at 8x8", 64, 64, 8, 3, 1, 1, 8,
          frozen_units=(0.5, 0.5)),
    _conv("gated_conv2d", "imagenet-16", f"{_IMNET} (DGMa), 3x3 conv at 16x16", 64, 64, 16, 3, 1, 1, 16,
          frozen_units=(0.5, 0.5), quick=True),
    _conv("gated_conv2d", "imagenet-32", f"{_IMNET} (DGMa), 3x3 conv at 32x32", 64, 64, 32, 3, 1, 1, 32,
          frozen_units=(0.5, 0.5)),
    # --- the ImageNet generator's first layer: masked linear on the noise -----------------------------
    Case("masked_linear", "imagenet-fc", f"{_IMNET}, linear 128 -> 4*4*64 on the noise",
         tensors={"input": (BATCH, 128), "weight": (4 * 4 * 64, 128)}, out_shape=(BATCH, 1024),
         input_grad=False, frozen=0.5, quick=True),
    # --- the sparsity regulariser over every masked layer of a generator ------------------------------
    Case("sparsity_regularizer", "dgmw-grown", f"{_DGMW} after 10 tasks, all three masked layers",
         tensors={"masks": ((128, 125, 4, 4), (125, 22, 4, 4), (22, 36, 4, 4))}, out_shape=(),
         frozen=0.5, quick=True),
    Case("sparsity_regularizer", "dgma", f"{_DGMA}, all three gated layers",
         tensors={"masks": ((80,), (40,), (20,))}, out_shape=(), frozen=0.5),
)


def select(*, quick: bool = False, device: str | None = None, ops=None) -> list[Case]:
    """The cases to run: all (or the ``--quick`` subset), for ``device`` (None: any), of ``ops`` (None: all)."""
    if device is not None and device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    unknown = set(ops or ()) - set(OPS)
    if unknown:
        raise ValueError(f"ops must be a subset of {', '.join(OPS)}, got unknown {', '.join(sorted(unknown))}")
    chosen = [
        c for c in CASES
        if (not quick or c.quick) and (device is None or device in c.devices) and (ops is None or c.op in ops)
    ]
    return sorted(chosen, key=lambda c: OPS.index(c.op))


def parse_devices(value: str | None, cuda_available: bool, option: str = "--dgm-devices") -> list[str]:
    """The devices of ``option``: a comma-separated list, or None for cpu plus cuda when present."""
    if value is None:
        return ["cpu"] + (["cuda"] if cuda_available else [])
    devices = [d.strip() for d in value.split(",") if d.strip()]
    bad = [d for d in devices if d not in DEVICES]
    if not devices or bad:
        raise ValueError(f"{option} must list {' and/or '.join(DEVICES)} (comma-separated), got {value!r}")
    return list(dict.fromkeys(devices))
