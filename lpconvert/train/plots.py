"""The run's learning curves as a PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from lpconvert.files import atomic_write_bytes


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation top-1 of the averaged model per epoch, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [r for r in rows if "train_loss" in r]
    left.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (member mean)")
    right.plot([r["epoch"] for r in rows if "val_top1" in r], [r["val_top1"] for r in rows if "val_top1" in r],
               marker="o", label="averaged model")
    right.axhline(rows[0]["val_top1"], color="gray", linestyle="--", label="start")
    right.set(xlabel="epoch", ylabel="validation top-1 (%)")
    right.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
