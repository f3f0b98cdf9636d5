"""The report of `lpconvert compare`: per-seed values, mean ± std per arm, and per pair of arms the paired difference
with its 95 % interval and p-value (:mod:`lpconvert.stats`) — as ``report.json``, ``report.md`` and ``report.png``.

Higher is better for top-1 and OOD AUROC, lower for NLL and ECE; a difference is "b − a", so a late-phase arm b that
helps has a positive top-1 difference and a negative NLL difference. A setting counts as a win only when its 95 %
interval lies entirely on the better side of zero.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from .files import atomic_write_bytes, atomic_write_json
from .stats import paired_difference, summary

if TYPE_CHECKING:
    from .compare import Comparison

#: metric → True when higher is better
METRICS = {"top1": True, "nll": False, "ece": False, "auroc/mean": True}
VARIANTS = ("averaged", "ensemble")


def _defined(numbers: dict[str, float]) -> dict[str, float | None]:
    """`numbers` with what one seed leaves undefined (a spread, an interval, a p-value: NaN) as None — JSON's null,
    where NaN is not JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in numbers.items()}


def build_report(comparison: Comparison, evaluations: dict[str, Any]) -> dict[str, Any]:
    """The numbers: every arm's per-seed values and summary, every pair's paired differences."""
    seeds = comparison.seeds
    arms: dict[str, Any] = {}
    for arm in comparison.arms:
        per_seed: dict[str, dict[str, list[float]]] = {}
        for variant in VARIANTS:
            rows = [evaluations[f"seed{s}/{arm.name}"].get(variant) for s in seeds]
            if any(r is None for r in rows):
                continue
            per_seed[variant] = {m: [r[m] for r in rows] for m in METRICS if m in rows[0]}
        arms[arm.name] = {"settings": arm.settings, "per_seed": per_seed,
                          "summary": {v: {m: _defined(summary(x)) for m, x in ms.items()}
                                      for v, ms in per_seed.items()}}
    pairs = []
    for a, b in itertools.combinations(comparison.arms, 2):
        for variant in VARIANTS:
            va, vb = arms[a.name]["per_seed"].get(variant), arms[b.name]["per_seed"].get(variant)
            if va is None or vb is None:
                continue
            for metric, higher in METRICS.items():
                if metric in va and metric in vb:
                    d = _defined(paired_difference(va[metric], vb[metric]))
                    if d["low"] is None:
                        verdict = "needs 2 or more seeds"
                    elif d["low"] > 0 if higher else d["high"] < 0:
                        verdict = "b better"
                    elif d["high"] < 0 if higher else d["low"] > 0:
                        verdict = "b worse"
                    else:
                        verdict = "no difference shown"
                    pairs.append({"a": a.name, "b": b.name, "variant": variant, "metric": metric, **d,
                                  "verdict": verdict})
    splits = {evaluations[f"seed{s}/{arm.name}"].get("split") for s in seeds for arm in comparison.arms}
    split = splits.pop() if len(splits) == 1 and None not in splits else "evaluation"
    return {"seeds": seeds, "base": comparison.base.to_dict(), "evaluated_on": f"{split} split, last epoch",
            "arms": arms, "pairs": pairs}


def to_markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [f"# lpconvert compare: {report['base']['model']}", "",
             f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (paired: same data order and "
             "augmentation per seed). Every arm at its "
             f"last epoch on the {report['evaluated_on'].split(',')[0]}; nothing selected on it. top-1 in %, NLL in "
             "nats, ECE and AUROC as fractions.", ""]
    for variant in VARIANTS:
        rows = [(name, arm["per_seed"][variant], arm["summary"][variant]) for name, arm in report["arms"].items()
                if variant in arm["per_seed"]]
        if not rows:
            continue
        metrics = [m for m in METRICS if m in rows[0][1]]
        lines += [f"## {variant} model" if variant == "averaged" else "## ensemble of the members (not averaged)", "",
                  "| arm | " + " | ".join(f"{m} (mean ± std)" for m in metrics) + " | per-seed top-1 |",
                  "|---|" + "---|" * (len(metrics) + 1)]
        for name, values, stats in rows:
            cells = [f"{stats[m]['mean']:.4g}" + (f" ± {stats[m]['std']:.2g}" if stats[m]["std"] is not None else "")
                     for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " ".join(f"{v:.2f}" for v in values["top1"]) + " |")
        lines.append("")
    lines += ["## paired differences (b − a)", "", "| b − a | model | metric | mean | 95 % interval | p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for p in report["pairs"]:
        interval = f"[{p['low']:+.4g}, {p['high']:+.4g}] | {p['p']:.3g}" if p["low"] is not None else "— | —"
        lines.append(f"| {p['b']} − {p['a']} | {p['variant']} | {p['metric']} | {p['mean']:+.4g} | {interval} | "
                     f"{p['verdict']} |")
    return "\n".join(lines) + "\n"


def to_png(report: dict[str, Any]) -> bytes:
    """Per metric of the averaged models: every seed's value per arm (one line a seed: the pairing), and the mean."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["arms"])
    metrics = [m for m in METRICS if all(m in a["per_seed"].get("averaged", {}) for a in report["arms"].values())]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [report["arms"][n]["per_seed"]["averaged"][metric] for n in names]
        for s, seed in enumerate(report["seeds"]):
            ax.plot(range(len(names)), [v[s] for v in values], "o-", color="0.6", lw=0.8, ms=3)
        ax.plot(range(len(names)), [sum(v) / len(v) for v in values], "s", color="C3", ms=7, label="mean")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(metric + (" ↑" if METRICS[metric] else " ↓"))
    axes[0][0].legend(frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(comparison: Comparison, evaluations: dict[str, Any]) -> dict[str, Any]:
    """report.json, report.md and report.png in the comparison's folder (atomically); returns the report."""
    report = build_report(comparison, evaluations)
    atomic_write_json(comparison.folder / "report.json", report)
    atomic_write_bytes(comparison.folder / "report.md", to_markdown(report).encode())
    atomic_write_bytes(comparison.folder / "report.png", to_png(report))
    return report
