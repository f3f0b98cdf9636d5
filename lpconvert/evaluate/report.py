"""What ``lpconvert evaluate`` prints and writes: the table of headline metrics per variant, then the temperature
scaling and corruption sections; CSV and JSON carry every key of every row."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

__all__ = ["format_table", "to_csv", "to_json"]

#: Row keys shown in their own section rather than as columns of the main table.
_DETAIL = ("corruption/", "calibration/", "ce/")
_CALIBRATION = (("T", "temperature"), ("top1", "top1"), ("nll", "nll"), ("nll (T)", "nll_ts"), ("ece", "ece"),
                ("ece (T)", "ece_ts"), ("brier", "brier"), ("brier (T)", "brier_ts"))


def _cell(value: Any, width: int, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return f"{'—':>{width}}"
    return f"{value:>{width}.{digits}f}"


def _grid(rows: list[dict[str, Any]], columns: list[tuple[str, str]], digits: int = 4) -> list[str]:
    """A table with one line per row: its variant, then (header, key) columns."""
    width = max(len(r["variant"]) for r in rows)
    widths = [max(10, len(header)) for header, _ in columns]
    lines = [f"{'':<{width}}  " + "  ".join(f"{header:>{w}}" for (header, _), w in zip(columns, widths))]
    for row in rows:
        lines.append(f"{row['variant']:<{width}}  " + "  ".join(_cell(row.get(key), w, digits)
                                                             for (_, key), w in zip(columns, widths)))
    return lines


def _calibration(rows: list[dict[str, Any]]) -> list[str]:
    rows = [row for row in rows if "calibration/temperature" in row]
    if not rows:
        return []
    first = rows[0]
    lines = ["", f"temperature scaling: one temperature T per variant, fitted (NLL minimised) on "
                 f"{first['calibration/fit_count']} held-out images; figures on the other {first['calibration/count']} "
                 "images, before and after (T); top-1 does not change"]
    return lines + _grid(rows, [(header, f"calibration/{key}") for header, key in _CALIBRATION])


def _corruptions(rows: list[dict[str, Any]], source: str | None) -> list[str]:
    rows = [row for row in rows if "corruption/top1" in row]
    if not rows:
        return []
    keys = [key.split("/")[1:] for key in rows[0] if key.count("/") == 2 and key.startswith("corruption/")]
    types = list(dict.fromkeys(c for c, _ in keys))
    severities = sorted({int(s) for _, s in keys})
    count = rows[0].get("corruption/count")
    lines = ["", f"corruptions ({source or 'evaluated'}{f'; {count} images per set' if count else ''}): top-1 % per "
                 f"type and severity; mCE = mean top-1 error over the {len(types) * len(severities)} sets (%)"
                 + ("; CE relative to the reference: 100 × Σ_s error / Σ_s reference error" if "mce_ref" in rows[0]
                    else "")]
    name_width = max(len(c) for c in [*types, "per severity"])
    for row in rows:
        relative = f", relative to the reference {row['mce_ref']:.2f}" if "mce_ref" in row else ""
        lines += ["", f"{row['variant']}: mCE {row['mce']:.2f}{relative}"]
        header = "".join(f"{s:>8}" for s in severities) + f"{'mean':>8}" + (f"{'CE':>8}" if "mce_ref" in row else "")
        lines.append(f"{'':<{name_width}}" + header)
        for c in types:
            values = [row[f"corruption/{c}/{s}"] for s in severities]
            line = "".join(f"{v:>8.2f}" for v in values) + f"{sum(values) / len(values):>8.2f}"
            if f"ce/{c}" in row:
                line += f"{row[f'ce/{c}']:>8.1f}"
            lines.append(f"{c:<{name_width}}" + line)
        lines.append(f"{'per severity':<{name_width}}" + "".join(f"{row[f'corruption/severity{s}']:>8.2f}"
                                                               for s in severities)
                     + f"{row['corruption/top1']:>8.2f}")
    return lines


def format_table(rows: list[dict[str, Any]], *, corruption_source: str | None = None) -> str:
    """The headline metrics, one line per variant (a missing value shows as —), then the temperature-scaling and
    corruption sections when the rows have them; `corruption_source` names where the corrupted images came from."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("variant", "count") and not k.startswith(_DETAIL)))
    lines = _grid(rows, [(key, key) for key in keys])
    units = "top-1/top-5" + (" and mCE" if "mce" in keys else "") + " in %, NLL in nats, ECE and AUROC as fractions, " \
        "Brier in [0, 2]" + ("; auroc: entropy score, auroc_msp: maximum softmax probability"
                             if any(k.startswith("auroc_msp/") for k in keys) else "")
    lines.append(f"({rows[0]['count']} images; {units})")
    return "\n".join(lines + _calibration(rows) + _corruptions(rows, corruption_source))


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Every key of every row as CSV columns (a row without a key leaves its cell empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    """The rows as a JSON list of objects."""
    return json.dumps(rows, indent=2)
