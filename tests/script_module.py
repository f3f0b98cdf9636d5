"""scripts/*.py as importable modules (scripts/ is not a package), and the `lpconvert compare` commands of the
zoo/results files read back through the CLI."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lpconvert.compare.plan import Comparison

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py, imported once and registered in sys.modules (dataclasses look their module up there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def compare_commands(results_file: Path) -> list[str]:
    """The `lpconvert compare …` commands named in the first line of a zoo/results file (how to rerun it now)."""
    import re

    return re.findall(r"`(lpconvert compare [^`]*)`", Path(results_file).read_text().splitlines()[0])


def planned_by_cli(command: str, monkeypatch) -> Comparison:
    """The comparison that `command` (``lpconvert compare …``) plans, read from the CLI without training anything."""
    import shlex

    from click.testing import CliRunner

    from lpconvert.cli import main
    from lpconvert.compare import command as compare

    planned = []

    class Planned(Exception):
        pass

    def stop(comparison):
        planned.append(comparison)
        raise Planned  # nothing is trained

    monkeypatch.setattr(compare, "run_comparison", stop)
    words = shlex.split(command)
    assert words[:2] == ["lpconvert", "compare"], command
    result = CliRunner().invoke(main, words[1:])
    assert len(planned) == 1, result.output
    return planned[0]


def resolved(comparison: Comparison) -> dict:
    """What a comparison trains and evaluates: every arm's full configuration (seed 0), the seeds, OOD sets, folder —
    equal for equal experiments whether the arms were given as text (CLI) or as values (a script)."""
    from lpconvert.compare.plan import arm_config

    return {"arms": {a.name: arm_config(comparison.base, a, seed=0, output=Path("run")).to_dict()
                     for a in comparison.arms},
            "base": comparison.base.to_dict(), "seeds": comparison.seeds, "ood": comparison.ood,
            "folder": str(comparison.folder)}
