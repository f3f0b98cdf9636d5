"""The ``lpconvert`` command's entry point, outside the ``lpconvert`` package on purpose.

Importing anything inside the package runs ``lpconvert/__init__.py`` first, and that imports torch: too late for
the two things the command does before torch starts.

* ``OMP_WAIT_POLICY=PASSIVE``, unless the user set ``OMP_WAIT_POLICY``: OpenMP reads it once, when torch loads it.
  torch's CPU threads then sleep when they have no work instead of spinning for it, which on a machine whose cores
  other processes keep busy takes the CPU from the thread everyone waits for (zoo/BENCHMARKS.md, "CPU threads").
  Only the command does this; ``import lpconvert`` leaves the environment alone.
* A torch / torchvision pair that does not match (``lpconvert.compat``) ends in one line on stderr naming both
  versions and the fix, exit code 2, instead of a traceback (``--debug`` / ``LPCONVERT_DEBUG=1``: the traceback).

``python -m lpconvert`` (the form torchrun uses) goes through the package instead: the same one line comes from
Python's ``-m`` handling, and the OpenMP wait policy is the environment's.
"""

from __future__ import annotations

import os
import sys

#: The environment variable and the value the command sets before torch loads OpenMP (when it is unset).
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def _debug() -> bool:
    return "--debug" in sys.argv[1:] or os.environ.get("LPCONVERT_DEBUG", "") not in ("", "0")


def main() -> None:
    """Prepare the environment, import the command (one line if torch and torchvision do not pair) and run it."""
    os.environ.setdefault(*WAIT_POLICY)
    try:
        from lpconvert.cli import main as command
    except ImportError as err:
        if type(err).__name__ != "TorchPairError" or _debug():
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    command(prog_name="lpconvert")


if __name__ == "__main__":
    main()
