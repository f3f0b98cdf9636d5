"""The report of `lpconvert compare`: first the verdict — did any arm beat the starting checkpoint, by more than the
seed noise — then per-seed values, mean ± std per arm and model, each arm against the start and per pair of arms
the paired difference with its 95 % interval and p-value (:mod:`lpconvert.compare.stats`), as ``report.json``,
``report.md`` and ``report.png``.

Higher is better for top-1 and OOD AUROC, lower for NLL and ECE; a difference is "b − a", so an arm b that helps has
a positive top-1 difference and a negative NLL difference. A setting counts as a win only when its 95 % interval
lies entirely on the better side of zero.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from lpconvert.compare.stats import paired_difference, seeds_to_resolve, summary
from lpconvert.files import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from lpconvert.compare.plan import Comparison

#: metric → True when higher is better
METRICS = {"top1": True, "nll": False, "ece": False, "brier": False, "nll_ts": False, "ece_ts": False,
           "brier_ts": False, "auroc/mean": True}  # *_ts: after temperature scaling fitted on the selection part
#: the models a comparison evaluates per arm (``soup`` and ``interpolated`` with a selection split)
VARIANTS = ("averaged", "ensemble", "soup", "interpolated")
TITLES = {"averaged": "averaged model (Eq. 1)", "ensemble": "ensemble of the members (not averaged)",
          "soup": "greedy soup of the members", "interpolated": "interpolated with the start (α chosen)"}
#: the top-1 difference (points) the report says how many seeds would resolve
RESOLVE = 0.1


def _defined(numbers: dict[str, float]) -> dict[str, float | None]:
    """`numbers` with what one seed leaves undefined (a spread, an interval, a p-value: NaN) as None — JSON's null,
    where NaN is not JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in numbers.items()}


def _difference(a: list[float], b: list[float], higher: bool) -> dict[str, Any]:
    """b − a over paired seeds with its verdict and, for a difference not shown, the seeds that would resolve
    :data:`RESOLVE` points."""
    d = _defined(paired_difference(a, b))
    if d["low"] is None:
        verdict = "needs 2 or more seeds"
    elif d["low"] > 0 if higher else d["high"] < 0:
        verdict = "b better"
    elif d["high"] < 0 if higher else d["low"] > 0:
        verdict = "b worse"
    else:
        verdict = "no difference shown"
    return {**d, "verdict": verdict, "seeds_to_resolve": seeds_to_resolve(d["std"] or 0.0, RESOLVE)}


def _per_seed(evaluations: dict[str, Any], seeds: list[int], name: str) -> dict[str, dict[str, list[float]]]:
    per_seed = {}
    for variant in VARIANTS:
        rows = [evaluations.get(f"seed{s}/{name}", {}).get(variant) for s in seeds]
        if rows and all(r is not None for r in rows):
            per_seed[variant] = {m: [r[m] for r in rows] for m in METRICS if m in rows[0]}
    return per_seed


def _choices(evaluations: dict[str, Any], seeds: list[int], name: str) -> dict[str, list[Any]]:
    """Per seed, what the selection part chose: the members of the greedy soup, the interpolation weight α."""
    rows = [evaluations[f"seed{s}/{name}"] for s in seeds]
    choices = {}
    if all("soup_record" in r for r in rows):
        choices["soup_members"] = [r["soup_record"]["members"] for r in rows]
    if all("interpolation_record" in r for r in rows):
        choices["alpha"] = [r["interpolation_record"]["alpha"] for r in rows]
    return choices


def build_report(comparison: Comparison, evaluations: dict[str, Any]) -> dict[str, Any]:
    """The numbers: the start's and every arm's per-seed values and summary, every arm's variants against the start,
    every pair's paired differences, and the verdict."""
    seeds = comparison.seeds
    starts = [evaluations.get(f"seed{s}/start") for s in seeds]
    start = None
    if all(r is not None for r in starts):
        start = {m: [r["averaged"][m] for r in starts] for m in METRICS if m in starts[0]["averaged"]}
    arms: dict[str, Any] = {}
    for arm in comparison.arms:
        per_seed = _per_seed(evaluations, seeds, arm.name)
        arms[arm.name] = {"settings": arm.settings, "per_seed": per_seed,
                          "summary": {v: {m: _defined(summary(x)) for m, x in ms.items()} for v, ms in per_seed.items()},
                          "choices": _choices(evaluations, seeds, arm.name)}
        if start is not None:
            arms[arm.name]["versus_start"] = {
                v: {m: _difference(start[m], x, METRICS[m]) for m, x in ms.items() if m in start}
                for v, ms in per_seed.items()}
    pairs = []
    for a, b in itertools.combinations(comparison.arms, 2):
        for variant in VARIANTS:
            va, vb = arms[a.name]["per_seed"].get(variant), arms[b.name]["per_seed"].get(variant)
            if va is None or vb is None:
                continue
            for metric, higher in METRICS.items():
                if metric in va and metric in vb:
                    pairs.append({"a": a.name, "b": b.name, "variant": variant, "metric": metric,
                                  **_difference(va[metric], vb[metric], higher)})
    first = evaluations[f"seed{seeds[0]}/{comparison.arms[0].name}"]
    splits = {evaluations[f"seed{s}/{arm.name}"].get("split") for s in seeds for arm in comparison.arms}
    split = splits.pop() if len(splits) == 1 and None not in splits else "evaluation"
    evaluated_on = f"{split} split, last epoch"
    if "selection" in first:
        part = first["selection"]
        evaluated_on = (f"{split} split, report part ({part['report_images']} images), last epoch; soups and α "
                        f"chosen on the other {part['selection_images']} (a fixed stratified split)")
    report = {"seeds": seeds, "base": comparison.base.to_dict(), "evaluated_on": evaluated_on,
              "start": None if start is None else {"per_seed": start,
                                                   "summary": {m: _defined(summary(x)) for m, x in start.items()}},
              "arms": arms, "pairs": pairs}
    report["verdict"] = verdict_lines(report)
    return report


def _number(value: float | None, metric: str, sign: bool = False) -> str:
    """Values of one metric at one precision: top-1 to 2 decimals (points), the others to 4."""
    if value is None:
        return "—"
    return f"{value:{'+' if sign else ''}.{2 if metric == 'top1' else 4}f}"


def _interval(d: dict[str, Any], metric: str) -> str:
    if d["low"] is None:
        return f"{_number(d['mean'], metric, True)} (one seed: no interval)"
    return f"{_number(d['mean'], metric, True)} [{_number(d['low'], metric, True)}, {_number(d['high'], metric, True)}]"


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """Plain words first: the start, every arm's models against it (top-1, 95 % interval over the seeds), whether
    any beat it, and how many seeds would resolve :data:`RESOLVE` points between the first two arms."""
    n = len(report["seeds"])
    lines = []
    wins = []
    if report["start"] is not None:
        lines.append(f"Your checkpoint (the start): top-1 {_number(report['start']['summary']['top1']['mean'], 'top1')}"
                     f" on the {report['evaluated_on'].split(',')[0]}.")
        for name, arm in report["arms"].items():
            for variant, metrics in arm.get("versus_start", {}).items():
                d = metrics["top1"]
                lines.append(f"{name}, {variant}: {_interval(d, 'top1')} points against the start over {n} "
                             f"seed{'s' if n > 1 else ''}.")
                if d["verdict"] == "b better":
                    wins.append(f"{name} ({variant})")
        lines.append(f"Better than your checkpoint, by more than the seed noise: {', '.join(wins)}." if wins else
                     "No arm beat your checkpoint by more than the seed noise.")
    pair = next((p for p in report["pairs"] if p["variant"] == "averaged" and p["metric"] == "top1"), None)
    if pair is not None:
        text = f"{pair['b']} − {pair['a']} (averaged): {_interval(pair, 'top1')} points: {pair['verdict']}"
        if pair["verdict"] == "no difference shown" and pair["seeds_to_resolve"]:
            text += f"; about {pair['seeds_to_resolve']} seeds would resolve {RESOLVE:g} points"
        lines.append(text + ".")
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    lines = [f"# lpconvert compare: {report['base']['model']}", "", *[f"- {line}" for line in report["verdict"]], "",
             f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (paired: same data order and "
             "augmentation per seed). Every arm at its "
             f"last epoch on the {report['evaluated_on'].split(',')[0]}; nothing selected on it. top-1 in %, NLL in "
             "nats, ECE, Brier and AUROC as fractions (`_ts`: after one temperature fitted on the selection part); "
             "intervals are 95 % over the seeds.", ""]
    if report["start"] is not None:
        start = report["start"]
        metrics = list(start["per_seed"])
        lines += ["## the start (your checkpoint)", "", "| " + " | ".join(metrics) + " |", "|" + "---|" * len(metrics),
                  "| " + " | ".join(_number(start["summary"][m]["mean"], m) for m in metrics) + " |", ""]
    for variant in VARIANTS:
        rows = [(name, arm) for name, arm in report["arms"].items() if variant in arm["per_seed"]]
        if not rows:
            continue
        metrics = [m for m in METRICS if m in rows[0][1]["per_seed"][variant]]
        with_start = all("versus_start" in arm for _, arm in rows)
        lines += [f"## {TITLES[variant]}", "",
                  "| arm | " + " | ".join(f"{m} (mean ± std)" for m in metrics)
                  + (" | top-1 − start [95 %] |" if with_start else " |") + " per-seed top-1 |",
                  "|---|" + "---|" * (len(metrics) + 1 + with_start)]
        for name, arm in rows:
            stats = arm["summary"][variant]
            cells = [_number(stats[m]["mean"], m) + (f" ± {_number(stats[m]['std'], m)}" if stats[m]["std"] is not None
                                                     else "") for m in metrics]
            if with_start:
                cells.append(_interval(arm["versus_start"][variant]["top1"], "top1"))
            lines.append(f"| {name} | " + " | ".join(cells) + " | "
                         + " ".join(_number(v, "top1") for v in arm["per_seed"][variant]["top1"]) + " |")
        lines.append("")
    chosen = [(name, arm["choices"]) for name, arm in report["arms"].items() if arm.get("choices")]
    if chosen:
        lines += ["## chosen on the selection part (per seed)", "", "| arm | soup members | α |", "|---|---|---|"]
        for name, choices in chosen:
            members = " / ".join(",".join(map(str, m)) for m in choices.get("soup_members", [])) or "—"
            alphas = " ".join(f"{a:g}" for a in choices.get("alpha", [])) or "—"
            lines.append(f"| {name} | {members} | {alphas} |")
        lines.append("")
    lines += ["## paired differences (b − a)", "", "| b − a | model | metric | mean | 95 % interval | p | verdict |",
              "|---|---|---|---|---|---|---|"]
    for p in report["pairs"]:
        m = p["metric"]
        interval = (f"[{_number(p['low'], m, True)}, {_number(p['high'], m, True)}] | {p['p']:.3g}"
                    if p["low"] is not None else "— | —")
        lines.append(f"| {p['b']} − {p['a']} | {p['variant']} | {m} | {_number(p['mean'], m, True)} | {interval} | "
                     f"{p['verdict']} |")
    return "\n".join(lines) + "\n"


def to_png(report: dict[str, Any]) -> bytes:
    """Per metric of the averaged models: every seed's value per arm (one line a seed: the pairing), the mean, and
    the start's mean as a dashed line."""
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
        if report["start"] is not None and metric in report["start"]["summary"]:
            ax.axhline(report["start"]["summary"][metric]["mean"], color="C0", ls="--", lw=1, label="start")
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
