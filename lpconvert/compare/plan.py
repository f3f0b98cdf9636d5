"""The plan of a comparison: its arms (named settings over one base configuration), the settings of each (seed, arm)
run and of the shared trunk before T0, and the folder it lives in — checked before anything trains, and compared with
the saved plan when a comparison continues."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lpconvert.config import LEGACY_SETTINGS, FinetuneConfig, field_types, flag
from lpconvert.errors import LatePhaseError
from lpconvert.evaluate.sets import ood_names
from lpconvert.files import read_json_object
from lpconvert.run.ownership import check_not_protected

MARKER = ".lpconvert-compare"
SETTINGS, EVALUATIONS = "compare.json", "evaluations.json"
#: Settings an arm may change and still branch from the shared epochs before T0 (they act from T0 on).
LATE_SETTINGS = frozenset({
    "K", "late_phase", "late_phase_options", "include", "exclude", "sigma0", "gamma_theta", "accumulate",
    "member_optimizer", "member_lr", "member_weight_decay", "bn_stats", "recalibrate_batches", "mode", "group_size",
})
#: Settings that belong to the comparison, not to an arm.
NOT_PER_ARM = frozenset({"seed", "output", "resume", "force", "select", "val_split", "push_to_hub",
                         "allow_regression", "soup", "interpolate"})  # compare reports soups and α itself
#: Settings that change what is shown or how fast, never what is computed: a comparison continues with other values.
DISPLAY_SETTINGS = ("quiet", "workers", "threads", "log", "log_every", "dist_timeout")
#: Names the comparison uses for itself in its folder (``seedS/trunk``, ``seedS/start``).
RESERVED = ("trunk", "start")
#: Suffixes of the folders lpconvert builds before it swaps them into place (a branch, a replacement run).
TEMPORARY = (".branching", ".replacing")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Arm:
    """A named set of settings over the base configuration."""

    name: str
    settings: dict[str, Any]


def parse_arm(text: str) -> Arm:
    """``NAME`` or ``NAME: key=value key=value …`` (settings by field or flag name, e.g. ``late: K=10 sigma0=0.5``);
    ``plain`` alone means K = 1."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise LatePhaseError(f"--arm {text!r}: name the arm with letters, digits, '_', '.', '+' or '-' first, "
                             "e.g. --arm 'late: K=10 sigma0=0.5'")
    settings: dict[str, Any] = {"K": 1} if name == "plain" and not rest.strip() else {}
    names = {flag(field).lstrip("-"): field for field in field_types()} | {field: field for field in field_types()}
    for item in rest.split():
        key, sep, value = item.partition("=")
        field = names.get(key.strip().lstrip("-"))
        if not sep or field is None:
            raise LatePhaseError(f"--arm {name}: {item!r} is not SETTING=VALUE with a `lpconvert finetune` setting "
                                 "(e.g. K=10, sigma0=0.5, gamma-theta=1, swa-start=161)")
        if field in NOT_PER_ARM:
            raise LatePhaseError(f"--arm {name}: {field} is the same for every arm; set it for the comparison instead")
        settings[field] = value
    return Arm(name, settings)


def branches(arm: Arm, base: FinetuneConfig) -> bool:
    """Whether `arm` trains the epochs before T0 exactly like the base configuration (and so branches from the
    shared trunk): it changes only settings that act from T0 on (SWA only when it starts at or after T0)."""
    early = set(arm.settings) - LATE_SETTINGS - {"swa_start", "swa_lr"}
    swa_start = arm_config(base, arm, seed=0, output=Path(".")).swa_start
    return base.t0 > 0 and not early and (swa_start is None or swa_start >= base.t0)


def _for_seed(values: dict[str, Any], seed: int, output: Path) -> FinetuneConfig:
    """`values` for one seed, ending at its last epoch; ``{seed}`` in MODEL or --weights becomes the seed (each seed
    its own starting checkpoint, e.g. ``local-dir:runs/seed{seed}/plain/model``)."""
    per_seed = {k: values[k].replace("{seed}", str(seed)) for k in ("model", "weights") if isinstance(values[k], str)}
    return FinetuneConfig.from_dict({**values, **per_seed, "seed": seed, "output": str(output), "select": "last",
                                     "val_split": 0.0, "resume": None, "force": False, "push_to_hub": None})


def arm_config(base: FinetuneConfig, arm: Arm, *, seed: int, output: Path) -> FinetuneConfig:
    """The arm's settings over `base`, for one seed."""
    return _for_seed({**base.to_dict(), **arm.settings}, seed, output)


def trunk_config(base: FinetuneConfig, seed: int, output: Path) -> FinetuneConfig:
    """The base settings for one seed, without SWA (an arm that branches starts SWA at T0 or later)."""
    return _for_seed({**base.to_dict(), "swa_start": None}, seed, output)


@dataclass
class Comparison:
    """A validated comparison: the folder, the base configuration, the arms, the seeds and the OOD sets."""

    folder: Path
    base: FinetuneConfig
    arms: list[Arm]
    seeds: list[int]
    ood: list[str]
    selection_split: float = 0.0

    def settings(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "arms": [dataclasses.asdict(a) for a in self.arms], "seeds": self.seeds,
                "ood": self.ood, "selection_split": self.selection_split}

    def run_dir(self, seed: int, arm: str) -> Path:
        return self.folder / f"seed{seed}" / arm


def plan_comparison(base: FinetuneConfig, arms: Sequence[Arm], seeds: Sequence[int], output: str | os.PathLike,
                    ood: Sequence[str] = (), selection_split: float = 0.0) -> Comparison:
    """Check everything a comparison needs before anything is written: two or more arms with distinct names, each a
    valid configuration for every seed, distinct seeds, existing OOD sets, and a folder that is new or this same
    comparison (to continue it, with the same or other seeds: seeds already trained are kept; display settings
    such as ``--quiet`` or ``--workers`` may differ).

    `selection_split` F > 0 divides the evaluation split once (stratified, ``--subset-seed``) into a selection part
    (F of it) and a report part: greedy soups and the interpolation weight α are chosen on the first, every number
    is reported on the second."""
    arms, seeds = list(arms), [int(s) for s in seeds]
    if len(arms) < 2:
        raise LatePhaseError("a comparison needs at least two --arm (e.g. --arm plain --arm 'late: K=10')")
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or set(names) & set(RESERVED) or any(n.endswith(TEMPORARY) for n in names):
        raise LatePhaseError(f"arm names must be distinct, not {' or '.join(map(repr, RESERVED))} and not end in "
                             f"{' or '.join(TEMPORARY)} (lpconvert's temporary folders), got {', '.join(names)}")
    if not 0 <= selection_split < 1:
        raise LatePhaseError(f"--selection-split must lie in [0, 1), got {selection_split:g}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise LatePhaseError(f"--seeds must be distinct non-negative integers, got {seeds}")
    folder = Path(output)
    base = dataclasses.replace(base, val_split=0.0)  # nothing is selected: every arm trains on all training images
    resolved: dict[str, str] = {}
    for arm in arms:  # every setting checked as finetune checks it; two arms that train the same thing are refused
        settings = arm_config(base, arm, seed=seeds[0], output=folder).to_dict()
        twin = resolved.setdefault(repr(sorted(settings.items())), arm.name)
        if twin != arm.name:
            raise LatePhaseError(f"arms {twin} and {arm.name} have the same settings and would train the same runs; "
                                 "give one of them a setting that differs (a bare NAME is the base settings, "
                                 "except 'plain': K=1)")
    for name, path in ood_names(ood).items():
        if not Path(path).exists():
            raise LatePhaseError(f"--ood {name}={path}: no such folder or archive")
    comparison = Comparison(folder, base, arms, seeds, [str(p) for p in ood], selection_split)
    check_not_protected(folder, "--output")
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise LatePhaseError(f"--output {folder} exists and is not an lpconvert comparison; choose another folder")
        differing = _differences(read_json_object(folder / SETTINGS), jsonable(comparison.settings()))
        if differing:
            raise LatePhaseError(f"--output {folder} holds a comparison with other settings ({', '.join(differing)}); "
                                 "rerun it with the same arms and settings to continue it (other --seeds may be "
                                 "added), or choose another folder")
    return comparison


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What a saved comparison and the wanted one differ in, by flag: display settings and the seeds aside; a
    setting that the saved comparison's version did not have counts as that version behaved (its default, or
    :data:`LEGACY_SETTINGS`)."""
    defaults = jsonable({f.name: f.default for f in dataclasses.fields(FinetuneConfig)})
    saved = {"selection_split": 0.0, **saved, "base": {**defaults, **LEGACY_SETTINGS, **saved.get("base", {})}}
    differing = [flag(k) for k in wanted["base"] if k not in DISPLAY_SETTINGS
                 and saved["base"].get(k) != wanted["base"][k]]
    differing += [f"--{k.replace('_', '-')}" if k != "arms" else "--arm" for k in wanted
                  if k not in ("base", "seeds") and saved.get(k) != wanted[k]]
    return differing


def command_line(comparison: Comparison) -> str:
    """The `lpconvert compare` command that plans `comparison`: base settings that differ from the defaults as flags,
    every arm as ``--arm 'NAME: SETTING=VALUE …'`` (``plain`` alone for K = 1), the seeds, the selection split, the OOD
    sets and the folder — how an experiment script says what it runs."""
    defaults, base = FinetuneConfig().to_dict(), comparison.base.to_dict()
    words = ["lpconvert", "compare", base.pop("model")]
    for key, value in base.items():
        if value == defaults[key] or key == "val_split":
            continue
        if isinstance(value, bool):
            words.append(flag(key) if value else f"--no-{flag(key)[2:]}")
        else:
            words += [flag(key), ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]
    for arm in comparison.arms:
        settings = " ".join(f"{flag(k).lstrip('-')}={','.join(v) if isinstance(v, tuple) else v}"
                            for k, v in arm.settings.items())
        words += ["--arm", f"{arm.name}: {settings}" if arm.settings != {"K": 1} or arm.name != "plain" else "plain"]
    words += ["--seeds", ",".join(map(str, comparison.seeds))]
    if comparison.selection_split:
        words += ["--selection-split", str(comparison.selection_split)]
    for path in comparison.ood:
        words += ["--ood", path]
    return " ".join(map(shlex.quote, [*words, "--output", str(comparison.folder)]))


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))
