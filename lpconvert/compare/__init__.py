"""Compare: does a setting help this checkpoint by more than the noise between seeds?

* :mod:`~lpconvert.compare.command` — ``lpconvert compare``: arms × paired seeds, the trunk before T0 trained once,
  the start evaluated once per seed
* :mod:`~lpconvert.compare.report` — the report, verdict first
* :mod:`~lpconvert.compare.stats` — paired differences with their 95 % intervals, seeds to resolve a difference
"""
