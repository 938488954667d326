"""DGM: Dynamic Generative Memory for class-incremental continual learning (the pipeline on top of dgm_kernels)."""

__version__ = "0.1.0"
