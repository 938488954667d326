"""The names a run is configured with, each defined once: methods, data sets, backends, and the image channels of
each data set.

This module imports no network code, so :mod:`dgm.models` can take :data:`METHODS` from here without an import
cycle. Data-set facts come from the data layer's registry (:data:`dgm.data.DATASETS`) and the synthetic stand-in
(:mod:`dgm.data.synthetic`); backend names from :mod:`dgm_kernels.backends`.
"""
from __future__ import annotations

from dgm_kernels.backends import BACKEND_NAMES

from .data import DATASETS, SYNTHETIC, SYNTHETIC_CHANNELS

__all__ = ["METHODS", "MASKED_METHODS", "RIVALS", "DATASET_NAMES", "BACKENDS", "image_channels"]

#: DGMw masks weights, DGMa gates channels (SPEC section 3)
MASKED_METHODS = ("dgmw", "dgma")
#: the generative-replay rivals of SPEC section 7, trained by the same loop without masks (:mod:`dgm.rivals`): deep
#: generative replay, and memory replay GANs with joint training on replay or with replay alignment
RIVALS = ("dgr", "mergan-jtr", "mergan-ra")
#: every method ``dgm train`` runs
METHODS = MASKED_METHODS + RIVALS
#: every registered real data set, then the synthetic test set (which has no files, so no registry entry)
DATASET_NAMES = (*DATASETS, SYNTHETIC)
#: the kernel library's backends, ``auto`` included
BACKENDS = BACKEND_NAMES


def image_channels(dataset: str) -> int:
    """Channels of the images of ``dataset`` (one of :data:`DATASET_NAMES`)."""
    return SYNTHETIC_CHANNELS if dataset == SYNTHETIC else DATASETS[dataset].channels
