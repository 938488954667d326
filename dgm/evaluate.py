"""Evaluation: the accuracy matrix and what derives from it, sample grids, plots, the summary table.

Definitions (T tasks seen; ``R[t, k]`` = accuracy in % on the real test images of task k after training task t,
one softmax over all classes seen after task t, no task id; entries with k > t are undefined, NaN):

- ``A_t`` (the paper's metric; A5, A10 on MNIST) = mean over k <= t of R[t, k]: the *unweighted* mean of the per-task
  accuracies (with one class per task: the mean per-class accuracy over the seen classes).
- forgetting after task t (Chaudhry et al. 2018) = mean over k < t of ( max over l in [k, t-1] of R[l, k] - R[t, k] ).
- backward transfer after task t (Lopez-Paz & Ranzato 2017) = mean over k < t of ( R[t, k] - R[k, k] ); negative
  means forgetting. Both are undefined (NaN) after the first task.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = ["accuracy_per_task", "average_accuracy", "forgetting", "backward_transfer", "metrics",
           "save_grid", "plot_accuracy", "summary_table"]


@torch.no_grad()
def accuracy_per_task(classify, subsets, seen_classes: int, batch_size: int = 1000, world=None) -> list[float]:
    """Accuracy (%) of ``classify`` (images -> logits over >= seen_classes) on each subset (one per task).

    ``subsets``: dgm.data Subsets (uint8 images, ``positions``), usually the tasks' ``test`` subsets.
    ``world`` (several processes, :class:`dgm.distributed.World`): each rank classifies its share of every subset
    and the counts are summed over the ranks (every rank returns the same accuracies).

    Predictions are the argmax over the first ``seen_classes`` logits; targets are the positions in the class order.
    """
    from dgm.data import to_model_range

    counts = []
    for test in subsets:
        shard = None if world is None else world.shard(len(test))
        lo, hi = (0, len(test)) if shard is None else (shard.lo, shard.hi)
        correct = 0
        for start in range(lo, hi, batch_size):
            end = min(start + batch_size, hi)
            x = to_model_range(test.images[start:end])
            logits = classify(x)[:, :seen_classes]
            correct += int((logits.argmax(1) == test.positions[start:end]).sum())
        counts.append(correct)
    if world is not None and world.distributed:
        counts = world.sum_values(counts)
    return [100.0 * c / max(len(test), 1) for c, test in zip(counts, subsets)]


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] > R.shape[1]:
        raise ValueError(f"accuracy matrix must be [tasks trained, tasks] with rows <= columns, got {R.shape}")
    return R


def average_accuracy(R) -> list[float]:
    """A_t for every trained task t (row of R)."""
    R = _matrix(R)
    return [float(np.mean(R[t, : t + 1])) for t in range(R.shape[0])]


def forgetting(R) -> list[float]:
    """Average forgetting after every task t (NaN for t = 0)."""
    R = _matrix(R)
    out = []
    for t in range(R.shape[0]):
        if t == 0:
            out.append(math.nan)
            continue
        out.append(float(np.mean([R[k:t, k].max() - R[t, k] for k in range(t)])))
    return out


def backward_transfer(R) -> list[float]:
    """Backward transfer after every task t (NaN for t = 0)."""
    R = _matrix(R)
    return [math.nan if t == 0 else float(np.mean([R[t, k] - R[k, k] for k in range(t)])) for t in range(R.shape[0])]


def metrics(R) -> dict:
    """Everything results.json reports about an accuracy matrix (NaN entries become None)."""
    R = _matrix(R)

    def clean(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)

    return {
        "accuracy_matrix": [[clean(v) for v in row] for row in R.tolist()],
        "average_accuracy": [clean(v) for v in average_accuracy(R)],
        "forgetting": [clean(v) for v in forgetting(R)],
        "backward_transfer": [clean(v) for v in backward_transfer(R)],
    }


# ------------------------------------------------------------------------------------------------------
def save_grid(images: torch.Tensor, rows: int, path: str | os.PathLike, labels: list[str] | None = None) -> None:
    """Save images in [-1, 1] ([rows * cols, C, H, W], row-major) as one PNG grid (PIL; 1 px separators)."""
    from PIL import Image

    from dgm.data import from_model_range

    n, c, h, w = images.shape
    if rows <= 0 or n % rows:
        raise ValueError(f"rows must divide the number of images ({n}), got {rows}")
    cols = n // rows
    pix = from_model_range(images.cpu()).numpy()  # uint8
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = pix[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
    scale = max(1, 256 // max(canvas.shape[0], canvas.shape[1]) + 1) if max(canvas.shape[:2]) < 256 else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(os.fspath(path))


def plot_accuracy(R, path: str | os.PathLike, title: str = "", class_names: list[str] | None = None) -> None:
    """Two panels: the accuracy matrix R[t, k] (heat map) and A_t over tasks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    R = _matrix(R)
    A = average_accuracy(R)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
    shown = np.where(np.isnan(R), np.nan, R)
    im = ax0.imshow(shown, vmin=0, vmax=100, cmap="viridis")
    ax0.set_xlabel("task k (test data)")
    ax0.set_ylabel("after training task t")
    ax0.set_title("accuracy R[t, k] (%)")
    for t in range(R.shape[0]):
        for k in range(t + 1):
            ax0.text(k, t, f"{R[t, k]:.0f}", ha="center", va="center", fontsize=7,
                     color="white" if R[t, k] < 60 else "black")
    fig.colorbar(im, ax=ax0, fraction=0.046)
    ticks = list(range(R.shape[1]))
    ax0.set_xticks(ticks)
    ax0.set_yticks(list(range(R.shape[0])))
    if class_names:
        ax0.set_xticklabels(class_names[: len(ticks)], rotation=45, fontsize=7)
    ax1.plot(range(1, len(A) + 1), A, marker="o")
    ax1.set_ylim(0, 101)
    ax1.set_xlabel("tasks seen t")
    ax1.set_ylabel("A_t (%)")
    ax1.set_title("average accuracy A_t")
    ax1.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def summary_table(R, wall_seconds: list[float] | None = None) -> str:
    """A plain-text table: per task, A_t, forgetting, backward transfer, accuracy on the newest task, time."""
    R = _matrix(R)
    A, F, B = average_accuracy(R), forgetting(R), backward_transfer(R)

    def fmt(v):
        return "   -  " if v is None or math.isnan(v) else f"{v:6.2f}"

    lines = ["task |  A_t   | forget |  BWT   | R[t,t] | seconds", "-----+--------+--------+--------+--------+--------"]
    for t in range(R.shape[0]):
        secs = "" if not wall_seconds or t >= len(wall_seconds) else f"{wall_seconds[t]:7.1f}"
        lines.append(f"{t:4d} | {fmt(A[t])} | {fmt(F[t])} | {fmt(B[t])} | {fmt(R[t, t])} | {secs}")
    return "\n".join(lines)
