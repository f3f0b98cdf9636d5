"""The offline demo: the whole pipeline on real images that a fresh install already has.

scikit-learn ships 1,797 handwritten 8x8 digits. The demo trains a small BatchNorm CNN on them to a "pretrained"
state (T0), then fine-tunes that checkpoint twice through :func:`lpconvert.finetune.run` — late-phase (K members,
BatchNorm + classifier) and plain (K = 1, the identical pipeline) — and prints initial / plain / late-phase accuracy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import FinetuneConfig
from .errors import LatePhaseError
from .finetune import DIGITS, run

PRETRAIN_EPOCHS, FINETUNE_EPOCHS = 6, 6


def run_demo(output: Path, K: int = 4, seed: int = 0, force: bool = False) -> str:
    """Run the three jobs under `output` and return the result table."""
    if output.exists() and any(output.iterdir()):
        if not force:
            raise LatePhaseError(f"demo output {output} is not empty; pass --force or choose --output")
        shutil.rmtree(output)
    common = dict(data=DIGITS, batch_size=32, workers=0, seed=seed, quiet=True, momentum=0.9, weight_decay=5e-4)
    pretrain = run(FinetuneConfig(
        model="digits_cnn", pretrained=False, K=1, epochs=PRETRAIN_EPOCHS, lr=0.05, schedule="cosine",
        select="last", output=str(output / "pretrained"), **common,
    ))
    start = f"local-dir:{pretrain['model_dir']}"
    finetune = dict(model=start, epochs=FINETUNE_EPOCHS, lr=0.01, schedule="constant", nesterov=True,
                    late_phase=("batchnorm", "classifier"), **common)
    late = run(FinetuneConfig(K=K, output=str(output / "late-phase"), **finetune))
    plain = run(FinetuneConfig(K=1, output=str(output / "plain"), **finetune))
    rows = [
        ("pretrained checkpoint (T0)", late["start_top1"], str(Path(pretrain["model_dir"]))),
        ("plain fine-tuning", plain["final_top1"], plain["model_dir"]),
        (f"late-phase K={K}, averaged", late["final_top1"], late["model_dir"]),
    ]
    lines = [f"handwritten digits (scikit-learn), 597 test images; {FINETUNE_EPOCHS} fine-tuning epochs", ""]
    lines += [f"{'model':<30} {'top-1 %':>8}  files"]
    lines += [f"{name:<30} {acc:8.2f}  {path}" for name, acc, path in rows]
    return "\n".join(lines)
