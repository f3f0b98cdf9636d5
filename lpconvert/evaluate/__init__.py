"""Evaluate: the paper's metrics and what ensembles are for.

* :mod:`~lpconvert.evaluate.metrics` — top-1/top-5, NLL, ECE, Brier, OOD AUROC, accumulated without host syncs
* :mod:`~lpconvert.evaluate.evaluation` — a model (or a predict function) over a loader; flatness
* :mod:`~lpconvert.evaluate.calibration` — temperature scaling fitted on held-out images
* :mod:`~lpconvert.evaluate.corruptions` — the 15 common corruptions, generated or published, and mCE
* :mod:`~lpconvert.evaluate.command` — ``lpconvert evaluate``, with its sets (:mod:`~lpconvert.evaluate.sets`),
  report (:mod:`~lpconvert.evaluate.report`) and flags (:mod:`~lpconvert.evaluate.options`)
"""
