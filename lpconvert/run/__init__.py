"""Run folders: what lpconvert writes, and how it reads a run back.

* :mod:`~lpconvert.run.ownership` — which folders lpconvert may create, replace or delete (only its own)
* :mod:`~lpconvert.run.folder` — the run directory: its layout, its lock, creation after validation, replacement
* :mod:`~lpconvert.run.saved` — the one way to reopen a run (``load_run``): its checkpoint, its settings as it ran,
  their data section, its members
"""
