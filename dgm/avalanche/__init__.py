"""DGM inside Avalanche (ContinualAI's library; the optional extra ``avalanche``), and Avalanche benchmarks built
from this project's data readers.

- :func:`make_benchmark` / :func:`benchmark_from_tasks`: class-incremental Avalanche benchmarks (10 experiences
  of one class, or 5 of two) over in-memory tensors from :mod:`dgm.data`, so nothing is downloaded by Avalanche;
- :class:`DGMStrategy`: an Avalanche strategy that trains DGM (the masked, growing conditional GAN and its
  replay) on each experience; its ``model`` is the classifier only.

The core of ``dgm`` never imports this package; importing it without the extra raises an ImportError naming the
install command (:data:`INSTALL_HINT`).
"""
from __future__ import annotations

INSTALL_HINT = 'pip install --no-build-isolation -e ".[avalanche]"'


def _require():
    try:
        import avalanche  # noqa: F401
    except ImportError as exc:
        raise ImportError("dgm.avalanche needs the optional extra 'avalanche' (avalanche-lib 0.6.0 and the "
                          f"torchvision matching your torch): {INSTALL_HINT}") from exc


_require()

from .benchmarks import PROTOCOLS, ModelRangeInput, benchmark_from_tasks, experience_task, make_benchmark  # noqa: E402
from .strategy import DGMStrategy  # noqa: E402

__all__ = ["INSTALL_HINT", "PROTOCOLS", "make_benchmark", "benchmark_from_tasks", "experience_task",
           "ModelRangeInput", "DGMStrategy"]
