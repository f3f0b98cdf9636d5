"""Collapse: the members averaged back into one model of the original architecture.

* :mod:`~lpconvert.collapse.average` — Eq. 1 (``collapse``), ``unload`` one member, the ensemble of the members
  (``ensemble_predict``), BatchNorm statistics folded or re-estimated
* :mod:`~lpconvert.collapse.soup` — greedy soups of the members and interpolation with the start (WiSE-FT)
* :mod:`~lpconvert.collapse.command` — ``lpconvert collapse``: a run's checkpoint into a published model folder

The averaging functions are importable from here: ``from lpconvert.collapse import collapse``.
"""

from lpconvert.collapse.average import (
    collapse,
    ensemble_predict,
    first_layer,
    input_mismatch,
    recalibrate_batch_norm,
    unload,
)

__all__ = ["collapse", "ensemble_predict", "first_layer", "input_mismatch", "recalibrate_batch_norm", "unload"]
