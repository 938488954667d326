"""Run checkpoints: written atomically after every task, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors, numbers, strings, lists and dicts (no pickled objects), so loading one never
runs code. It holds the configuration, the generator (its grown widths, every task's BatchNorm and output layer,
the mask ledger: every finished task's binary masks as bits), the critic, the classifier, the accuracy rows and the
timing so far: everything :func:`dgm.train.train` needs to continue after the last finished task.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch

from .models import build_classifier, build_discriminator, build_generator
from .names import image_channels
from .presets import RunConfig

__all__ = ["CHECKPOINT_NAME", "FORMAT", "VERSION", "save_atomic", "write_json_atomic", "load_checkpoint", "build_models", "CheckpointError"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT, VERSION = "dgm-run", 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a DGM run's."""


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON into ``path`` through a temporary file and os.replace: never a half-written file
    (the parent directory is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a DGM run checkpoint (format {FORMAT!r} version {VERSION})")
    return state


def new_generator(config: RunConfig, n_classes: int, device):
    g = build_generator(config.architecture, config.method, nz=config.nz, ngf=config.ngf,
                        inner_width=config.inner_width, nc=image_channels(config.dataset), n_classes=n_classes,
                        mask_mode=config.mask_mode, gate_after_bn=config.gate_after_bn, backend=config.backend)
    return g.to(device)


def generator_state(g) -> dict:
    return {"widths": list(g.widths()), "num_heads": g.num_heads, "n_classes": g.n_classes,
            "state": g.state_dict(), "ledger": None if g.ledger is None else g.ledger.state_dict()}


def net_state(net) -> dict | None:
    return None if net is None else {"classes": net.classes, "state": net.state_dict()}


def build_models(state: dict, config: RunConfig, device="cpu"):
    """(generator, discriminator, classifier or None) restored from a checkpoint's state."""
    gs = state["generator"]
    g = new_generator(config, int(gs["n_classes"]), device)
    g.grow_to(gs["widths"])
    if g.ledger is not None:
        g.ledger.load_state_dict(gs["ledger"])
    for t in range(int(gs["num_heads"])):
        g.add_task_modules(device, widths=g.task_widths(t))
    g.load_state_dict(gs["state"])
    g.set_backend(config.backend)

    def restore(build, widths, s):
        if s is None:
            return None
        net = build(config.architecture, image_channels(config.dataset), 0, widths).to(device)
        net.grow_classes(int(s["classes"]))
        net.load_state_dict(s["state"])
        return net

    d = restore(build_discriminator, config.critic_widths, state.get("discriminator"))
    c = restore(functools.partial(build_classifier, batchnorm=config.classifier_batchnorm), config.classifier_widths,
                state.get("classifier"))
    return g, d, c
