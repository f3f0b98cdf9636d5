"""Convert: the first step of the pipeline.

* :mod:`~lpconvert.convert.surgery` — the layers a kind targets, found with torch.fx; ``plan``; ``convert``, which
  swaps them by qualified name into late-phase layers with K members (all or nothing)
* :mod:`~lpconvert.convert.late_phase_config` — what a converted model records of its conversion (K, layer names,
  kinds and options, σ0): ``LatePhaseConfig``, rebuilt by name without tracing
* :mod:`~lpconvert.convert.members` — a converted model's members at run time (which member runs, how many)

The late-phase layers themselves, one file per kind, are :mod:`lpconvert.layers`.
"""
